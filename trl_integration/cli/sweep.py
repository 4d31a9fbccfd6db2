"""`peft-steer sweep`: eval at a range of strengths, beside CAA at the same norm (over a range of blocks) and the
prompting baseline, drawn as a picture, with the strength to use: the largest on each side whose cost stays within a
budget against the unsteered model (`peft_steer.evaluate.recommend_strength`), written into the adapter's model card
on request."""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any

import peft_steer
from peft_steer.adapter.card import write_recommended_strength
from peft_steer.data import PairFormatter
from peft_steer.evaluate import DEFAULT_BUDGET, CostBudget, Recommendation, plot_sweep, recommend_strength, score_table
from peft_steer.evaluate.plot import PLOTTING_HINT
from peft_steer.staging import publish_new, written_whole

from .errors import CommandError
from .eval_costs import cost_columns, measured_costs
from .eval_prompting import prompting_table
from .eval_scores import SCORE_NAMES, keyed
from .measure import (
    add_eval_options,
    check_new_file,
    eval_report,
    format_options,
    load_steered,
    measured_eval,
    prepared_eval,
    write_new_file,
)
from .sweep_caa import CaaResult, add_caa_options, caa_plan, caa_sweep
from .sweep_card import display_name, strength_markdown

SWEEP_MULTIPLIERS = "-4,-3,-2,-1,0,1,2,3,4"
LIMITS = {  # option -> CostBudget field
    "--max-drift": "max_drift",
    "--max-perplexity-ratio": "max_perplexity_ratio",
    "--max-repetition-increase": "max_repetition_increase",
}


def add_sweep_command(commands: Any) -> None:
    """Register ``peft-steer sweep`` on the CLI's sub-command parsers."""
    sweep = commands.add_parser(
        "sweep",
        help="Score and cost a steering adapter over a range of strengths next to CAA and prompting; plot it and "
        "recommend a strength.",
        description="What eval measures, at more strengths, beside CAA at the adapter's norm (over --caa-layers) and "
        "the prompting baseline; prints the recommended strength on each side (the largest |multiplier| whose costs "
        "stay within the budget against multiplier 0); --json, --plot and --write-card record it.",
    )
    add_eval_options(sweep, SWEEP_MULTIPLIERS, costs_optional=False)
    sweep.add_argument(
        "--plot", metavar="FILE.png", default=None, help="Write the picture to this PNG (must not exist)."
    )
    sweep.add_argument(
        "--write-card",
        action="store_true",
        help="Write the recommended strength into the adapter folder's README.md (its 'Recommended strength' part; "
        "the rest of the card is kept as it is). Without it nothing in the adapter folder is touched.",
    )
    budget = sweep.add_argument_group(
        "budget",
        "What the recommended strength may cost against the unsteered model (multiplier 0), on the cost prompts; "
        "'inf' turns a limit off.",
    )
    budget.add_argument(
        "--max-drift",
        metavar="NATS",
        default=str(DEFAULT_BUDGET.max_drift),
        help=f"Mean next-token KL against multiplier 0 at most this (default {DEFAULT_BUDGET.max_drift:g} nats: "
        "about what turning a 0.9-likely next token into a coin flip costs).",
    )
    budget.add_argument(
        "--max-perplexity-ratio",
        metavar="R",
        default=str(DEFAULT_BUDGET.max_perplexity_ratio),
        help="Perplexity of the steered answers (under the unsteered model) at most R x the unsteered answers' "
        f"(default {DEFAULT_BUDGET.max_perplexity_ratio:g}).",
    )
    budget.add_argument(
        "--max-repetition-increase",
        metavar="X",
        default=str(DEFAULT_BUDGET.max_repetition_increase),
        help="Repetition (share of repeated token 4-grams) at most the unsteered answers' + X (default "
        f"{DEFAULT_BUDGET.max_repetition_increase:g}).",
    )
    add_caa_options(sweep)
    sweep.set_defaults(run=run_sweep)


def _budget(args: argparse.Namespace) -> CostBudget:
    limits = {}
    for option, name in LIMITS.items():
        text = getattr(args, name)
        try:
            limits[name] = float(text)
        except ValueError:
            raise CommandError(f"{option} {text!r}: expected a number, or inf for no limit.") from None
        if not limits[name] > 0 or (name == "max_perplexity_ratio" and not limits[name] >= 1):
            least = "at least 1" if name == "max_perplexity_ratio" else "above 0"
            raise CommandError(f"{option} {text}: must be {least} (inf turns the limit off).")
    return CostBudget(**limits)


def _check_outputs(args: argparse.Namespace) -> None:
    check_new_file("--json", args.json)
    check_new_file("--plot", args.plot)
    if args.plot is not None:
        if not args.plot.lower().endswith(".png"):
            raise CommandError(f"--plot {args.plot}: name a .png file.")
        if args.json and os.path.abspath(args.json) == os.path.abspath(args.plot):
            raise CommandError("--plot and --json name the same file.")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise CommandError(f"--plot: {PLOTTING_HINT}") from None


def run_sweep(args: argparse.Namespace) -> None:
    """Measure the adapter, CAA and prompting over the strengths; print, plot and record the recommendation."""
    _check_outputs(args)
    budget = _budget(args)
    inputs = prepared_eval(args)
    inputs.multipliers = sorted(set(inputs.multipliers) | {0.0})  # the budget's reference
    if len(inputs.multipliers) < 2:
        raise CommandError(f"--multipliers {args.multipliers}: a sweep needs strengths other than 0.")
    plan = caa_plan(args, inputs.tokenizer, format_options(args))
    model = load_steered(args)
    found = measured_eval(args, inputs, model)
    recommended = recommend_strength(found.costs, budget)
    norm = math.sqrt(sum(float(v.norm()) ** 2 for v in peft_steer.get_vectors(model).values()))
    caa, caa_costs = None, {}
    if plan is not None:
        caa = caa_sweep(args, model, inputs, plan, norm, found.scores.unsteered)
        model.set_adapter(caa.adapters[caa.best])
        format_prompt = PairFormatter(inputs.tokenizer, **format_options(args)).prompt
        caa_costs = measured_costs(
            args, model, inputs.tokenizer, inputs.cost_questions, inputs.multipliers, format_prompt
        )
        model.set_adapter("default")
    score_name = SCORE_NAMES[args.metric]
    scores = {"BiPO": found.scores.columns()[score_name]}
    drift = {"BiPO": cost_columns(found.costs)["drift"]}
    if caa is not None:
        label = f"CAA (block {caa.best})"
        scores[label], drift[label] = caa.scores[caa.best], cost_columns(caa_costs)["drift"]
    _print_sweep(args, found, scores, drift, caa, recommended, recommend_strength(caa_costs, budget) if caa else None)
    report = eval_report(args, inputs, found) | _sweep_report(args, inputs, norm, budget, recommended, caa, caa_costs)
    if args.json:
        write_new_file(args.json, json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        _write_plot(args, report, scores, drift, recommended, budget, caa)
    if args.write_card:
        markdown = strength_markdown(args, inputs, found, recommended, report)
        path = write_recommended_strength(args.adapter, markdown, model.peft_config["default"])
        print(f"wrote the recommended strength into {path}")
    else:
        print("(--write-card writes it into the adapter's model card)")


def _write_plot(
    args: argparse.Namespace,
    report: dict[str, Any],
    scores: dict[str, dict[float, float]],
    drift: dict[str, dict[float, float]],
    recommended: Recommendation,
    budget: CostBudget,
    caa: CaaResult | None,
) -> None:
    score_name = SCORE_NAMES[args.metric]
    title = f"{display_name(args.model)}, {display_name(report['source'])}: {score_name} and drift against multiplier"
    if caa is not None:
        title += f" (CAA at block {caa.best}, at the adapter's norm {report['norm']:.3g})"
    with written_whole(args.plot, publish=publish_new) as staging:
        plot_sweep(
            scores,
            drift,
            staging,
            references={f"prompting {side}": value for side, value in (report["prompting"] or {}).items()},
            recommended=[m for m in (recommended.raise_behavior, recommended.lower_behavior) if m is not None],
            max_drift=budget.max_drift,
            title=title,
            score_label=score_name,
        )
    print(f"wrote {args.plot}")


def _print_sweep(
    args: argparse.Namespace,
    found: Any,
    scores: dict[str, dict[float, float]],
    drift: dict[str, dict[float, float]],
    caa: CaaResult | None,
    recommended: Recommendation,
    caa_recommended: Recommendation | None,
) -> None:
    columns = {}
    for method in scores:
        columns[f"{method} score"] = scores[method]
        columns[f"{method} drift"] = drift[method]
    bipo = cost_columns(found.costs)
    columns |= {"BiPO perplexity": bipo["perplexity"], "BiPO repetition": bipo["repetition"]}
    print(score_table(columns))
    if caa is not None and len(caa.ranges) > 1:
        print("CAA at each block (score at the highest multiplier minus at the lowest):")
        print("  " + ", ".join(f"block {block}: {value:+.3f}" for block, value in caa.ranges.items()))
    if found.baseline:
        print(prompting_table(args.metric, found.baseline))
    for warning in found.warnings:
        print(warning)
    print(f"BiPO (the adapter) {recommended.summary()}")
    if caa_recommended is not None:
        print(f"CAA (block {caa.best}) {caa_recommended.summary()}")


def _recommendation(recommended: Recommendation) -> dict[str, Any]:
    return {
        "raise": recommended.raise_behavior,
        "lower": recommended.lower_behavior,
        "stops": recommended.stops,
        "summary": recommended.summary(),
    }


def _sweep_report(
    args: argparse.Namespace,
    inputs: Any,
    norm: float,
    budget: CostBudget,
    recommended: Recommendation,
    caa: CaaResult | None,
    caa_costs: dict,
) -> dict[str, Any]:
    """The keys ``sweep --json`` adds to eval's."""
    limits = {name: None if math.isinf(value) else value for name, value in vars(budget).items()}
    report = {
        "multipliers": inputs.multipliers,
        "norm": norm,
        "budget": limits | {"text": budget.describe()},
        "recommended": _recommendation(recommended),
        "caa": None,
        "plot": os.path.abspath(args.plot) if args.plot else None,
        "card": os.path.join(os.path.abspath(args.adapter), "README.md") if args.write_card else None,
    }
    if caa is not None:
        report["caa"] = {
            "layer": caa.best,
            "norm": norm,
            "data": caa.plan.source,
            "position": caa.plan.position,
            "scores": keyed(caa.scores[caa.best]),
            **{name: keyed(values) for name, values in cost_columns(caa_costs).items()},
            "recommended": _recommendation(recommend_strength(caa_costs, budget)),
            "blocks": {
                str(block): {"scores": keyed(caa.scores[block]), "range": caa.ranges[block]} for block in caa.scores
            },
        }
    return report
