"""Registers the STEERING adapter type with PEFT: the one module that touches PEFT's internals.

PEFT's own ``register_peft_method`` only accepts members of its fixed ``PeftType`` enum, so a third-party type is
added as a plain string key to PEFT's type tables. ``PeftType`` is a ``str`` enum, so PEFT's lookups work with it.
PEFT has no plugin entry points: a saved steering adapter can only be loaded after ``import peft_steer``.
"""

from __future__ import annotations

import peft.mapping

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
        if current is not None and current != entry and getattr(current, "__module__", "") != entry.__module__:
            raise RuntimeError(f"Another package already registered a PEFT type named {STEERING!r}: {current!r}.")
        table[STEERING] = entry


def is_missing_registration(error: BaseException) -> bool:
    """Whether ``error`` is PEFT's KeyError for a STEERING adapter loaded before ``import peft_steer``."""
    return isinstance(error, KeyError) and error.args[:1] == (STEERING,)
