"""The batched forward every scorer runs: eval mode, rows sorted by length and padded on the right, each row told
where its prompt ends, and the LM head run on the positions that are read only."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapter._peft_compat import takes_logits_mask
from ..adapter.control import has_steering, prompt_lengths
from ..data.batches import right_padded

__all__ = ["eval_mode", "logits_at", "model_device", "scored_batches"]

# score(rows, input_ids, keep, logits) -> one row of scores per sequence of the batch (see `scored_batches`).
Score = Callable[[list[int], torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without parameters)."""
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode for the time of the block, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def logits_at(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: torch.Tensor
) -> torch.Tensor:
    """The logits of the positions that ``keep`` (bool, ``[rows, width]``) marks, ``[kept, vocab]`` in row-major
    order, with the LM head run on those positions only where the model allows it (`takes_logits_mask`); other
    models project every position and the positions are picked from their logits."""
    extra = {"logits_to_keep": keep} if takes_logits_mask(model) else {}
    logits = model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits
    return logits[keep] if logits.shape[:-1] == keep.shape else logits


@torch.no_grad()
def scored_batches(
    model: nn.Module,
    sequences: Sequence[Sequence[int]],
    prompt_ends: Sequence[int],
    read: Sequence[tuple[int, int]],
    score: Score,
    *,
    columns: int = 0,
    pad_id: int = 0,
    batch_size: int = 16,
    progress: bool | str = False,
    description: str = "scoring",
) -> torch.Tensor:
    """``score`` of every sequence, batched, as one float64 tensor ``[len(sequences), *columns]`` in input order.

    Sequences are sorted by length (less padding) and padded on the right with ``pad_id`` (masked, never read). A
    steering adapter with ``positions='completion'`` is told that sequence ``i``'s prompt ends at ``prompt_ends[i]``.
    The LM head runs on the columns ``read[i] = (first, end)`` of each row only. ``score(rows, input_ids, keep,
    logits)`` gets the indices of the batch's sequences, the batch on the model's device, the ``[rows, width]``
    bool mask of the columns read, and their logits ``[kept, vocab]`` in row-major order; it returns ``[rows]``
    (``columns=0``) or ``[rows, columns]`` scores. The model runs in eval mode and goes back to its own mode after.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    device = model_device(model)
    steered = has_steering(model)
    result = torch.zeros(len(sequences), *([columns] if columns else []), dtype=torch.float64)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    starts = range(0, len(order), batch_size)
    label = progress if isinstance(progress, str) else description
    with eval_mode(model):
        for start in tqdm(starts, desc=label, disable=not progress, leave=False):
            rows = order[start : start + batch_size]
            input_ids, attention = right_padded([sequences[i] for i in rows], pad_id)
            keep = torch.zeros_like(attention, dtype=torch.bool)
            for r, i in enumerate(rows):
                keep[r, read[i][0] : read[i][1]] = True
            ends = torch.tensor([prompt_ends[i] for i in rows], device=device)
            input_ids, attention, keep = input_ids.to(device), attention.to(device), keep.to(device)
            with prompt_lengths(model, ends) if steered else nullcontext():
                logits = logits_at(model, input_ids, attention, keep)
            result[rows] = score(rows, input_ids, keep, logits).double().cpu()
    return result
