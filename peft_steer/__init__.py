"""peft-steer: BiPO steering vectors as a native PEFT adapter type.

``import peft_steer`` registers the ``STEERING`` adapter type with PEFT, so that ``get_peft_model``,
``PeftModel.from_pretrained``, ``AutoPeftModelForCausalLM`` and ``push_to_hub`` work with steering adapters, and
with transformers' own adapter loading: ``AutoModelForCausalLM.from_pretrained(adapter_folder)``,
``model.load_adapter(adapter_folder)`` and ``pipeline("text-generation", model=adapter_folder)``.

Subpackages: ``adapter`` (the PEFT tuner and its run-time control), ``data`` (preference data), ``evaluate`` (scores,
generation, CAA), ``interop`` (adapter files, official vectors, GGUF), ``organism`` (the tiny model that tests and
the demo steer). None of them imports TRL; ``trl_integration`` builds on this package.
"""

from .adapter import (
    MISSING_REGISTRATION,
    SteeringConfig,
    SteeringLayer,
    SteeringModel,
    get_multiplier,
    get_vectors,
    has_steering,
    is_missing_registration,
    prompt_lengths,
    register,
    set_multiplier,
    set_vectors,
    steering,
    steering_model,
)
from .adapter._peft_compat import quiet_optional_kernel_notices

register()
quiet_optional_kernel_notices()

__version__ = "0.1.0"

__all__ = [
    "MISSING_REGISTRATION",
    "SteeringConfig",
    "SteeringLayer",
    "SteeringModel",
    "get_multiplier",
    "get_vectors",
    "has_steering",
    "is_missing_registration",
    "prompt_lengths",
    "set_multiplier",
    "set_vectors",
    "steering",
    "steering_model",
]
