"""The "Recommended strength" part that `peft-steer sweep --write-card` puts into the adapter's model card: the
strengths, the budget they keep, and what they were measured on, as facts that stay true (no date, no path of the
machine it ran on)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from peft_steer.data import SYSTEM_PROMPT, PairFormatter
from peft_steer.evaluate import Recommendation

from .eval_scores import SCORE_NAMES


def _cell(value: float | None, digits: str = ".3f") -> str:
    return "n/a" if value is None else format(value, digits)


def display_name(model: str) -> str:
    """A model or data source as the card and the plot name it: a folder or file by its own name."""
    # the path of the machine the sweep ran on is no fact of the adapter
    return os.path.basename(os.path.normpath(model)) if os.path.exists(model) else model


def _source(args: argparse.Namespace, n: int) -> str:
    if args.behavior:
        split = "test_infer" if args.metric == "ab" else "test"
        return f"the first {n} rows of the shipped `{args.behavior}` {split} split"
    return f"the first {n} rows of `{display_name(args.data)}`"


def _prompt_format(args: argparse.Namespace, tokenizer: Any) -> str:
    if not PairFormatter(tokenizer, chat_template=False if args.no_chat_template else None).use_template:
        return "the plain `Question: ...\\nAnswer:` format"
    if args.no_system_prompt:
        return "the tokenizer's chat template, without a system prompt"
    if args.system_prompt == SYSTEM_PROMPT:
        return "the tokenizer's chat template with the system prompt of the official BiPO code"
    return f"the tokenizer's chat template with the system prompt {args.system_prompt!r}"


def strength_markdown(
    args: argparse.Namespace, inputs: Any, found: Any, recommended: Recommendation, report: dict[str, Any]
) -> str:
    """The card's part: a table of the recommended strength on each side (score and costs there, and at 0), the
    budget, the strengths tried, the data and prompt format of the score and of the costs."""
    score_name = SCORE_NAMES[args.metric]
    rows = [("raise the behavior", recommended.raise_behavior), ("lower the behavior", recommended.lower_behavior)]
    lines = [
        "## Recommended strength",
        "",
        "Measured by `peft-steer sweep`: the largest strength on each side whose cost stays within the budget against "
        "the unsteered model (multiplier 0).",
        "",
        f"| | multiplier | {score_name} | drift (nats) | perplexity | repetition |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, m in [*rows, ("unsteered", 0.0)]:
        if m is None:
            lines.append(f"| {label} | none within the budget | | | | |")
            continue
        key = str(float(m))
        cells = [report["scores"][key], report["drift"][key], report["perplexity"][key], report["repetition"][key]]
        lines.append(f"| {label} | {m:+g} | " + " | ".join(_cell(value) for value in cells) + " |")
    lines += [
        "",
        f"- **Budget:** {recommended.budget.describe()}.",
    ]
    for side, stop in recommended.stops.items():
        lines.append(f"- **Where the {side} side stops:** {stop}.")
    lines += [
        f"- **Strengths measured:** {', '.join(f'{m:+g}' for m in inputs.multipliers)}.",
        f"- **Base model:** `{display_name(args.model)}`; prompts in {_prompt_format(args, inputs.tokenizer)}.",
        f"- **Behavior score:** {score_name} on {_source(args, len(inputs.rows))}.",
        f"- **Costs:** on the first {report['costs']['prompts']} of the neutral questions shipped with peft-steer "
        f"(`peft_steer.data.neutral_questions`), greedy answers of at most {report['costs']['max_new_tokens']} tokens: "
        "drift is the mean KL of the next-token distribution against multiplier 0; perplexity is that of the steered "
        "answers under the unsteered model; repetition the share of repeated token 4-grams.",
    ]
    if report.get("prompting"):
        prompting = report["prompting"]
        lines.append(
            f"- **Prompting baseline** (multiplier 0, a system prompt asking for the behavior / its opposite): "
            f"{prompting['for']:.3f} / {prompting['against']:.3f}."
        )
    if report.get("caa"):
        caa = report["caa"]
        caa_rec = caa["recommended"]
        lines.append(
            f"- **CAA at the same norm** ({caa['norm']:.3g}, block {caa['layer']}, from {caa['data']}): recommended "
            f"{_cell(caa_rec['raise'], '+g')} / {_cell(caa_rec['lower'], '+g')} under the same budget."
        )
    return "\n".join(lines) + "\n"
