"""Every place that relies on how accelerate works inside (checked against accelerate 1.15), so that a change there
shows up in one module."""

from __future__ import annotations

from typing import Any

from torch import nn

# The process types on which `AcceleratorState.__init__` (accelerate/state.py) turns an FSDP config into FSDP;
# accelerate exposes no such list.
FSDP_PROCESS_TYPES = frozenset(
    {"MULTI_GPU", "MULTI_MLU", "MULTI_SDAA", "MULTI_MUSA", "MULTI_NPU", "MULTI_XPU", "MULTI_HPU", "MULTI_NEURON"}
)


def has_offload_hook(module: nn.Module) -> bool:
    """Whether accelerate's hooks (`cpu_offload`, `device_map` dispatch) move this module's weights in and out."""
    return hasattr(module, "_hf_hook")


def deepspeed_zero_stage(accelerator: Any) -> int | None:
    """The ZeRO stage of a DeepSpeed run, or ``None`` without DeepSpeed."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return None if plugin is None else plugin.zero_stage
