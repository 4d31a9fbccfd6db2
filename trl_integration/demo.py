"""`peft-steer demo`: a real chat model steered by BiPO, next to CAA, offline, in a few minutes on a CPU.

SmolLM2-135M-Instruct (the offline copy, `peft_steer.models`) answers the same held-out questions at negative and
positive strength of a shipped BiPO power-seeking vector, and the held-out answer preference of BiPO and of CAA
(the mean activation difference at the answer letter, Rimsky et al.) at the same norm is measured per multiplier,
with what each strength costs (drift on neutral questions) and what a system prompt does instead of a vector.

The shipped vector (`demo_vectors/smollm2-power-seeking/`, a few KB) is made by one command,
``peft-steer train --config trl_integration/demo_vectors/smollm2-power-seeking.yaml``, and
tests/trl_integration/test_demo.py checks that the command reproduces it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from peft import PeftModel

import peft_steer
from peft_steer import SteeringConfig
from peft_steer.data import PairFormatter, load_behavior, neutral_questions, prompting_pair, read_behavior_rows
from peft_steer.evaluate import (
    answer_preference,
    caa_ab_vector,
    generate_sweep,
    next_token_drift,
    plot_steering_curve,
    repetition,
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
    """How much the demo measures; the defaults take about 3.5 minutes on 2 CPU cores.

    Attributes:
        test_pairs: Held-out preference pairs scored per multiplier and method.
        caa_questions: Train A/B questions the CAA vector is averaged over.
        multipliers: Strengths at which preference and drift are measured.
        drift_prompts: Neutral questions (`peft_steer.data.neutral_questions`) on which drift is measured: the mean
            KL divergence of the next-token distribution from the unsteered model's.
        questions: Held-out questions answered as text.
        text_multiplier: The strength of the text answers, shown at minus, zero and plus this value.
        max_new_tokens: Length of each text answer.
        repetition_penalty: transformers' repetition penalty of the greedy text answers (1 for none): greedy decoding
            of a 135M model loops ("the whims of the whims of ..."), unsteered as much as steered.
    """

    test_pairs: int = 32
    caa_questions: int = 64
    multipliers: Sequence[float] = MULTIPLIERS
    drift_prompts: int = 16
    questions: int = 3
    text_multiplier: float = 4.0
    max_new_tokens: int = 40
    repetition_penalty: float = 1.3


@contextmanager
def step(what: str) -> Iterator[None]:
    """Say what the demo does now and, when it is done, how long it took (progress bars of the step go to
    stderr)."""
    print(f"{what} ...", flush=True)
    start = time.monotonic()
    yield
    print(f"  done in {time.monotonic() - start:.0f} s", flush=True)


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
    with step("Loading SmolLM2-135M-Instruct from its offline GGUF copy (about 20 s)"):
        model, tokenizer = load(SMOLLM2)
    steered = PeftModel.from_pretrained(model, VECTOR, adapter_name="BiPO").eval()
    layer = steered.peft_config["BiPO"].layers[0]
    bipo = peft_steer.get_vectors(steered, "BiPO")[layer]
    with step(f"CAA: the mean activation difference of {settings.caa_questions} train A/B questions at block {layer}"):
        caa = caa_ab_vector(steered, tokenizer, train_ab_rows(settings.caa_questions), layer)
    caa = caa * (bipo.norm() / caa.norm())
    steered.add_adapter("CAA", SteeringConfig(layers=[layer], init_vectors={layer: caa}))
    print(f"SmolLM2-135M-Instruct, {BEHAVIOR}, block {layer}; BiPO and CAA vectors of norm {float(bipo.norm()):.2f}")

    test = load_behavior(BEHAVIOR, "test", tokenizer).select(range(settings.test_pairs))
    pairs = list(zip(test["prompt"], test["chosen"], test["rejected"]))
    formatter = PairFormatter(tokenizer)
    neutral = [formatter.prompt(question) for question in neutral_questions()[: settings.drift_prompts]]
    curves: dict[str, dict[float, float]] = {}
    drift: dict[str, dict[float, float]] = {}
    for method in ("BiPO", "CAA"):
        steered.set_adapter(method)
        strengths = [m for m in settings.multipliers if m or method == "BiPO"]  # at 0 both are the unsteered model
        with step(f"{method}: answer preference on {len(pairs)} held-out pairs at {len(strengths)} strengths"):
            scores = answer_preference(steered, tokenizer, pairs, lambda p: p, strengths, format_answer=lambda a: a)
        curves[method] = {m: result.score for m, result in scores.items()}
        with step(f"{method}: drift on {len(neutral)} neutral questions"):
            drift[method] = next_token_drift(steered, tokenizer, neutral, settings.multipliers, progress=True)
        if 0.0 in settings.multipliers and method == "CAA":
            curves[method][0.0] = curves["BiPO"][0.0]
    curves = {method: dict(sorted(curve.items())) for method, curve in curves.items()}
    drift = {method: dict(sorted(values.items())) for method, values in drift.items()}
    prompting = _prompting_scores(steered, tokenizer, settings.test_pairs)

    print(f"\nHeld-out answer preference ({len(pairs)} pairs; 0.5 = no preference, 1 = always {BEHAVIOR}); drift:")
    print(f"mean KL divergence (nats) of the next token from the unsteered model's, {len(neutral)} neutral questions")
    print(score_table({**curves, **{f"{method} drift": values for method, values in drift.items()}}))
    print(
        f"A system prompt instead of a vector, at multiplier 0: asking for {BEHAVIOR} {prompting['for']:.3f}, "
        f"against it {prompting['against']:.3f}."
    )

    steered.set_adapter("BiPO")
    os.makedirs(folder, exist_ok=True)
    questions = list(dict.fromkeys(row["question"] for row in read_behavior_rows(BEHAVIOR, "test")))
    strength = settings.text_multiplier
    with step(f"Answering {settings.questions} held-out questions at BiPO strength -{strength:g}, 0 and +{strength:g}"):
        records = generate_sweep(
            steered,
            tokenizer,
            questions[: settings.questions],
            (-strength, 0.0, strength),
            os.path.join(folder, "answers.jsonl"),
            format_prompt=formatter.prompt,
            max_new_tokens=settings.max_new_tokens,
            repetition_penalty=settings.repetition_penalty,
        )
    decoding = f"greedy, repetition penalty {settings.repetition_penalty:g}"
    print(f"\nThe same questions answered at BiPO strength -{strength:g}, 0 and +{strength:g} ({decoding}):\n")
    print(side_by_side(records, [-strength, 0.0, strength]))
    looping = {m: _mean_repetition(records, m) for m in (-strength, 0.0, strength)}
    shown = ", ".join(f"m={m:+g} {value:.2f}" for m, value in looping.items())
    print(f"\nRepeated 4-grams in these answers (0 = none, towards 1 = looping): {shown}")
    report = {
        "model": "SmolLM2-135M-Instruct",
        "behavior": BEHAVIOR,
        "layer": layer,
        "norm": float(bipo.norm()),
        "curves": curves,
        "drift": drift,
        "prompting": prompting,
        "decoding": decoding,
        "answer_repetition": looping,
    }
    _write_scores(folder, report)
    print(f"\nwrote {folder}: scores.json, answers.jsonl, steering-curve.png")
    return folder


def _prompting_scores(steered: PeftModel, tokenizer, test_pairs: int) -> dict[str, float]:
    """The held-out answer preference of the unsteered model under the shipped system prompts that ask for the
    behavior and against it (`peft_steer.data.prompting_pair`), in place of the demo's system prompt."""
    scores = {}
    for side, system_prompt in prompting_pair(BEHAVIOR).items():
        test = load_behavior(BEHAVIOR, "test", tokenizer, system_prompt=system_prompt).select(range(test_pairs))
        pairs = list(zip(test["prompt"], test["chosen"], test["rejected"]))
        with step(f"Prompting baseline: a system prompt {side} {BEHAVIOR}"):
            result = answer_preference(steered, tokenizer, pairs, lambda p: p, [0.0], format_answer=lambda a: a)
        scores[side] = result[0.0].score
    return scores


def _mean_repetition(records: list[dict], multiplier: float) -> float:
    """Mean share of repeated word 4-grams (`peft_steer.evaluate.repetition`) of the answers at ``multiplier``."""
    answers = [record["generation"] for record in records if float(record["multiplier"]) == multiplier]
    return sum(repetition(answer) for answer in answers) / len(answers)


def _write_scores(folder: str, report: dict) -> None:
    plot_steering_curve(
        report["curves"],
        os.path.join(folder, "steering-curve.png"),
        title=f"SmolLM2-135M-Instruct, {BEHAVIOR}",
        ylabel="held-out answer preference",
    )
    with open(os.path.join(folder, "scores.json"), "w", encoding="utf-8") as file:
        json.dump(report, file, indent=2)
