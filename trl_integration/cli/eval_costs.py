"""`peft-steer eval`'s costs: what each strength costs the model against multiplier 0, measured on the shipped
neutral questions (`peft_steer.evaluate.steering_costs`), and the options that bound that work."""

from __future__ import annotations

import argparse
from typing import Any

from peft_steer.data import PairFormatter, neutral_questions
from peft_steer.evaluate import steering_costs

from .errors import CommandError

COST_PROMPTS = 16  # enough to see a strength break the model; the cost grows with prompts x multipliers x tokens
COST_TOKENS = 32
COSTS = ("drift", "perplexity", "repetition")


def add_cost_options(parser: argparse.ArgumentParser) -> None:
    """``--cost-prompts``, ``--cost-max-new-tokens``, ``--no-costs``."""
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
    costs.add_argument("--no-costs", action="store_true", help="Measure the behavior score only.")


def cost_questions_of(args: argparse.Namespace) -> list[str]:
    """The neutral questions the costs are measured on (none with --no-costs), after checking the cost options."""
    if args.no_costs:
        return []
    questions = neutral_questions()
    if not 1 <= args.cost_prompts <= len(questions):
        raise CommandError(
            f"--cost-prompts {args.cost_prompts}: must be from 1 to {len(questions)} (the shipped neutral questions); "
            "--no-costs measures no cost."
        )
    if args.cost_max_new_tokens < 1:
        raise CommandError(f"--cost-max-new-tokens {args.cost_max_new_tokens}: must be at least 1.")
    return questions[: args.cost_prompts]


def measured_costs(
    args: argparse.Namespace,
    model: Any,
    tokenizer: Any,
    questions: list[str],
    multipliers: list[float],
    format_options: dict[str, Any],
) -> dict[str, dict[float, float]]:
    """``{cost: {m: value}}`` on the neutral questions in eval's prompt format (``format_options``, the keywords of
    `PairFormatter`); none without questions (--no-costs)."""
    if not questions:
        return {}
    formatter = PairFormatter(tokenizer, **format_options)
    measured = steering_costs(
        model,
        tokenizer,
        [formatter.prompt(question) for question in questions],
        multipliers,
        max_new_tokens=args.cost_max_new_tokens,
        batch_size=args.batch_size,
        progress=True,
    )
    return {name: {m: getattr(cost, name) for m, cost in measured.items()} for name in COSTS}
