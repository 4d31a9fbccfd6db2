"""The answer-preference score of a model's behavior, with or without steering.

Answer preference: for a pair (question, matching, not_matching), the score is
``sigmoid(log p(matching | prompt) - log p(not_matching | prompt))`` with log-probs summed over the answer tokens;
the behavior score is its mean over the pairs. With ``multipliers`` it is measured once per steering strength,
through ``peft_steer.steering(model, multiplier=m)``.

This module must not import TRL: data flows from ``peft_steer`` to ``trl_integration``, never back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..adapter.control import has_steering, steering
from ..data.formats import plain_prompt
from .log_probs import completion_log_probs, completion_token_ids

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class Preference:
    """Answer preference at one steering strength.

    Attributes:
        score: Mean over pairs of ``sigmoid(margin)``: 1 always prefers the matching answer, 0 never.
        margin: Mean log-prob margin, ``log p(matching) - log p(not_matching)`` (summed over answer tokens).
        margins: The per-pair margins, float64 tensor ``[n]``.
        token_margins: The per-pair margins per answer token: the mean log-prob of a matching answer's tokens minus
            that of the not-matching answer's, float64 ``[n]``. Unlike the score it does not saturate where one answer
            is much longer or much likelier than the other.
    """

    score: float
    margin: float
    margins: torch.Tensor
    token_margins: torch.Tensor

    @property
    def token_margin(self) -> float:
        """Mean log-prob margin per answer token over the pairs (`token_margins`)."""
        return float(self.token_margins.mean())

    @property
    def n(self) -> int:
        """Number of pairs scored."""
        return int(self.margins.numel())


def _field(row: Mapping[str, str] | Sequence[str], name: str, index: int) -> str:
    return row[name] if isinstance(row, Mapping) else row[index]


def answer_preference(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    rows: Iterable[Mapping[str, str] | Sequence[str]],
    format_prompt: Callable[[str], str] = plain_prompt,
    multipliers: Iterable[float] | None = None,
    *,
    format_answer: Callable[[str], str] = lambda answer: " " + answer,
    batch_size: int = 32,
    progress: bool = True,
) -> dict[float | None, Preference]:
    """Mean answer preference (and mean log-prob margin) of ``model`` on preference pairs.

    Args:
        model: A causal LM or a PeftModel. With ``multipliers`` it must hold a steering adapter.
        tokenizer: The model's tokenizer.
        rows: Pairs as mappings with ``question``, ``matching`` and ``not_matching`` (e.g. rows of a behavior's
            ``test.csv``), or as ``(question, matching, not_matching)`` tuples.
        format_prompt: Question -> prompt text (e.g. ``functools.partial(organism.format_prompt, tag=TAG)``).
        multipliers: Steering strengths to measure at, each inside ``peft_steer.steering(model, multiplier=m)``;
            ``None`` measures the model as it is, once.
        format_answer: Answer -> completion text; by default the answer after one space.
        batch_size: Rows per forward pass.
        progress: Show a tqdm progress bar over the data.

    Returns:
        ``{m: Preference}`` for each multiplier in order, or ``{None: Preference}`` without multipliers (with the
        score, the mean margin and the mean margin per answer token).
    """
    rows = list(rows)
    if not rows:
        raise ValueError("answer_preference needs at least one (question, matching, not_matching) pair.")
    questions = [_field(row, "question", 0) for row in rows]
    prompts = [format_prompt(q) for q in questions]
    completions = [format_answer(_field(row, "matching", 1)) for row in rows]
    completions += [format_answer(_field(row, "not_matching", 2)) for row in rows]
    lengths = torch.tensor([max(len(ids), 1) for ids in completion_token_ids(tokenizer, completions)])
    strengths: list[float | None] = [None] if multipliers is None else [float(m) for m in multipliers]
    if multipliers is not None and not has_steering(model):
        raise ValueError("answer_preference(multipliers=...) needs a model with a steering adapter.")
    results: dict[float | None, Preference] = {}
    for m in strengths:
        context = nullcontext() if m is None else steering(model, multiplier=m)
        label = "answer preference" if m is None else f"answer preference m={m:+g}"
        with context:
            log_probs = completion_log_probs(
                model, tokenizer, prompts * 2, completions, batch_size=batch_size, progress=label if progress else False
            )
        margins = log_probs[: len(rows)] - log_probs[len(rows) :]
        per_token = log_probs / lengths  # an answer without a token (empty) counts as one: its log-prob is 0
        results[m] = Preference(
            score=float(torch.sigmoid(margins).mean()),
            margin=float(margins.mean()),
            margins=margins,
            token_margins=per_token[: len(rows)] - per_token[len(rows) :],
        )
    return results
