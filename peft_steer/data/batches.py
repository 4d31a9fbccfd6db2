"""Prompt text to token ids (one BOS), and token id lists to the right-padded tensors a causal LM takes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def pad_id_of(tokenizer: Any, fallback: int | None = 0) -> int | None:
    """The tokenizer's pad id, or ``fallback`` (padded positions are masked out, so any id does)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else fallback


def prompt_token_ids(tokenizer: Any, text: str) -> list[int]:
    """Ids of ``text`` as the model sees it: with the tokenizer's special tokens (e.g. BOS), but one BOS only.

    A chat template that writes the BOS as text (``"<s>[INST] ..."``, Phi-3's ``"<s><|user|>"``) and a tokenizer that
    adds BOS itself would give ``<s> <s>``; the added one is dropped. Every scorer tokenizes its prompts here.
    """
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    bos_text, bos_id = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "bos_token_id", None)
    if not bos_text or bos_id is None or not text.startswith(bos_text) or ids[:2] != [bos_id, bos_id]:
        return ids
    # Drop one only if the tokenizer added it: the text's own BOS (one, or more if it writes more) are kept.
    own = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids[1:] if _leading(ids, bos_id) > _leading(own, bos_id) else ids


def _leading(ids: Sequence[int], token: int) -> int:
    """How many times ``ids`` starts with ``token``."""
    count = 0
    while count < len(ids) and ids[count] == token:
        count += 1
    return count


def right_padded(id_lists: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both ``[len(id_lists), longest]`` long tensors, padded on the right."""
    width = max(len(ids) for ids in id_lists)
    input_ids = torch.full((len(id_lists), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(id_lists), width), dtype=torch.long)
    for row, ids in enumerate(id_lists):
        input_ids[row, : len(ids)] = torch.tensor(list(ids), dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask
