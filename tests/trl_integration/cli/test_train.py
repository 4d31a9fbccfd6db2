"""`peft-steer train`: saves a loadable adapter; bad input exits with code 2 before anything is written."""

from __future__ import annotations

import csv
import os

import pytest
from peft import PeftModel

import peft_steer
from tests.conftest import make_model, make_tokenizer
from tests.trl_integration.conftest import QUESTIONS, bipo_rows
from trl_integration.cli import main
from trl_integration.config import paper_preset

FAST = ["--max-steps", "2", "--batch-size", "2", "--warmup-steps", "0", "--learning-rate", "0.05"]
FAST += ["--max-length", "256", "--logging-steps", "1", "--seed", "0"]


@pytest.fixture
def model_dir(tmp_path):
    folder = tmp_path / "tiny-llama"
    make_model("llama").save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return str(folder)


def _csv(path, rows) -> str:
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def test_paper_presets():
    assert paper_preset("meta-llama/Llama-2-7b-chat-hf") == {"layer": 15, "epochs": 20}
    assert paper_preset("/models/Mistral-7B-Instruct-v0.2/") == {"layer": 13, "epochs": 5}
    assert paper_preset("mistralai/Mistral-7B-Instruct-v0.3") is None
    assert paper_preset("Qwen/Qwen2-7B-Instruct") is None


@pytest.mark.parametrize("source", ["data", "behavior"])
def test_train_saves_a_loadable_adapter(tmp_path, model_dir, source, capsys):
    output = tmp_path / "run"
    data = ["--data", _csv(tmp_path / "pairs.csv", bipo_rows(QUESTIONS[:8]))]
    if source == "behavior":
        data = ["--behavior", "power-seeking"]
    code = main(["train", "--model", model_dir, *data, "--layer", "1", "--output-dir", str(output), *FAST])
    assert code == 0, capsys.readouterr().err
    model = PeftModel.from_pretrained(make_model("llama"), output)
    assert model.peft_config["default"].layers == [1]
    assert peft_steer.get_vectors(model)[1].abs().max() > 1e-3  # trained: no longer the zero start
    assert os.path.isdir(output / "checkpoint-2")  # resumable
    assert not os.path.exists(output / "vectors")  # no complete epoch in 2 steps: no per-epoch vector


def test_resume_continues_a_run(tmp_path, model_dir, capsys):
    output = str(tmp_path / "run")
    data = ["--data", _csv(tmp_path / "pairs.csv", bipo_rows(QUESTIONS[:8]))]
    base = ["train", "--model", model_dir, *data, "--layer", "1", "--output-dir", output, *FAST]
    assert main(base) == 0
    assert main(base) == 2  # the folder holds checkpoints: refused without --resume
    assert "pass --resume" in capsys.readouterr().err
    steps = ["--max-steps", "4", "--save-steps", "2"]
    assert main([*base, *steps, "--resume"]) == 0
    assert os.path.isdir(os.path.join(output, "checkpoint-4"))


BAD = {
    "missing data file": (["--data", "{tmp}/nope.csv", "--layer", "1"], "--data {tmp}/nope.csv: no such file"),
    "missing column": (["--data", "{bad_csv}", "--layer", "1"], "bad.csv has no column 'not_matching'"),
    "empty cell": (["--data", "{empty_cell_csv}", "--layer", "1"], "cells.csv, line 3, column 'matching'"),
    "layer out of range": (["--data", "{csv}", "--layer", "7"], "--layer 7: "),
    "no layer for an unknown model": (["--data", "{csv}"], "--layer is required"),
    "resume without checkpoints": (["--data", "{csv}", "--layer", "1", "--resume"], "holds no checkpoint-*"),
    "wrong file type": (["--data", "{tmp}/pairs.parquet", "--layer", "1"], "unsupported file type '.parquet'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2_and_writes_nothing(tmp_path, model_dir, capsys, case):
    arguments, message = BAD[case]
    rows = bipo_rows(QUESTIONS[:4])
    paths = {
        "tmp": str(tmp_path),
        "csv": _csv(tmp_path / "pairs.csv", rows),
        "bad_csv": _csv(tmp_path / "bad.csv", [{"question": r["question"], "matching": r["matching"]} for r in rows]),
        "empty_cell_csv": _csv(tmp_path / "cells.csv", [rows[0], dict(rows[1], matching="")]),
    }
    (tmp_path / "pairs.parquet").write_text("not really")
    arguments = [argument.format(**paths) for argument in arguments]
    output = tmp_path / "run"
    code = main(["train", "--model", model_dir, *arguments, "--output-dir", str(output), *FAST])
    assert code == 2
    assert message.format(**paths) in capsys.readouterr().err
    assert not output.exists()


def test_behavior_choices_are_checked(model_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--model", model_dir, "--behavior", "honesty", "--layer", "1"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'honesty'" in capsys.readouterr().err
