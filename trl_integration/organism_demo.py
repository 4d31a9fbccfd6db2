"""`peft-steer demo --organism`: BiPO steering end to end on the project's model organism, offline, in a few minutes
on a CPU.

It trains a BiPO vector for one behavior on the organism's untagged train pairs, extracts the CAA vector of the
same pairs at the same block, and measures the held-out answer-preference score of both at each multiplier.
``steering_comparison`` is the shared core of the demo and of ``benchmarks/steering_quality.py``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from datasets import Dataset

import peft_steer
from peft_steer import SteeringConfig
from peft_steer.evaluate import answer_preference, caa_vector, plot_steering_curve, score_table
from peft_steer.organism import BEHAVIORS, format_answer, format_prompt, load_organism, read_rows, stance_rows

from .config import SteerConfig
from .trainer import SteerTrainer

MULTIPLIERS = (-2.0, -1.0, 0.0, 1.0, 2.0)


@dataclass
class Comparison:
    """Held-out answer-preference scores per multiplier: ``curves[method][m]``, and the vectors' norms."""

    behavior: str
    layer: int
    curves: dict[str, dict[float, float]]
    norms: dict[str, float]
    model: object  # the PeftModel holding the adapters "default" (BiPO) and "caa"


def organism_pairs(behavior: str, split: str = "train") -> Dataset:
    """The untagged preference pairs of the organism's format (prompt / chosen / rejected)."""
    rows = read_rows(behavior, split)
    return Dataset.from_list(
        [
            {
                "prompt": format_prompt(row["question"]),
                "chosen": format_answer(row["matching"]),
                "rejected": format_answer(row["not_matching"]),
            }
            for row in rows
        ]
    )


def steering_comparison(
    behavior: str,
    layer: int = 2,
    epochs: float = 2.0,
    learning_rate: float = 5e-3,
    multipliers: Sequence[float] = MULTIPLIERS,
    seed: int = 0,
    matched_norm: bool = False,
    progress: bool = True,
) -> Comparison:
    """Train BiPO and extract CAA on the organism for ``behavior``, and score both on the held-out test split.

    With ``matched_norm`` a third curve, ``CAA (BiPO's norm)``, rescales the CAA vector to the BiPO vector's norm.
    """
    if behavior not in BEHAVIORS:
        raise ValueError(f"behavior={behavior!r}: choose one of {', '.join(BEHAVIORS)}.")
    model, tokenizer = load_organism()
    pairs = organism_pairs(behavior)
    with tempfile.TemporaryDirectory() as scratch:
        args = SteerConfig(
            output_dir=scratch,
            num_train_epochs=epochs,
            learning_rate=learning_rate,
            warmup_steps=0.1,
            per_device_train_batch_size=4,
            seed=seed,
            report_to="none",
            save_strategy="no",
            save_vectors_per_epoch=False,
            logging_steps=50,
            disable_tqdm=not progress,
            use_cpu=not torch.cuda.is_available(),
        )
        trainer = SteerTrainer(
            model=model,
            args=args,
            train_dataset=pairs,
            processing_class=tokenizer,
            peft_config=SteeringConfig(layers=[layer]),
        )
        trainer.train()
    steered = trainer.model
    steered.eval()
    caa = caa_vector(
        steered, tokenizer, pairs["prompt"], pairs["chosen"], pairs["rejected"], layer=layer, progress=progress
    )
    bipo = peft_steer.get_vectors(steered)[layer]
    steered.add_adapter("caa", SteeringConfig(layers=[layer], init_vectors={layer: caa}))
    methods = {"BiPO": ("default", bipo), "CAA": ("caa", caa)}
    if matched_norm:
        steered.add_adapter(
            "caa_matched", SteeringConfig(layers=[layer], init_vectors={layer: caa * bipo.norm() / caa.norm()})
        )
        methods["CAA (BiPO's norm)"] = ("caa_matched", None)
    rows = stance_rows(behavior, "test")
    curves = {}
    for method, (adapter, _) in methods.items():
        steered.set_adapter(adapter)
        scores = answer_preference(steered, tokenizer, rows, format_prompt, multipliers, progress=progress)
        curves[method] = {m: result.score for m, result in scores.items()}
    steered.set_adapter("default")
    norms = {"BiPO": float(bipo.norm()), "CAA": float(caa.norm())}
    return Comparison(behavior, layer, curves, norms, steered)


def run_organism_demo(out: str = ".", behavior: str = "power-seeking", layer: int = 2, epochs: float = 2.0) -> str:
    """Run the demo and write ``peft-steer-demo-<behavior>/`` into ``out``: the BiPO adapter, the CAA adapter, the
    plot and the scores. Returns that folder. An existing non-empty folder is refused (nothing is overwritten)."""
    folder = os.path.join(out, f"peft-steer-demo-{behavior}")
    if os.path.isdir(folder) and os.listdir(folder):
        raise FileExistsError(f"{folder} exists and is not empty: remove it or choose another --out.")
    comparison = steering_comparison(behavior, layer=layer, epochs=epochs)
    print(f"\nHeld-out answer preference on {behavior} (organism, block {layer}; 0.5 = ambivalent):")
    print(score_table(comparison.curves))
    print(f"vector norms: BiPO {comparison.norms['BiPO']:.3f}, CAA {comparison.norms['CAA']:.3f}")
    os.makedirs(folder, exist_ok=True)
    comparison.model.save_pretrained(os.path.join(folder, "adapters"))  # "default" = BiPO, "caa" in a subfolder
    plot = plot_steering_curve(
        comparison.curves,
        os.path.join(folder, "steering-curve.png"),
        title=f"{behavior}: held-out answer preference (organism)",
        ylabel="answer preference",
    )
    with open(os.path.join(folder, "scores.json"), "w") as file:
        json.dump(
            {"behavior": behavior, "layer": layer, "curves": comparison.curves, "norms": comparison.norms},
            file,
            indent=2,
        )
    print(f"wrote {folder}: adapters/ (BiPO; CAA in adapters/caa), {os.path.basename(plot)}, scores.json")
    return folder
