"""`recommend_strength` on synthetic cost curves: the largest |multiplier| on each side within the budget."""

from __future__ import annotations

import math

import pytest

from peft_steer.evaluate import DEFAULT_BUDGET, Cost, CostBudget, recommend_strength


def curve(drift: dict[float, float], perplexity: dict[float, float] | None = None, repetition=None) -> dict:
    """``{m: Cost}`` with the given drift (and perplexity 10, repetition 0 unless given)."""
    return {
        m: Cost(
            drift=d, perplexity=(perplexity or {}).get(m, 10.0), repetition=(repetition or {}).get(m, 0.0), answers=[]
        )
        for m, d in drift.items()
    }


def test_the_largest_strength_within_budget_on_each_side():
    costs = curve({-3: 0.9, -2: 0.45, -1: 0.1, 0: 0.0, 1: 0.2, 2: 0.5, 3: 0.51, 4: 2.0})
    found = recommend_strength(costs, CostBudget(max_drift=0.5))
    assert (found.raise_behavior, found.lower_behavior) == (2, -2)  # 0.5 itself is within
    assert found.stops == {
        "raise": "+3 breaks it: drift 0.51 > 0.5 nats",
        "lower": "-3 breaks it: drift 0.9 > 0.5 nats",
    }
    assert "+2 to raise the behavior" in found.summary() and "-2 to lower" in found.summary()


def test_a_side_that_never_breaks_the_budget_says_the_limit_lies_further_out():
    found = recommend_strength(curve({-2: 0.1, -1: 0.05, 0: 0.0, 1: 0.9}), CostBudget(max_drift=0.5))
    assert found.lower_behavior == -2 and "sweep further" in found.stops["lower"] and "-2" in found.stops["lower"]
    assert found.raise_behavior is None and found.stops["raise"].startswith("+1 breaks it")
    assert "sweep further" in found.summary()


def test_none_when_even_the_smallest_strength_breaks_the_budget():
    found = recommend_strength(curve({-1: 0.6, 0: 0.0, 1: 0.7, 2: 0.1}), CostBudget(max_drift=0.5))
    assert found.raise_behavior is None and found.lower_behavior is None
    assert "none to raise" in found.summary() and "none to lower" in found.summary()


def test_a_strength_past_one_over_budget_is_not_recommended():
    """Noise can make +3 look cheaper than +2; the user passes through +2 to get there."""
    found = recommend_strength(curve({0: 0.0, 1: 0.1, 2: 0.8, 3: 0.2}), CostBudget(max_drift=0.5))
    assert found.raise_behavior == 1 and found.lower_behavior is None and "lower" not in found.stops


def test_perplexity_and_repetition_against_the_unsteered_answers():
    costs = curve(
        {-2: 0.0, -1: 0.0, 0: 0.0, 1: 0.0, 2: 0.0},
        perplexity={-2: 14.0, -1: 15.0, 0: 10.0, 1: 15.1, 2: 12.0},
        repetition={-2: 0.35, -1: 0.29, 0: 0.2, 1: 0.2, 2: 0.2},
    )
    found = recommend_strength(costs, CostBudget(max_perplexity_ratio=1.5, max_repetition_increase=0.1))
    assert found.raise_behavior is None and "perplexity 15.1 > 15" in found.stops["raise"]
    assert found.lower_behavior == -1 and "repetition 0.35 > 0.3" in found.stops["lower"]
    off = recommend_strength(costs, CostBudget(max_perplexity_ratio=math.inf, max_repetition_increase=math.inf))
    assert (off.raise_behavior, off.lower_behavior) == (2, -2)
    assert off.budget.describe() == f"drift <= {DEFAULT_BUDGET.max_drift:g} nats"


def test_a_perplexity_of_no_token_is_not_within_budget():
    costs = curve({0: 0.0, 1: 0.0}, perplexity={0: 10.0, 1: math.nan})
    assert recommend_strength(costs).raise_behavior is None


def test_bad_budgets_and_no_reference_are_refused():
    with pytest.raises(ValueError, match="multiplier 0"):
        recommend_strength(curve({1: 0.0, -1: 0.0}))
    for limits in ({"max_drift": 0.0}, {"max_drift": math.nan}, {"max_perplexity_ratio": 0.9}):
        with pytest.raises(ValueError):
            CostBudget(**limits)


def test_the_default_drift_is_a_coin_flip_of_a_likely_token():
    """The documented reading of 0.5 nats: KL((0.5, 0.5) || (0.9, 0.1))."""
    kl = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert kl == pytest.approx(DEFAULT_BUDGET.max_drift, abs=0.02)
