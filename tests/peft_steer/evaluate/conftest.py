"""A fake LM that records what it is given and puts all its mass where a test says (the real tokenizers are the
session fixtures of tests/conftest.py)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn


def first_difference(a: list[int], b: list[int]) -> int:
    """The first index where two id lists differ (written here independently of the code under test)."""
    return next(k for k, (x, y) in enumerate(zip(a, b)) if x != y)


class RecordingLM(nn.Module):
    """A fake causal LM over ``vocab`` ids that records each ``input_ids`` it is given.

    Its logits put all the mass on ``default`` at every position, except at position ``len(prefix) - 1`` of a row
    that starts with a key ``prefix`` of ``targets``, where the mass is on ``targets[prefix]``.
    """

    def __init__(self, vocab: int, default: int = 0, targets: dict[tuple[int, ...], int] | None = None) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # a parameter, so that callers find the model's device
        self.vocab, self.default, self.targets = vocab, default, targets or {}
        self.seen: list[torch.Tensor] = []

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        self.seen.append(input_ids.clone())
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.default] = 50.0
        for row, ids in enumerate(input_ids.tolist()):
            for prefix, target in self.targets.items():
                if tuple(ids[: len(prefix)]) == prefix:
                    logits[row, len(prefix) - 1] = 0.0
                    logits[row, len(prefix) - 1, target] = 50.0
        return SimpleNamespace(logits=logits)
