"""`peft-steer eval`'s costs (and `sweep`'s): what each strength costs the model against multiplier 0, measured on the
shipped neutral questions (`peft_steer.evaluate.steering_costs`): drift, perplexity, repetition."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from peft_steer.data import neutral_questions
from peft_steer.evaluate import Cost, steering_costs

from .errors import CommandError
from .eval_scores import keyed

COST_PROMPTS = 16  # enough to see a strength break the model; the cost grows with prompts x multipliers x tokens
COST_TOKENS = 32
COSTS = ("drift", "perplexity", "repetition")


def add_cost_options(parser: argparse.ArgumentParser, optional: bool = True) -> None:
    """``--cost-prompts``, ``--cost-max-new-tokens`` and, where the costs are ``optional``, ``--no-costs``."""
    costs = parser.add_argument_group(
        "costs",
        "What each strength costs against the unsteered model (multiplier 0), measured on the shipped neutral "
        "questions (off-target prompts) in the same prompt format: drift (mean KL divergence of the next-token "
        "distribution, nats), perplexity of the steered greedy answers under the unsteered model, and their "
        "repetition (share of repeated token 4-grams). The work is about prompts x multipliers x tokens generated.",
    )
    costs.add_argument(
        "--cost-prompts",
        type=int,
        default=COST_PROMPTS,
        help=f"How many of the {len(neutral_questions())} shipped neutral questions to measure the costs on "
        f"(default {COST_PROMPTS}).",
    )
    costs.add_argument(
        "--cost-max-new-tokens",
        type=int,
        default=COST_TOKENS,
        help=f"Tokens per greedy answer for perplexity and repetition (default {COST_TOKENS}).",
    )
    if optional:
        costs.add_argument("--no-costs", action="store_true", help="Measure the behavior score only.")


def cost_questions(args: argparse.Namespace) -> list[str]:
    """The neutral questions the costs are measured on (none with --no-costs), after checking the cost options."""
    if getattr(args, "no_costs", False):  # sweep has no --no-costs: its recommendation needs them
        return []
    questions = neutral_questions()
    if not 1 <= args.cost_prompts <= len(questions):
        raise CommandError(
            f"--cost-prompts {args.cost_prompts}: must be from 1 to {len(questions)} (the shipped neutral questions)"
            + ("; --no-costs measures no cost." if hasattr(args, "no_costs") else ".")
        )
    if args.cost_max_new_tokens < 1:
        raise CommandError(f"--cost-max-new-tokens {args.cost_max_new_tokens}: must be at least 1.")
    return questions[: args.cost_prompts]


def measured_costs(
    args: argparse.Namespace,
    model: Any,
    tokenizer: Any,
    questions: Sequence[str],
    multipliers: Sequence[float],
    format_prompt: Callable[[str], str],
) -> dict[float, Cost]:
    """``{m: Cost}`` of the model's active adapter on ``questions`` in the eval's prompt format (none without
    questions)."""
    if not questions:
        return {}
    return steering_costs(
        model,
        tokenizer,
        [format_prompt(question) for question in questions],
        multipliers,
        max_new_tokens=args.cost_max_new_tokens,
        batch_size=args.batch_size,
        progress=True,
    )


def cost_columns(costs: Mapping[float, Cost]) -> dict[str, dict[float, float]]:
    """``{cost: {m: value}}`` for `score_table` (empty without costs)."""
    if not costs:
        return {}
    return {name: {m: getattr(cost, name) for m, cost in costs.items()} for name in COSTS}


def cost_report(costs: Mapping[float, Cost], prompts: int, max_new_tokens: int) -> dict[str, Any]:
    """The costs as the JSON report has them: a map per cost keyed as ``"scores"`` is, and ``"costs"``, what they
    were measured on and what each means (empty without costs)."""
    if not costs:
        return {}
    report: dict[str, Any] = {name: keyed(values) for name, values in cost_columns(costs).items()}
    report["costs"] = {
        "prompts": prompts,
        "max_new_tokens": max_new_tokens,
        "on": "the shipped neutral questions (peft_steer.data.neutral_questions)",
        "drift": "mean KL(steered || multiplier 0) of the next-token distribution after each prompt, nats",
        "perplexity": "of the steered greedy answers under the model at multiplier 0 (null: no token)",
        "repetition": "mean share of repeated token 4-grams of the steered greedy answers",
    }
    return report
