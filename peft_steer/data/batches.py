"""Token id lists to the right-padded tensors a causal LM takes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def pad_id_of(tokenizer: Any, fallback: int | None = 0) -> int | None:
    """The tokenizer's pad id, or ``fallback`` (padded positions are masked out, so any id does)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else fallback


def right_padded(id_lists: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both ``[len(id_lists), longest]`` long tensors, padded on the right."""
    width = max(len(ids) for ids in id_lists)
    input_ids = torch.full((len(id_lists), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(id_lists), width), dtype=torch.long)
    for row, ids in enumerate(id_lists):
        input_ids[row, : len(ids)] = torch.tensor(list(ids), dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask
