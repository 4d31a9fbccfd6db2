"""Registers the STEERING adapter type with PEFT: the one module that touches PEFT's internals.

PEFT's own ``register_peft_method`` only accepts members of its fixed ``PeftType`` enum, so a third-party type is
added as a plain string key to PEFT's type tables. ``PeftType`` is a ``str`` enum, so PEFT's lookups work with it.
PEFT has no plugin entry points: a saved steering adapter can only be loaded after ``import peft_steer``.

transformers' ``push_to_hub`` (which PeftModel inherits) replaces the README.md that ``save_pretrained`` wrote with
the repository's card or a generic one, which would drop the steering section of the card. For steering adapters
only, ``PeftModel.push_to_hub`` is wrapped so that the section is added to the card that is uploaded.
"""

from __future__ import annotations

import functools

import peft.mapping
from peft import PeftModel

from .card import write_model_card
from .config import STEERING, SteeringConfig
from .model import SteeringModel

_TABLES = {
    "PEFT_TYPE_TO_CONFIG_MAPPING": SteeringConfig,
    "PEFT_TYPE_TO_TUNER_MAPPING": SteeringModel,
    "PEFT_TYPE_TO_PREFIX_MAPPING": SteeringModel.prefix,
}

MISSING_REGISTRATION = (
    "This adapter is a peft-steer steering adapter (peft_type 'STEERING'), which PEFT only knows after "
    "`import peft_steer`: import it before PeftModel.from_pretrained / AutoPeftModelForCausalLM.from_pretrained."
)


def register() -> None:
    """Add STEERING to PEFT's type tables (idempotent). Raises if PEFT's internals have changed underneath."""
    for table_name, entry in _TABLES.items():
        table = getattr(peft.mapping, table_name, None)
        if not isinstance(table, dict):
            raise RuntimeError(
                f"peft-steer cannot register its adapter type: peft.mapping.{table_name} is missing in peft "
                f"{peft.__version__}. peft-steer is tested with peft 0.21; install a version it supports."
            )
        current = table.get(STEERING)
        if current is not None and not _same(current, entry):
            raise RuntimeError(f"Another package already registered a PEFT type named {STEERING!r}: {current!r}.")
        table[STEERING] = entry
    if not getattr(PeftModel.push_to_hub, "_adds_steering_card", False):
        PeftModel.push_to_hub = _with_steering_card(PeftModel.push_to_hub)


def _same(registered: object, ours: object) -> bool:
    # equal, or the same class imported again (e.g. after importlib.reload)
    return registered == ours or (
        getattr(registered, "__qualname__", None) == getattr(ours, "__qualname__", "")
        and getattr(registered, "__module__", None) == getattr(ours, "__module__", "")
    )


def _with_steering_card(push_to_hub):
    @functools.wraps(push_to_hub)
    def wrapper(self, *args, **kwargs):
        tuner = getattr(self, "base_model", None)
        if not isinstance(tuner, SteeringModel):
            return push_to_hub(self, *args, **kwargs)
        config = tuner.peft_config.get("default") or next(iter(tuner.peft_config.values()))
        upload = self._upload_modified_files

        def upload_with_card(working_dir, *upload_args, **upload_kwargs):
            write_model_card(working_dir, config)
            return upload(working_dir, *upload_args, **upload_kwargs)

        self._upload_modified_files = upload_with_card  # for this call only
        try:
            return push_to_hub(self, *args, **kwargs)
        finally:
            del self._upload_modified_files

    wrapper._adds_steering_card = True
    return wrapper


def is_missing_registration(error: BaseException) -> bool:
    """Whether ``error`` is PEFT's KeyError for a STEERING adapter loaded before ``import peft_steer``."""
    return isinstance(error, KeyError) and error.args[:1] == (STEERING,)
