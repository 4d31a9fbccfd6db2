"""The ``vllm.general_plugins`` entry point: vLLM calls `register` in each of its processes before loading a model."""

from __future__ import annotations


def register() -> None:
    """Make load format ``peft_steer`` known to vLLM (the loader that installs the steering hooks)."""
    from ._vllm_compat import register_model_loader
    from .config import LOAD_FORMAT
    from .loader import SteeringModelLoader

    register_model_loader(LOAD_FORMAT)(SteeringModelLoader)
