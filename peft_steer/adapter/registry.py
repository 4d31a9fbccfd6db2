"""Registers the STEERING adapter type with PEFT (the PEFT internals it needs are in `_peft_compat`).

PEFT has no plugin entry points: a saved steering adapter can only be loaded after ``import peft_steer``. For
steering adapters only, ``PeftModel.push_to_hub`` uploads the model card with its steering section.
"""

from __future__ import annotations

from peft import PeftModel

from ._peft_compat import add_card_to_push_to_hub, add_peft_type
from .card import write_model_card
from .config import STEERING, SteeringConfig
from .model import SteeringModel

MISSING_REGISTRATION = (
    "This adapter is a peft-steer steering adapter (peft_type 'STEERING'), which PEFT only knows after "
    "`import peft_steer`: import it before PeftModel.from_pretrained / AutoPeftModelForCausalLM.from_pretrained."
)


def register() -> None:
    """Add STEERING to PEFT's type tables (idempotent). Raises if PEFT's internals have changed underneath."""
    add_peft_type(STEERING, SteeringConfig, SteeringModel, SteeringModel.prefix)
    add_card_to_push_to_hub(_write_steering_card)


def _write_steering_card(model: PeftModel, folder: str) -> bool:
    tuner = getattr(model, "base_model", None)
    if not isinstance(tuner, SteeringModel):
        return False
    write_model_card(folder, tuner.peft_config.get("default") or next(iter(tuner.peft_config.values())))
    return True


def is_missing_registration(error: BaseException) -> bool:
    """Whether ``error`` is PEFT's KeyError for a STEERING adapter loaded before ``import peft_steer``."""
    return isinstance(error, KeyError) and error.args[:1] == (STEERING,)
