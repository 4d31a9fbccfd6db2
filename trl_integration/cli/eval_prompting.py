"""`peft-steer eval`'s prompting baseline: the behavior score of the unsteered model (multiplier 0) told by a system
prompt to show the behavior, and to show its opposite; the question a vector must answer is whether it does better."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from peft_steer.data import prompting_pair
from peft_steer.data.files import read_source

from .errors import CommandError
from .eval_scores import SCORE_NAMES, BehaviorScores, margins_at, score_of

SIDES = ("for", "against")


def add_prompting_options(parser: argparse.ArgumentParser) -> None:
    """``--prompting-for``, ``--prompting-against``, ``--no-prompting``."""
    group = parser.add_argument_group(
        "prompting baseline",
        "The same score at multiplier 0 with a system prompt that asks for the behavior and one that asks for its "
        "opposite, in place of the eval's system prompt. With --behavior the shipped pair is used "
        "(peft_steer/data/system_prompts.csv); with --data, give your own. Without a chat template "
        "(--no-chat-template, or a tokenizer that has none) there is no system message: the text goes on its own "
        "line before 'Question:'.",
    )
    group.add_argument("--prompting-for", metavar="TEXT", help="System prompt asking for the behavior.")
    group.add_argument("--prompting-against", metavar="TEXT", help="System prompt asking for its opposite.")
    group.add_argument("--no-prompting", action="store_true", help="No prompting baseline.")


def prompting_texts(args: argparse.Namespace) -> dict[str, str] | None:
    """The pair of system prompts to score (``None``: no baseline), after checking the options and, for --data, that
    its rows can take a system prompt; before any slow work."""
    given = {side: getattr(args, f"prompting_{side}") for side in SIDES}
    if args.no_prompting:
        if any(text is not None for text in given.values()):
            raise CommandError("--no-prompting with --prompting-for / --prompting-against: choose one.")
        return None
    if (given["for"] is None) != (given["against"] is None):
        raise CommandError("--prompting-for and --prompting-against go together: give both, or neither.")
    for side, text in given.items():
        if text is not None and not text.strip():
            raise CommandError(f"--prompting-{side}: empty text.")
    if given["for"] is None:
        return prompting_pair(args.behavior) if args.behavior else None
    if args.metric == "preference" and args.data and _formatted_rows(args.data):
        raise CommandError(
            f"--data {args.data}: its rows are already formatted (prompt / chosen / rejected), so a system prompt has "
            "nowhere to go; use question / matching / not_matching rows, or --no-prompting."
        )
    return given


def _formatted_rows(source: str) -> bool:
    rows = read_source(source)
    return bool(rows) and {"chosen", "rejected"} <= set(rows[0].values)


def prompting_scores(
    model: Any,
    tokenizer: Any,
    metric: str,
    texts: dict[str, str],
    rows_for: Callable[[str], tuple[list, Any]],
    measured: BehaviorScores,
    batch_size: int,
) -> dict[str, dict[str, float]]:
    """``{"for" | "against": {"score": x, "share_up": y}}``: each system prompt's rows (``rows_for(text)``) scored
    at multiplier 0, and the share of rows whose margin is above the unsteered model's with the eval's own prompt."""
    results = {}
    for side in SIDES:
        rows, format_ab = rows_for(texts[side])
        (found,) = margins_at(model, tokenizer, metric, rows, [0.0], format_ab, batch_size).values()
        results[side] = {"score": score_of(found.margins), "share_up": measured.share_up(found)}
    return results


def prompting_table(metric: str, results: dict[str, dict[str, float]]) -> str:
    """The baseline as text: one line per system prompt, the score and the share moved up."""
    name = SCORE_NAMES[metric]
    width = max(10, len(name))
    lines = [f"{'prompting at multiplier 0':<26}  {name:>{width}}  {'share up':>10}"]
    for side, result in results.items():
        lines.append(f"{'  system prompt ' + side:<26}  {result['score']:>{width}.3f}  {result['share_up']:>10.3f}")
    return "\n".join(lines)
