"""`peft-steer eval`'s behavior scores: the score at each strength, and beside it the readings of the same margins
that do not saturate (margin per answer token, share of pairs moved up against multiplier 0)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from peft_steer.evaluate import ab_margins, answer_preference, saturation_warning, share_moved_up

SCORE_NAMES = {"ab": "A/B score", "preference": "preference"}
LEGEND = (
    "mean margin: log p(matching) - log p(other); margin/token: the same per answer token; share up: pairs whose "
    "margin is above the unsteered model's (ties half, 0.5 = unmoved). The last two do not saturate."
)


@dataclass
class Margins:
    """Per-row margins at one strength; ``per_token`` is None for the A/B score (its answer is one token)."""

    margins: torch.Tensor
    per_token: torch.Tensor | None


@dataclass
class BehaviorScores:
    """The behavior score and its unsaturated readings at each shown multiplier, and the unsteered reference."""

    metric: str
    by_multiplier: dict[float, Margins]
    reference: Margins  # at multiplier 0: the unsteered model

    def columns(self) -> dict[str, dict[float, float]]:
        """``{column: {multiplier: value}}`` for `score_table`: the score, the mean margin, the margin per answer
        token (answer preference only) and the share of rows moved up."""
        columns = {
            SCORE_NAMES[self.metric]: {m: score_of(r.margins) for m, r in self.by_multiplier.items()},
            "mean margin": {m: float(r.margins.mean()) for m, r in self.by_multiplier.items()},
        }
        if self.reference.per_token is not None:
            columns["margin/token"] = {m: float(r.per_token.mean()) for m, r in self.by_multiplier.items()}
        columns["share up"] = {m: self.share_up(r) for m, r in self.by_multiplier.items()}
        return columns

    def share_up(self, measured: Margins) -> float:
        """The share of rows whose margin in ``measured`` is above the unsteered model's."""
        return share_moved_up(measured.margins, self.reference.margins)

    @property
    def unsteered(self) -> float:
        """The behavior score at multiplier 0."""
        return score_of(self.reference.margins)

    def warning(self) -> str | None:
        """One line when the unsteered score is too close to 0 or 1 to move."""
        return saturation_warning(self.unsteered, SCORE_NAMES[self.metric])


def keyed(values: dict[float, float]) -> dict[str, float | None]:
    """``{m: value}`` keyed as the JSON report's ``"scores"`` is, NaN as null (JSON has no NaN)."""
    return {str(float(m)): None if math.isnan(value) else value for m, value in values.items()}


def score_of(margins: torch.Tensor) -> float:
    """The behavior score of per-row margins: the mean of their sigmoids (both metrics)."""
    return float(torch.sigmoid(margins).mean())


def margins_at(
    model: Any,
    tokenizer: Any,
    metric: str,
    rows: Sequence[Any],
    multipliers: Sequence[float],
    format_ab: Callable[[Any], str] | None,
    batch_size: int,
) -> dict[float, Margins]:
    """``{m: Margins}``: A/B rows through ``format_ab``, or (prompt, chosen, rejected) rows as they are."""
    if metric == "ab":
        found = ab_margins(model, tokenizer, rows, multipliers, format_prompt=format_ab, batch_size=batch_size)
        return {m: Margins(margins, None) for m, margins in found.items()}
    results = answer_preference(
        model, tokenizer, rows, lambda prompt: prompt, multipliers, format_answer=lambda a: a, batch_size=batch_size
    )
    return {m: Margins(result.margins, result.token_margins) for m, result in results.items()}


def behavior_scores(
    model: Any,
    tokenizer: Any,
    metric: str,
    rows: Sequence[Any],
    multipliers: Sequence[float],
    format_ab: Callable[[Any], str] | None,
    batch_size: int,
) -> BehaviorScores:
    """The scores at ``multipliers``, and at multiplier 0 (measured once more when not among them)."""
    strengths = list(multipliers) + ([] if 0.0 in multipliers else [0.0])
    found = margins_at(model, tokenizer, metric, rows, strengths, format_ab, batch_size)
    return BehaviorScores(metric, {m: found[m] for m in multipliers}, found[0.0])
