"""FSDP and DeepSpeed ZeRO: which engine a run uses, what SteerTrainer supports, and the vector under sharding.

A steering vector is one small parameter owned by the `SteeringModel`, outside the decoder blocks, and read by a hook
of block L. The engines handle it as follows (checked in `tests/trl_integration/test_sharding.py` on 2 CPU processes,
on the engines themselves, since `accelerate` starts FSDP and DeepSpeed only on accelerators):

- FSDP2 (`fully_shard`): the vector belongs to the root group, which is gathered for the whole forward, so the
  hook sees it whole; it is a `DTensor` outside the forward. FSDP1 is refused: it flattens each unit's parameters
  into one tensor of one dtype, which the float32 vector on a bf16 model breaks, and it cannot run on a CPU to test.
- DeepSpeed ZeRO-3: the vector is partitioned like any parameter and gathered on use; registering it as an
  external parameter of block L makes that explicit, as DeepSpeed asks for parameters used outside their module.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from accelerate.utils import parse_flag_from_env
from torch import nn


def sharding_engine(args: Any) -> str | None:
    """ "FSDP", "DeepSpeed" or ``None``: from the training arguments, or the variables `accelerate launch` sets."""
    if getattr(args, "deepspeed", None) or parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        return "DeepSpeed"
    if getattr(args, "fsdp", None) or parse_flag_from_env("ACCELERATE_USE_FSDP"):
        return "FSDP"
    return None


def check_sharding(args: Any) -> None:
    """Refuse FSDP1 with an error that says what to change; FSDP2 and DeepSpeed (any ZeRO stage) pass."""
    if sharding_engine(args) != "FSDP":
        return
    plugin_args = getattr(args, "fsdp_plugin_args", None)
    if plugin_args is not None:
        version, where = int(plugin_args.get("fsdp_version", 1)), "fsdp_config={'version': 2}"
    else:
        version, where = int(os.environ.get("FSDP_VERSION", "1")), "fsdp_version: 2 in the accelerate config"
    if version != 2:
        raise NotImplementedError(
            f"SteerTrainer supports FSDP2, not FSDP{version}: set {where} "
            "(examples/accelerate/fsdp.yaml). FSDP1 flattens each unit's parameters into one tensor of one dtype, "
            "and the steering vector stays float32 on a bf16 model."
        )


def register_with_zero3(blocks: nn.ModuleList, vectors: nn.ParameterDict) -> None:
    """Under ZeRO-3, declare each vector a parameter of the block whose output it moves (DeepSpeed gathers a
    module's own parameters before its forward; the vector belongs to the SteeringModel, not to the block)."""
    import deepspeed  # only under DeepSpeed, which is not a dependency

    for block, vector in vectors.items():
        deepspeed.zero.register_external_parameter(blocks[int(block)], vector)


@contextmanager
def gathered(parameters: list[nn.Parameter]) -> Iterator[list[torch.Tensor]]:
    """Whole copies of ``parameters`` on every rank, however they are sharded (a collective: call on every rank).

    FSDP2 parameters are `DTensor` s. ZeRO-3 parameters are partitioned; a trained one is read from the optimizer's
    float32 master copy (under bf16 the parameter itself is a bf16 copy of it), others are gathered as they are.
    """
    if any(hasattr(parameter, "ds_id") for parameter in parameters):
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        masters = [safe_get_full_fp32_param(parameter) for parameter in parameters]
        with deepspeed.zero.GatheredParameters(parameters):
            yield [
                master if master is not None else parameter.detach().clone()
                for master, parameter in zip(masters, parameters)
            ]
        return
    yield [
        parameter.full_tensor().detach() if hasattr(parameter, "full_tensor") else parameter.detach()
        for parameter in parameters
    ]
