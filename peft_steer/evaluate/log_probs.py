"""Summed completion log-probs of a causal LM, batched, with or without steering: what every scorer builds on."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..data.batches import pad_id_of, prompt_token_ids
from .scoring import scored_batches

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def completion_log_probs(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    completions: Sequence[str],
    batch_size: int = 32,
    *,
    progress: bool | str = False,
) -> torch.Tensor:
    """Summed log-probability of each completion given its prompt.

    The prompt is tokenized with the tokenizer's special tokens (e.g. BOS; one BOS even when the prompt text starts
    with it, ``peft_steer.data.batches.prompt_token_ids``), the completion without, and the two id
    lists are concatenated, so the boundary between them is exact. Rows are batched (sorted by length, padded on
    the right) and the result is returned in the input order.

    Args:
        model: A causal LM, or a PeftModel around one (a steering adapter with ``positions='completion'`` is told
            where each prompt ends).
        tokenizer: The model's tokenizer (a Hugging Face tokenizer; ``pad_token_id`` may be unset).
        prompts: One prompt per row.
        completions: One completion per row, scored token by token after its prompt. Include a leading space
            where the format needs one.
        batch_size: Rows per forward pass.
        progress: Show a tqdm bar; a string is used as its description.

    Returns:
        A float64 tensor of shape ``[len(prompts)]`` (per-token terms are summed in float64).
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")  # before tokenizing anything
    prompt_ids = [prompt_token_ids(tokenizer, p) for p in prompts]  # special tokens, one BOS
    completion_ids = completion_token_ids(tokenizer, completions)
    if any(len(ids) == 0 for ids in prompt_ids):
        raise ValueError("An empty prompt (no tokens, not even BOS) cannot condition a completion.")
    sequences = [p + c for p, c in zip(prompt_ids, completion_ids)]
    # Column t predicts column t + 1: the head runs on the columns that predict a completion token only.
    read = [(len(p) - 1, len(p) + len(c) - 1) for p, c in zip(prompt_ids, completion_ids)]
    return scored_batches(
        model,
        sequences,
        [len(p) for p in prompt_ids],
        read,
        _summed_log_probs,
        pad_id=pad_id_of(tokenizer),
        batch_size=batch_size,
        progress=progress,
        description="log-probs",
    )


def completion_token_ids(tokenizer: PreTrainedTokenizerBase, completions: Sequence[str]) -> list[list[int]]:
    """The token ids of each completion as `completion_log_probs` scores it: tokenized alone, without special
    tokens."""
    return [list(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in completions]


def _summed_log_probs(
    rows: list[int], input_ids: torch.Tensor, keep: torch.Tensor, logits: torch.Tensor
) -> torch.Tensor:
    # float64 from the logsumexp on keeps the sum of many per-token terms exact to float32 precision.
    selected = logits.float()
    targets = input_ids[:, 1:][keep[:, :-1]]
    token_log_probs = selected.gather(-1, targets[:, None]).squeeze(-1).double()
    token_log_probs = token_log_probs - torch.logsumexp(selected, dim=-1).double()
    row_of_token = torch.arange(keep.shape[0], device=keep.device)[:, None].expand_as(keep)[keep]
    return torch.zeros(keep.shape[0], dtype=torch.float64, device=keep.device).index_add_(
        0, row_of_token, token_log_probs
    )
