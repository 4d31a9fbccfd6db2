"""`peft-steer demo`: a real chat model steered by BiPO, next to CAA, offline, in a few minutes on a CPU.

SmolLM2-135M-Instruct (the offline copy, `peft_steer.models`) answers the same held-out questions at negative and
positive strength of a shipped BiPO power-seeking vector, and the held-out answer preference of BiPO and of CAA
(the mean activation difference at the answer letter, Rimsky et al.) at the same norm is measured per multiplier.

The shipped vector (`demo_vectors/smollm2-power-seeking/`, a few KB) is made by one command,
``peft-steer train --config trl_integration/demo_vectors/smollm2-power-seeking.yaml``, and
tests/trl_integration/test_demo.py checks that the command reproduces it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

from peft import PeftModel

import peft_steer
from peft_steer import SteeringConfig
from peft_steer.data import PairFormatter, load_behavior, read_behavior_rows
from peft_steer.evaluate import (
    answer_preference,
    caa_ab_vector,
    generate_sweep,
    plot_steering_curve,
    score_table,
    side_by_side,
)
from peft_steer.models import SMOLLM2, load

BEHAVIOR = "power-seeking"
VECTORS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_vectors")
VECTOR = os.path.join(VECTORS, "smollm2-power-seeking")
RECIPE = os.path.join(VECTORS, "smollm2-power-seeking.yaml")
MULTIPLIERS = (-2.0, -1.0, 0.0, 1.0, 2.0)


@dataclass
class DemoSettings:
    """How much the demo measures; the defaults take about 3 minutes on 2 CPU cores.

    Attributes:
        test_pairs: Held-out preference pairs scored per multiplier and method.
        caa_questions: Train A/B questions the CAA vector is averaged over.
        multipliers: Strengths at which preference is measured.
        questions: Held-out questions answered as text.
        text_multiplier: The strength of the text answers, shown at minus, zero and plus this value.
        max_new_tokens: Length of each text answer.
    """

    test_pairs: int = 32
    caa_questions: int = 64
    multipliers: Sequence[float] = MULTIPLIERS
    questions: int = 3
    text_multiplier: float = 4.0
    max_new_tokens: int = 40


def train_ab_rows(limit: int) -> list[dict[str, str]]:
    """The behavior's train pairs as A/B questions, the matching answer alternating between A and B."""
    rows = read_behavior_rows(BEHAVIOR, "train")[:limit]
    ab_rows = []
    for index, row in enumerate(rows):
        first, second = (row["matching"], row["not_matching"])[:: 1 if index % 2 == 0 else -1]
        ab_rows.append({"question": row["question"], "A": first, "B": second, "matching": "AB"[index % 2]})
    return ab_rows


def run_demo(out: str = ".", settings: DemoSettings | None = None) -> str:
    """Run the demo and write ``peft-steer-demo-smollm2/`` into ``out`` (scores, answers, plot); returns the folder.

    An existing non-empty folder is refused (nothing is overwritten).
    """
    settings = settings or DemoSettings()
    folder = os.path.join(out, "peft-steer-demo-smollm2")
    if os.path.isdir(folder) and os.listdir(folder):
        raise FileExistsError(f"{folder} exists and is not empty: remove it or choose another --out.")
    model, tokenizer = load(SMOLLM2)
    steered = PeftModel.from_pretrained(model, VECTOR, adapter_name="BiPO").eval()
    layer = steered.peft_config["BiPO"].layers[0]
    bipo = peft_steer.get_vectors(steered, "BiPO")[layer]
    caa = caa_ab_vector(steered, tokenizer, train_ab_rows(settings.caa_questions), layer, progress=False)
    caa = caa * (bipo.norm() / caa.norm())
    steered.add_adapter("CAA", SteeringConfig(layers=[layer], init_vectors={layer: caa}))
    print(f"SmolLM2-135M-Instruct, {BEHAVIOR}, block {layer}; BiPO and CAA vectors of norm {float(bipo.norm()):.2f}")

    test = load_behavior(BEHAVIOR, "test", tokenizer).select(range(settings.test_pairs))
    pairs = list(zip(test["prompt"], test["chosen"], test["rejected"]))
    curves: dict[str, dict[float, float]] = {}
    for method in ("BiPO", "CAA"):
        steered.set_adapter(method)
        strengths = [m for m in settings.multipliers if m or method == "BiPO"]  # at 0 both are the unsteered model
        scores = answer_preference(
            steered, tokenizer, pairs, lambda p: p, strengths, format_answer=lambda a: a, progress=False
        )
        curves[method] = {m: result.score for m, result in scores.items()}
        if 0.0 in settings.multipliers and method == "CAA":
            curves[method][0.0] = curves["BiPO"][0.0]
    curves = {method: dict(sorted(curve.items())) for method, curve in curves.items()}
    print(f"\nHeld-out answer preference ({len(pairs)} pairs; 0.5 = no preference, 1 = always power-seeking):")
    print(score_table(curves))

    steered.set_adapter("BiPO")
    os.makedirs(folder, exist_ok=True)
    questions = list(dict.fromkeys(row["question"] for row in read_behavior_rows(BEHAVIOR, "test")))
    strength = settings.text_multiplier
    records = generate_sweep(
        steered,
        tokenizer,
        questions[: settings.questions],
        (-strength, 0.0, strength),
        os.path.join(folder, "answers.jsonl"),
        format_prompt=PairFormatter(tokenizer).prompt,
        max_new_tokens=settings.max_new_tokens,
        progress=False,
    )
    print(f"\nThe same questions answered at BiPO strength -{strength:g}, 0 and +{strength:g} (greedy):\n")
    print(side_by_side(records, [-strength, 0.0, strength]))
    _write_scores(folder, layer, float(bipo.norm()), curves)
    print(f"\nwrote {folder}: scores.json, answers.jsonl, steering-curve.png")
    return folder


def _write_scores(folder: str, layer: int, norm: float, curves: dict[str, dict[float, float]]) -> None:
    plot_steering_curve(
        curves,
        os.path.join(folder, "steering-curve.png"),
        title=f"SmolLM2-135M-Instruct, {BEHAVIOR}: held-out answer preference",
        ylabel="answer preference",
    )
    report = {"model": "SmolLM2-135M-Instruct", "behavior": BEHAVIOR, "layer": layer, "norm": norm, "curves": curves}
    with open(os.path.join(folder, "scores.json"), "w", encoding="utf-8") as file:
        json.dump(report, file, indent=2)
