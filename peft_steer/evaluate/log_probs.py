"""Summed completion log-probs of a causal LM, batched, with or without steering: what every scorer builds on."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapter._peft_compat import logits_at
from ..adapter.control import has_steering, prompt_lengths
from ..data.batches import pad_id_of, prompt_token_ids, right_padded

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without parameters)."""
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@torch.no_grad()
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
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    prompt_ids = [prompt_token_ids(tokenizer, p) for p in prompts]  # special tokens, one BOS
    completion_ids = [list(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in completions]
    if any(len(ids) == 0 for ids in prompt_ids):
        raise ValueError("An empty prompt (no tokens, not even BOS) cannot condition a completion.")
    pad_id = pad_id_of(tokenizer)
    device = model_device(model)
    steered = has_steering(model)
    order = sorted(range(len(prompts)), key=lambda i: len(prompt_ids[i]) + len(completion_ids[i]))
    result = torch.zeros(len(prompts), dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        starts = range(0, len(order), batch_size)
        description = progress if isinstance(progress, str) else "log-probs"
        for start in tqdm(starts, desc=description, disable=not progress, leave=False):
            rows = order[start : start + batch_size]
            input_ids, attention = right_padded([prompt_ids[i] + completion_ids[i] for i in rows], pad_id)
            scored = torch.zeros_like(attention, dtype=torch.bool)  # positions holding a completion token
            for r, i in enumerate(rows):
                scored[r, len(prompt_ids[i]) : len(prompt_ids[i]) + len(completion_ids[i])] = True
            boundary = torch.tensor([len(prompt_ids[i]) for i in rows])
            context = prompt_lengths(model, boundary.to(device)) if steered else nullcontext()
            # The LM head runs only on the positions that predict a completion token (column t predicts column
            # t + 1); float64 from the logsumexp on keeps the sum of many per-token terms exact to float32 precision.
            predicting = scored[:, 1:].to(device)
            keep = torch.nn.functional.pad(predicting, (0, 1))
            with context:
                selected = logits_at(model, input_ids.to(device), attention.to(device), keep).float()
            targets = input_ids[:, 1:].to(device)[predicting]
            token_log_probs = selected.gather(-1, targets[:, None]).squeeze(-1).double()
            token_log_probs = token_log_probs - torch.logsumexp(selected, dim=-1).double()
            row_of_token = torch.arange(len(rows), device=device)[:, None].expand_as(predicting)[predicting]
            sums = torch.zeros(len(rows), dtype=torch.float64, device=device).index_add_(
                0, row_of_token, token_log_probs
            )
            result[rows] = sums.cpu()
    finally:
        model.train(was_training)
    return result
