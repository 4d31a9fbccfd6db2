"""`peft-steer sweep` on the model organism: scores and costs over the strengths for the adapter, CAA over a range of
blocks and the prompting baseline; the JSON, the picture, the recommended strength and the adapter's card."""

from __future__ import annotations

import csv
import json
import math

import pytest
from peft import get_peft_model

import trl_integration.cli.sweep as sweep_module
from peft_steer import SteeringConfig
from peft_steer.evaluate import caa_vector
from peft_steer.organism import (
    ANTI_TAG,
    ORGANISM_DIR,
    TAG,
    format_answer,
    format_prompt,
    load_organism,
    read_rows,
    stance_rows,
)
from trl_integration.cli import build_parser, main

MODEL = str(ORGANISM_DIR)
USER_TEXT = "My own notes on this vector: trained on a Tuesday."


@pytest.fixture(scope="module")
def organism_sweep(tmp_path_factory):
    """An adapter on the organism at block 2 (its CAA of the whole first-line answers, doubled, so that the costs
    grow within -2..2), its card with a line of the user's own, and held-out / train stance pairs as CSV files."""
    folder = tmp_path_factory.mktemp("sweep")
    model, tokenizer = load_organism()
    train = read_rows("power-seeking", "train")[:32]
    vector = caa_vector(
        model,
        tokenizer,
        [format_prompt(row["question"]) for row in train],
        [format_answer(row["matching"]) for row in train],
        [format_answer(row["not_matching"]) for row in train],
        layer=2,
        progress=False,
    )
    get_peft_model(model, SteeringConfig(layers=[2], init_vectors={2: vector * 2})).save_pretrained(folder / "adapter")
    card = folder / "adapter" / "README.md"
    card.write_text(card.read_text(encoding="utf-8") + f"\n{USER_TEXT}\n", encoding="utf-8")
    for name, split in (("test", "test"), ("train", "train")):
        with open(folder / f"{name}.csv", "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=["question", "matching", "not_matching"])
            writer.writeheader()
            writer.writerows(stance_rows("power-seeking", split)[:16])
    return folder


def base_argv(folder) -> list[str]:
    argv = ["sweep", "--model", MODEL, "--adapter", str(folder / "adapter"), "--data", str(folder / "test.csv")]
    argv += ["--metric", "preference", "--multipliers", "-2,-1,1,2", "--cost-prompts", "3"]
    return argv + ["--cost-max-new-tokens", "6", "--caa-data", str(folder / "train.csv"), "--caa-pairs", "16"]


def walk_out(report: dict, side: float) -> float | None:
    """The recommendation, computed here from the JSON's costs: walking out from 0, the last strength before the first
    one over the budget."""
    budget, found = report["budget"], None
    for m in sorted((m for m in report["multipliers"] if m * side > 0), key=abs):
        key = str(float(m))
        if report["drift"][key] > budget["max_drift"]:
            break
        found = m
    return found


def test_sweep_on_the_organism_end_to_end(organism_sweep, tmp_path, capsys):
    out, plot = tmp_path / "sweep.json", tmp_path / "sweep.png"
    argv = [*base_argv(organism_sweep), "--caa-layers", "1-3", "--prompting-for", TAG, "--prompting-against"]
    argv += [ANTI_TAG, "--max-drift", "0.5", "--max-perplexity-ratio", "inf", "--max-repetition-increase", "inf"]
    argv += ["--json", str(out), "--plot", str(plot), "--write-card"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["multipliers"] == [-2.0, -1.0, 0.0, 1.0, 2.0]  # 0 added: the budget's reference
    for key in ("scores", "drift", "perplexity", "repetition", "shares_up"):
        assert list(report[key]) == ["-2.0", "-1.0", "0.0", "1.0", "2.0"]
    assert report["budget"]["max_perplexity_ratio"] is None and report["budget"]["max_drift"] == 0.5
    recommended = report["recommended"]
    assert (recommended["raise"], recommended["lower"]) == (walk_out(report, 1), walk_out(report, -1))
    assert report["drift"]["2.0"] > 0.5 or report["drift"]["-2.0"] > 0.5  # the budget bites somewhere
    assert recommended["summary"] in printed and "BiPO (the adapter) recommended strength" in printed
    assert report["prompting"]["for"] > report["unsteered_score"] > report["prompting"]["against"]
    # CAA: every block tried, the one that moves the score most chosen, at the adapter's norm, costed
    caa = report["caa"]
    assert set(caa["blocks"]) == {"1", "2", "3"}
    ranges = {int(block): found["range"] for block, found in caa["blocks"].items()}
    assert caa["layer"] == max(ranges, key=ranges.get)
    assert caa["scores"]["0.0"] == report["unsteered_score"] and caa["drift"]["0.0"] == 0.0
    assert caa["norm"] == pytest.approx(report["norm"]) and caa["data"].startswith("`train.csv`")
    assert caa["blocks"][str(caa["layer"])]["scores"] == caa["scores"]
    assert open(plot, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # the card: the user's text kept, the recommended strength with the measured figures and what they are on
    card = (organism_sweep / "adapter" / "README.md").read_text(encoding="utf-8")
    assert USER_TEXT in card and card.count("## Recommended strength") == 1 and report["card"].endswith("README.md")
    part = card[card.index("## Recommended strength") :]
    raise_row = next(line for line in part.splitlines() if line.startswith("| raise the behavior"))
    if recommended["raise"] is None:
        assert "none within the budget" in raise_row
    else:
        key = str(float(recommended["raise"]))
        assert f"{recommended['raise']:+g} | {report['scores'][key]:.3f} | {report['drift'][key]:.3f}" in raise_row
    assert "drift <= 0.5 nats" in part and "`test.csv`" in part and "first 3 of the neutral questions" in part
    assert str(tmp_path) not in part and str(organism_sweep) not in part  # facts of the adapter, not of this machine
    # a second run refuses to overwrite the JSON, before any work
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "--json" in error and len(error.strip().splitlines()) == 1
    assert json.loads(out.read_text()) == report


@pytest.mark.parametrize(
    "extra, option",
    [
        (["--plot", "sweep.txt"], "--plot"),
        (["--plot", "{existing}"], "--plot"),
        (["--max-drift", "0"], "--max-drift"),
        (["--max-drift", "lots"], "--max-drift"),
        (["--max-perplexity-ratio", "0.5"], "--max-perplexity-ratio"),
        (["--max-repetition-increase", "nan"], "--max-repetition-increase"),
        (["--caa-layers", "3-1"], "--caa-layers"),
        (["--caa-layers", "2,9"], "--caa-layers"),
        (["--caa-pairs", "0"], "--caa-pairs"),
        (["--no-caa", "--caa-layers", "1"], "--no-caa"),
        (["--multipliers", "0"], "--multipliers"),
    ],
)
def test_bad_input_is_one_line_before_any_model_work(organism_sweep, tmp_path, capsys, monkeypatch, extra, option):
    def no_model(args):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(sweep_module, "load_steered", no_model)
    existing = tmp_path / "existing.png"
    existing.write_bytes(b"mine")
    out = tmp_path / "sweep.json"
    extra = [str(existing) if value == "{existing}" else value for value in extra]
    before = (organism_sweep / "adapter" / "README.md").read_text(encoding="utf-8")
    assert main([*base_argv(organism_sweep), *extra, "--json", str(out), "--write-card"]) == 2
    error = capsys.readouterr().err
    assert option in error and len(error.strip().splitlines()) == 1
    assert not out.exists() and existing.read_bytes() == b"mine"
    assert (organism_sweep / "adapter" / "README.md").read_text(encoding="utf-8") == before


def test_every_sweep_option_has_help():
    commands = next(action for action in build_parser()._actions if action.dest == "command")
    sweep = commands.choices["sweep"]
    options = [action for action in sweep._actions if action.option_strings and action.dest != "help"]
    assert {"--plot", "--write-card", "--max-drift", "--caa-layers"} <= {o for a in options for o in a.option_strings}
    assert all(action.help for action in options)
    assert not math.isnan(float(sweep.get_default("max_drift")))
