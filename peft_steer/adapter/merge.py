"""Folding steering vectors into an output bias of their block, for serving engines that load plain checkpoints.

A block's output is ``residual + attention + mlp``; where the MLP's output projection has a bias and nothing follows
it but the residual add, adding ``m * v`` to that bias adds exactly ``m * v`` to the block's output. Verified
architectures (tests/peft_steer/adapter/test_merge.py compares merged and steered logits):

- Llama-family configs with ``mlp_bias=True``: ``mlp.down_proj.bias``;
- GPT-2: ``mlp.c_proj.bias`` (present in every GPT-2);
- GPT-NeoX: ``mlp.dense_4h_to_h.bias`` (present in every GPT-NeoX; parallel residual or not).

Others are refused: Gemma2 normalises the MLP output after the projection, Mistral, Qwen2 and Phi3 have no MLP bias.
"""

from __future__ import annotations

import torch
from torch import nn

OUTPUT_BIAS = {"llama": "mlp.down_proj", "gpt2": "mlp.c_proj", "gpt_neox": "mlp.dense_4h_to_h"}


def output_bias(model: nn.Module, blocks_path: str, block: int) -> nn.Parameter:
    """The bias that adds to block ``block``'s output, or a clear error when the architecture has none."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in OUTPUT_BIAS:
        raise ValueError(
            f"merge_and_unload() cannot fold a steering vector into a {model_type!r} model exactly: it works for "
            f"{sorted(OUTPUT_BIAS)} (Llama only with mlp_bias=True). Keep the adapter attached instead."
        )
    name = f"{blocks_path}.{block}.{OUTPUT_BIAS[model_type]}"
    bias = getattr(model.get_submodule(name), "bias", None)
    if bias is None:
        hint = " (the config has mlp_bias=False)" if model_type == "llama" else ""
        raise ValueError(f"merge_and_unload(): {name} has no bias{hint}, so block {block} has no output bias.")
    return bias


def fold_into_biases(model: nn.Module, blocks_path: str, deltas: dict[int, torch.Tensor]) -> None:
    """Add ``deltas[block]`` to each block's output bias; every bias is found before any is changed."""
    biases = {block: output_bias(model, blocks_path, block) for block in deltas}
    with torch.no_grad():
        for block, delta in deltas.items():
            bias = biases[block]
            bias.add_(delta.to(bias.device, bias.dtype))
