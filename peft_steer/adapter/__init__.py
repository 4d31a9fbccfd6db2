"""The STEERING adapter type, shaped like PEFT's own tuners: ``config`` (SteeringConfig), ``layer`` (the per-block
hook), ``model`` (the BaseTuner), plus ``control`` (strength, direction, vectors at run time), ``context`` (the
run-time state of each thread or asyncio task: strengths and prompt ends), ``resolve`` (checking a config and its
vectors against a model), ``blocks`` (finding the decoder blocks of any architecture), ``merge`` (folding a vector
into a bias), ``card`` (the model card) and ``registry`` (registration with PEFT, and with transformers' own adapter
loading). ``_peft_compat`` holds every PEFT / transformers / torch internal the adapter touches.
"""

from .blocks import find_block_list, hidden_size_of
from .config import INITS, POSITIONS, STEERING, SteeringConfig
from .control import (
    get_multiplier,
    get_vectors,
    has_steering,
    prompt_lengths,
    set_multiplier,
    set_vectors,
    steering,
    steering_model,
)
from .layer import SteeringLayer
from .model import SteeringModel, check_vector, resolve_config
from .registry import MISSING_REGISTRATION, is_missing_registration, register

__all__ = [
    "INITS",
    "MISSING_REGISTRATION",
    "POSITIONS",
    "STEERING",
    "SteeringConfig",
    "SteeringLayer",
    "SteeringModel",
    "check_vector",
    "find_block_list",
    "get_multiplier",
    "get_vectors",
    "has_steering",
    "hidden_size_of",
    "is_missing_registration",
    "prompt_lengths",
    "register",
    "resolve_config",
    "set_multiplier",
    "set_vectors",
    "steering",
    "steering_model",
]
