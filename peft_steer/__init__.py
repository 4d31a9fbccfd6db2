"""peft-steer: BiPO steering vectors as a native PEFT adapter type.

``import peft_steer`` registers the ``STEERING`` adapter type with PEFT, so that ``get_peft_model``,
``PeftModel.from_pretrained``, ``AutoPeftModelForCausalLM`` and ``push_to_hub`` work with steering adapters.
"""

from .config import SteeringConfig
from .control import (
    get_multiplier,
    get_vectors,
    prompt_lengths,
    set_multiplier,
    set_vectors,
    steering,
    steering_model,
)
from .layer import SteeringLayer
from .model import SteeringModel
from .registry import MISSING_REGISTRATION, is_missing_registration, register

register()

__version__ = "0.1.0"

__all__ = [
    "MISSING_REGISTRATION",
    "SteeringConfig",
    "SteeringLayer",
    "SteeringModel",
    "get_multiplier",
    "get_vectors",
    "is_missing_registration",
    "prompt_lengths",
    "set_multiplier",
    "set_vectors",
    "steering",
    "steering_model",
]
