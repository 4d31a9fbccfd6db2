"""Registers the STEERING adapter type with PEFT and transformers (the internals it needs are in `_peft_compat`).

PEFT has no plugin entry points: a saved steering adapter can only be loaded after ``import peft_steer``. For
steering adapters only, ``PeftModel.push_to_hub`` uploads the model card with its steering section, and transformers'
``load_adapter`` (so also ``AutoModelForCausalLM.from_pretrained(adapter_folder)`` and
``pipeline(..., model=adapter_folder)``) loads them through ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

from typing import Any

from peft import PeftModel
from torch import nn

from ._peft_compat import add_card_to_push_to_hub, add_peft_type, route_load_adapter
from .card import write_model_card
from .config import STEERING, SteeringConfig
from .context import prompt_end
from .layer import SteeringLayer
from .model import SteeringModel

MISSING_REGISTRATION = (
    "This adapter is a peft-steer steering adapter (peft_type 'STEERING'), which PEFT only knows after "
    "`import peft_steer`: import it before PeftModel.from_pretrained / AutoPeftModelForCausalLM.from_pretrained / "
    "AutoModelForCausalLM.from_pretrained / load_adapter / pipeline."
)


def register() -> None:
    """Add STEERING to PEFT's type tables and transformers' adapter loading (idempotent). Raises if PEFT's or
    transformers' internals have changed underneath."""
    add_peft_type(STEERING, SteeringConfig, SteeringModel, SteeringModel.prefix)
    add_card_to_push_to_hub(_write_steering_card)
    route_load_adapter(lambda config: isinstance(config, SteeringConfig), load_into_transformers_model)


def _write_steering_card(model: PeftModel, folder: str, repo_id: str | None = None) -> bool:
    tuner = getattr(model, "base_model", None)
    if not isinstance(tuner, SteeringModel):
        return False
    config = tuner.peft_config.get("default") or next(iter(tuner.peft_config.values()))
    write_model_card(folder, config, repo_id=repo_id)
    return True


def is_missing_registration(error: BaseException) -> bool:
    """Whether ``error`` is PEFT's KeyError for a STEERING adapter loaded before ``import peft_steer``."""
    return isinstance(error, KeyError) and error.args[:1] == (STEERING,)


def load_into_transformers_model(
    model: nn.Module,
    model_id: str,
    adapter_name: str,
    config: SteeringConfig,
    *,
    is_trainable: bool,
    low_cpu_mem_usage: bool,
    hub_kwargs: dict[str, Any],
) -> dict[str, SteeringConfig]:
    """transformers' ``model.load_adapter(model_id)`` of a steering adapter: steer ``model`` in place, exactly as
    ``PeftModel.from_pretrained(model, model_id)`` does (same checks, the saved multiplier), keeping ``model``.
    Returns the steering configs of ``model``."""
    if is_trainable:
        raise ValueError(
            "A steering adapter loaded through transformers (from_pretrained / load_adapter / pipeline) is for "
            "inference: its vectors live on PEFT's tuner, not among model.parameters(), so a trainer of this model "
            "would not train them. Train it as a PeftModel: PeftModel.from_pretrained(model, path, is_trainable=True)."
        )
    if any(isinstance(module, SteeringLayer) for module in model.modules()):
        raise ValueError(
            "This model already has a steering adapter. To hold several, load them as a PeftModel: "
            "PeftModel.from_pretrained(model, first_path), then peft_model.load_adapter(second_path, adapter_name=...)."
        )
    if adapter_name in (getattr(model, "peft_config", None) or {}):
        raise ValueError(f"Adapter with name {adapter_name} already exists. Please use a different name.")
    peft_model = PeftModel.from_pretrained(
        model, model_id, adapter_name=adapter_name, config=config, low_cpu_mem_usage=low_cpu_mem_usage, **hub_kwargs
    )
    if config.positions == "completion":
        # transformers' generate (what a pipeline calls) does not know where prompts end; SteeringModel.generate does.
        model.generate = GenerateWithPromptEnds(model)
    return peft_model.base_model.peft_config


class GenerateWithPromptEnds:
    """``model.generate`` of a transformers model steered with ``positions='completion'``: the steering tuner's
    ``generate``, which finds each row's prompt end from the attention mask and then calls the model's own
    ``generate`` (the class's, which this instance attribute hides) inside that block.

    A module-level class rather than a closure: ``copy.deepcopy(model)`` then points the copy's ``generate`` at the
    copy, and the model stays picklable.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        layer = next(module for module in self.model.modules() if isinstance(module, SteeringLayer))
        tuner = layer.tuner
        if prompt_end(tuner) is not None:  # called back by tuner.generate, inside its prompt_lengths block
            return type(self.model).generate(self.model, *args, **kwargs)
        return tuner.generate(*args, **kwargs)
