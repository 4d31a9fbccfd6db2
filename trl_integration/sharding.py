"""FSDP and DeepSpeed ZeRO: which engine a run uses, what SteerTrainer supports, and the vector under sharding.

A steering vector is one small parameter owned by the `SteeringModel`, outside the decoder blocks, and read by a hook
of block L. The engines handle it as follows (checked on 2 CPU processes, on the engines themselves in
`tests/trl_integration/test_sharding.py`, and through `accelerate launch` and the Trainer in
`test_accelerate_launch.py`):

- FSDP2 (`fully_shard`): the vector belongs to the root unit, which is gathered for the whole forward, so the
  hook sees it whole; it is a `DTensor` outside the forward. FSDP1 is refused: it flattens each unit's parameters
  into one tensor of one dtype, which the float32 vector on a bf16 model breaks, and it cannot run on a CPU to test.
- DeepSpeed ZeRO-3: a vector below `stage3_param_persistence_threshold` (10 x hidden size by default) stays whole on
  every rank. A partitioned one is gathered only with the module that owns it, and the `ParameterDict` holding it
  never runs a forward: registered as an external parameter of block L, it is gathered for that block.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from accelerate.utils import parse_flag_from_env
from torch import nn

from ._accelerate_compat import (
    accelerate_starts_fsdp,
    deepspeed_master,
    is_zero3_parameter,
    register_external_parameter,
    zero3_gathered,
)

logger = logging.getLogger(__name__)


def sharding_engine(args: Any) -> str | None:
    """The engine that shards this run, "FSDP" or "DeepSpeed", or ``None``: from the training arguments, or from the
    variables `accelerate launch` sets from its config file.

    FSDP counts only where accelerate starts it (`accelerate_starts_fsdp`); elsewhere, on CPUs say, accelerate runs an
    FSDP config as plain data parallelism (every rank holds the whole model), and so does the trainer. DeepSpeed runs
    on CPUs too (with `use_cpu=True`), as the tests do.
    """
    if getattr(args, "deepspeed", None) or parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        return "DeepSpeed"
    if _fsdp_configured(args) and accelerate_starts_fsdp(args):
        return "FSDP"
    return None


def _fsdp_configured(args: Any) -> bool:
    return bool(getattr(args, "fsdp", None)) or parse_flag_from_env("ACCELERATE_USE_FSDP")


def check_sharding(args: Any) -> str | None:
    """The engine that shards this run (`sharding_engine`), after refusing FSDP1 with an error that says what to
    change; FSDP2 and DeepSpeed (any ZeRO stage) pass. An FSDP config that accelerate does not start is logged."""
    engine = sharding_engine(args)
    if engine is None and _fsdp_configured(args):
        logger.warning(
            "FSDP is configured, but accelerate does not start it for these processes (CPU processes, or one process "
            "without a launcher): the run is plain data parallelism, every rank holding the whole model."
        )
    if engine != "FSDP":
        return engine
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
    return engine


def register_with_zero3(blocks: nn.ModuleList, vectors: nn.ParameterDict) -> None:
    """Under ZeRO-3, declare each vector a parameter of the block whose output it moves (DeepSpeed gathers a
    module's own parameters before its forward; the vector belongs to the SteeringModel, not to the block)."""
    for block, vector in vectors.items():
        register_external_parameter(blocks[int(block)], vector)


@contextmanager
def gathered(parameters: list[nn.Parameter]) -> Iterator[list[torch.Tensor]]:
    """Whole copies of ``parameters`` on every rank, however they are sharded (a collective: call it on every rank).

    FSDP2 parameters are `DTensor` s. Under DeepSpeed (ZeRO-3 partitions, and in bf16 every stage keeps the weights
    in bf16) a trained parameter is read from the optimizer's float32 master copy; one without it is gathered as it is.
    """
    masters = [deepspeed_master(parameter) for parameter in parameters]
    if any(is_zero3_parameter(parameter) for parameter in parameters):
        with zero3_gathered(parameters):
            yield [
                master if master is not None else parameter.detach().clone()
                for master, parameter in zip(masters, parameters)
            ]
        return
    yield [
        master
        if master is not None
        else parameter.full_tensor().detach()
        if hasattr(parameter, "full_tensor")
        else parameter.detach()
        for master, parameter in zip(masters, parameters)
    ]
