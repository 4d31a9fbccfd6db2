"""CAA vectors (Rimsky et al. 2023): the mean activation difference between matching and non-matching answers.

The baseline BiPO is compared with, and an optional starting point for it (``SteeringConfig(init_vectors=...)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapter.blocks import find_block_list
from ..adapter.control import has_steering
from ..data.batches import pad_id_of, right_padded


def _inner_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel (its block list is what we hook)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@torch.no_grad()
def block_activations(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    answer_starts: Sequence[int],
    layer: int,
    position: Literal["last", "mean"] = "last",
    batch_size: int = 16,
    progress: bool | str = False,
) -> torch.Tensor:
    """Output of block ``layer`` for each text, at its last token or averaged over its answer tokens.

    ``answer_starts[i]`` is the token index where text ``i``'s answer begins (used by ``position='mean'``).
    Returns a float32 tensor ``[len(texts), hidden]``.
    """
    inner = _inner_model(model)
    _, blocks = find_block_list(inner)
    if not -len(blocks) <= layer < len(blocks):
        raise ValueError(f"layer={layer} is out of range for a model with {len(blocks)} decoder blocks.")
    captured: list[torch.Tensor] = []

    def capture(module, args, output):
        captured.append((output[0] if isinstance(output, tuple) else output).float())

    device = next(inner.parameters()).device
    rows = []
    handle = blocks[layer].register_forward_hook(capture)
    try:
        for start in tqdm(range(0, len(texts), batch_size), desc=progress or "", disable=not progress):
            batch = [tokenizer(text)["input_ids"] for text in texts[start : start + batch_size]]
            input_ids, mask = right_padded(batch, pad_id_of(tokenizer))
            captured.clear()
            inner(input_ids=input_ids.to(device), attention_mask=mask.to(device))
            hidden = captured[0].cpu()
            for row, ids in enumerate(batch):
                if position == "last":
                    rows.append(hidden[row, len(ids) - 1])
                else:
                    first = min(answer_starts[start + row], len(ids) - 1)
                    rows.append(hidden[row, first : len(ids)].mean(dim=0))
    finally:
        handle.remove()
    return torch.stack(rows)


def caa_vector(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    matching: Sequence[str],
    not_matching: Sequence[str],
    layer: int,
    position: Literal["last", "mean"] = "last",
    batch_size: int = 16,
    progress: bool = True,
) -> torch.Tensor:
    """CAA: ``mean_i [act_L(prompt_i + matching_i) - act_L(prompt_i + not_matching_i)]`` at block ``layer``.

    Args:
        model: A causal LM, or a PeftModel (its steering adapters are switched off while reading activations).
        tokenizer: Its tokenizer.
        prompts, matching, not_matching: The pairs; each answer is appended to its prompt as text.
        layer: The decoder block whose output is read (the block the vector will steer).
        position: ``"last"``: the answer's last token (CAA reads the answer-letter position, which is the last
            token in its A/B format); ``"mean"``: the mean over the answer's tokens.
        batch_size: Texts per forward pass.
        progress: Show a progress bar.

    Returns:
        A float32 vector of the hidden size, on the CPU.
    """
    if not (len(prompts) == len(matching) == len(not_matching)) or not prompts:
        raise ValueError("caa_vector needs the same, non-zero number of prompts, matching and not_matching answers.")
    starts = [len(tokenizer(prompt)["input_ids"]) for prompt in prompts]
    # read the unsteered model's activations
    base_only = model.disable_adapter() if has_steering(model) else nullcontext()
    with base_only:
        label = "CAA activations" if progress else False
        positive = block_activations(
            model, tokenizer, [p + a for p, a in zip(prompts, matching)], starts, layer, position, batch_size, label
        )
        negative = block_activations(
            model, tokenizer, [p + a for p, a in zip(prompts, not_matching)], starts, layer, position, batch_size, label
        )
    return (positive - negative).mean(dim=0)
