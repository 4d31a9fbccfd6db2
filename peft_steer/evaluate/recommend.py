"""The recommended strength: the largest ``|multiplier|`` on each side whose cost stays within a budget stated
against the unsteered model (multiplier 0), from the costs of `steering_costs`.

A positive multiplier raises the behavior, a negative one lowers it, so each side gets its own answer. Walking out
from 0, the recommendation on a side is the last strength before the first one over budget: a strength past one that
already broke the budget is not trusted even where its own measured cost is lower (few prompts make the costs noisy,
and a user turning the strength up passes through the broken one).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from .costs import Cost

__all__ = ["DEFAULT_BUDGET", "CostBudget", "Recommendation", "recommend_strength"]


@dataclass(frozen=True)
class CostBudget:
    """How much a strength may cost against the unsteered model; ``math.inf`` turns a limit off.

    Attributes:
        max_drift: The largest drift (mean next-token KL against multiplier 0, nats). 0.5 nats is about what
            turning a next token the unsteered model gives 0.9 into a coin flip costs (``KL((0.5, 0.5) || (0.9,
            0.1)) = 0.51``), on average over the off-target prompts.
        max_perplexity_ratio: The steered answers' perplexity under the unsteered model at most this many times
            the unsteered answers' (1.5: half as surprising again).
        max_repetition_increase: The steered answers' repetition (share of repeated 4-grams) at most this much above
            the unsteered answers' (0.1: an answer starting to loop).
    """

    max_drift: float = 0.5
    max_perplexity_ratio: float = 1.5
    max_repetition_increase: float = 0.1

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not value > 0:  # also NaN
                raise ValueError(f"{name} must be above 0 (math.inf turns the limit off), got {value!r}.")
        if not self.max_perplexity_ratio >= 1:
            raise ValueError(
                f"max_perplexity_ratio must be at least 1 (the unsteered model's), got {self.max_perplexity_ratio}."
            )

    def exceeded(self, cost: Cost, unsteered: Cost) -> list[str]:
        """The limits ``cost`` breaks against ``unsteered``, each as text (``"drift 0.83 > 0.5 nats"``); empty when
        it is within budget. A NaN cost (a perplexity of answers with no token) breaks its limit: it cannot be shown
        to be within."""
        broken = []
        if not cost.drift <= self.max_drift:
            broken.append(f"drift {cost.drift:.3g} > {self.max_drift:g} nats")
        if not math.isinf(self.max_perplexity_ratio):
            limit = self.max_perplexity_ratio * unsteered.perplexity
            if not cost.perplexity <= limit:
                broken.append(f"perplexity {cost.perplexity:.3g} > {limit:.3g}")
        if not math.isinf(self.max_repetition_increase):
            limit = unsteered.repetition + self.max_repetition_increase
            if not cost.repetition <= limit:
                broken.append(f"repetition {cost.repetition:.3g} > {limit:.3g}")
        return broken

    def describe(self) -> str:
        """The budget in one line, as the command line and the model card state it."""
        parts = []
        if not math.isinf(self.max_drift):
            parts.append(f"drift <= {self.max_drift:g} nats")
        if not math.isinf(self.max_perplexity_ratio):
            parts.append(f"perplexity <= {self.max_perplexity_ratio:g} x the unsteered model's")
        if not math.isinf(self.max_repetition_increase):
            parts.append(f"repetition <= the unsteered model's + {self.max_repetition_increase:g}")
        return ", ".join(parts) or "no limit"


DEFAULT_BUDGET = CostBudget()


@dataclass
class Recommendation:
    """The recommended strength on each side, and why each side stops where it does.

    Attributes:
        raise_behavior: The largest positive multiplier within budget (None: even the smallest one measured breaks
            it, or none was measured).
        lower_behavior: The negative multiplier of largest ``|m|`` within budget (None likewise).
        stops: ``{"raise" | "lower": text}``: the first strength over budget on that side and the limits it breaks,
            or, when every strength measured on that side is within budget, that the limit lies further out (absent
            when no strength was measured on that side).
        budget: The budget applied.
    """

    raise_behavior: float | None
    lower_behavior: float | None
    budget: CostBudget = DEFAULT_BUDGET
    stops: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """The recommendation in one line: both sides and the budget."""
        sides = []
        for side, value in (("raise", self.raise_behavior), ("lower", self.lower_behavior)):
            text = f"{value:+g} to {side} the behavior" if value is not None else f"none to {side} the behavior"
            if side in self.stops:
                text += f" ({self.stops[side]})"
            sides.append(text)
        return f"recommended strength: {'; '.join(sides)}; budget: {self.budget.describe()}"


def recommend_strength(costs: Mapping[float, Cost], budget: CostBudget = DEFAULT_BUDGET) -> Recommendation:
    """The largest ``|multiplier|`` on each side of 0 whose cost stays within ``budget``.

    Args:
        costs: ``{m: Cost}`` as `steering_costs` returns it; multiplier 0 (the unsteered model, the reference of the
            budget) must be among them.
        budget: The limits, against the unsteered model.

    Returns:
        A `Recommendation`: on each side, walking out from 0, the last strength before the first one over budget
        (None when the first one already is).
    """
    unsteered = costs.get(0.0)
    if unsteered is None:
        raise ValueError("recommend_strength needs the cost at multiplier 0: the unsteered model, the reference.")
    found: dict[str, float | None] = {}
    stops = {}
    for side, sign in (("raise", 1.0), ("lower", -1.0)):
        found[side] = None
        for m in sorted((m for m in costs if m * sign > 0), key=abs):
            broken = budget.exceeded(costs[m], unsteered)
            if broken:
                stops[side] = f"{m:+g} breaks it: {', '.join(broken)}"
                break
            found[side] = m
        if side not in stops and found[side] is not None:  # the limit lies beyond the range measured
            stops[side] = f"no strength measured breaks it; {found[side]:+g} is the largest measured: sweep further"
    return Recommendation(found["raise"], found["lower"], budget, stops)
