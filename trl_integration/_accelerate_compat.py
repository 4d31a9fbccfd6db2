"""Every place that relies on how accelerate and DeepSpeed work inside (checked against accelerate 1.15), so that a
change there shows up in one module."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = [
    "FSDP_PROCESS_TYPES",
    "accelerate_starts_fsdp",
    "deepspeed_master",
    "deepspeed_zero_stage",
    "has_offload_hook",
    "is_zero3_parameter",
    "register_external_parameter",
    "zero3_gathered",
]

# The process types on which `AcceleratorState.__init__` (accelerate/state.py) turns an FSDP config into FSDP;
# accelerate exposes no such list.
FSDP_PROCESS_TYPES = frozenset(
    {"MULTI_GPU", "MULTI_MLU", "MULTI_SDAA", "MULTI_MUSA", "MULTI_NPU", "MULTI_XPU", "MULTI_HPU", "MULTI_NEURON"}
)


def accelerate_starts_fsdp(args: Any) -> bool:
    """Whether accelerate starts FSDP for these processes: only for launched processes on accelerators, not for CPU
    processes, nor a single process started without a launcher."""
    state = getattr(args, "distributed_state", None)  # set up by TrainingArguments.__post_init__
    return state is not None and state.distributed_type.value in FSDP_PROCESS_TYPES


def has_offload_hook(module: nn.Module) -> bool:
    """Whether accelerate's hooks (`cpu_offload`, `device_map` dispatch) move this module's weights in and out."""
    return hasattr(module, "_hf_hook")


def deepspeed_zero_stage(accelerator: Any) -> int | None:
    """The ZeRO stage of a DeepSpeed run, or ``None`` without DeepSpeed."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return None if plugin is None else plugin.zero_stage


# ---- DeepSpeed (not a dependency: imported only where a run uses it) -----------------------------------------------


def is_zero3_parameter(parameter: nn.Parameter) -> bool:
    """Whether ZeRO-3 manages ``parameter`` (it marks its parameters with ``ds_id``)."""
    return hasattr(parameter, "ds_id")


def register_external_parameter(module: nn.Module, parameter: nn.Parameter) -> None:
    """Under ZeRO-3, gather ``parameter`` with ``module`` before its forward (it is another module's parameter)."""
    import deepspeed

    deepspeed.zero.register_external_parameter(module, parameter)


@contextmanager
def zero3_gathered(parameters: list[nn.Parameter]) -> Iterator[None]:
    """ZeRO-3 partitioned ``parameters`` whole on every rank for the time of the block (a collective)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(parameters):
        yield


def deepspeed_master(parameter: nn.Parameter) -> torch.Tensor | None:
    """The float32 master copy DeepSpeed's optimizer keeps of ``parameter`` (ZeRO-3: ``ds_id``; ZeRO-1/2 in bf16:
    ``_hp_mapping``), or ``None`` for a parameter DeepSpeed does not manage or no optimizer holds."""
    if not is_zero3_parameter(parameter) and getattr(parameter, "_hp_mapping", None) is None:
        return None
    from deepspeed.utils import safe_get_full_fp32_param

    try:
        return safe_get_full_fp32_param(parameter)
    except AttributeError:  # ZeRO-3 without an optimizer (an inference engine): no master copy
        return None
