"""`peft-steer train`: saves a loadable adapter; bad input exits with code 2 before anything is written."""

from __future__ import annotations

import csv
import os

import pytest
import torch
from peft import PeftModel

import peft_steer
from tests.conftest import make_model
from tests.trl_integration.conftest import QUESTIONS, bipo_rows, fail_weight_writes
from trl_integration import SteerTrainer
from trl_integration.cli import CommandError, main
from trl_integration.cli.train_checks import checked_output
from trl_integration.config import paper_preset

FAST = ["--max-steps", "2", "--batch-size", "2", "--warmup-steps", "0", "--learning-rate", "0.05"]
FAST += ["--max-length", "256", "--logging-steps", "1", "--seed", "0"]


def _csv(path, rows) -> str:
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def test_paper_presets():
    assert paper_preset("meta-llama/Llama-2-7b-chat-hf") == {"layer": 15, "epochs": 20, "schedule_epochs": 100}
    assert paper_preset("meta-llama/Llama-2-7b-chat-hf", "jailbreak")["epochs"] == 10
    assert paper_preset("/models/Mistral-7B-Instruct-v0.2/") == {"layer": 13, "epochs": 5, "schedule_epochs": 100}
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
    "wrong file type": (["--data", "{tmp}/pairs.xlsx", "--layer", "1"], "unsupported file type '.xlsx'"),
    "not a parquet file": (["--data", "{tmp}/pairs.parquet", "--layer", "1"], "pairs.parquet cannot be read as a"),
    "a folder without data files": (["--data", "{tmp}/empty", "--layer", "1"], "with no data files"),
    "a folder of mixed data files": (["--data", "{tmp}", "--layer", "1"], "{tmp} holds data files of more than one"),
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
    (tmp_path / "pairs.xlsx").write_text("not really")
    (tmp_path / "empty").mkdir()
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


def _base(model_dir, tmp_path, output) -> list[str]:
    data = ["--data", _csv(tmp_path / "pairs.csv", bipo_rows(QUESTIONS[:8]))]
    return ["train", "--model", model_dir, *data, "--layer", "1", "--output-dir", str(output), *FAST]


def _one_error_line(capsys, alone: bool = True) -> str:
    """The error line of the command; ``alone``: the only line on stderr (a check before anything is loaded), else
    the only error line after the progress bars of loading and training."""
    lines = capsys.readouterr().err.strip().splitlines()
    # A progress bar ends its line with a carriage return only: the error may follow on the same line.
    errors = [line.rpartition("\r")[2] for line in lines if "peft-steer train: error:" in line]
    assert len(errors) == 1 and errors[0].startswith("peft-steer train: error:"), lines
    assert len(lines) == 1 or not alone, lines
    return errors[0]


BAD_NUMBERS = {
    "--learning-rate inf": "--learning-rate inf: must be a finite number above 0",
    "--learning-rate 0": "--learning-rate 0: must be a finite number above 0",
    "--beta nan": "--beta nan: must be a finite number above 0",
    "--epochs 0": "--epochs 0: must be a finite number above 0",
    "--epochs nan": "--epochs nan: must be a finite number above 0",
    "--warmup-steps nan": "--warmup-steps nan: must be a finite number, 0 or more",
    "--weight-decay -0.1": "--weight-decay -0.1: must be a finite number, 0 or more",
    "--batch-size 0": "--batch-size 0: must be a whole number, 1 or more",
    "--gradient-accumulation-steps 0": "--gradient-accumulation-steps 0: must be a whole number, 1 or more",
    "--max-length 0": "--max-length 0: must be a whole number, 1 or more",
    "--save-steps 0": "--save-steps 0: must be a whole number, 1 or more",
    "--logging-steps -1": "--logging-steps -1: must be a whole number, 1 or more",
    "--max-steps 0": "--max-steps 0: must be a whole number, 1 or more (or -1: train for --epochs)",
}


@pytest.mark.parametrize("option", list(BAD_NUMBERS))
def test_bad_numbers_exit_2_with_one_line_and_write_nothing(tmp_path, model_dir, capsys, option):
    output = tmp_path / "run"
    # After FAST, so that the bad value is the one argparse keeps.
    assert main([*_base(model_dir, tmp_path, output), *option.split()]) == 2
    assert BAD_NUMBERS[option] in _one_error_line(capsys)
    assert not output.exists()


def test_a_non_empty_output_dir_without_checkpoints_is_refused(tmp_path, model_dir, capsys):
    output = tmp_path / "run"
    output.mkdir()
    (output / "README.md").write_text("my notes")
    (output / "adapter_config.json").write_text("{}")
    assert main(_base(model_dir, tmp_path, output)) == 2
    line = _one_error_line(capsys)
    assert f"--output-dir {output}" in line and "not empty" in line
    assert sorted(os.listdir(output)) == ["README.md", "adapter_config.json"]  # nothing written or overwritten
    assert (output / "README.md").read_text() == "my notes"
    # --resume does not open it either: it holds no checkpoint to resume.
    assert main([*_base(model_dir, tmp_path, output), "--resume"]) == 2
    assert "holds no checkpoint-*" in _one_error_line(capsys)
    assert sorted(os.listdir(output)) == ["README.md", "adapter_config.json"]


def test_an_empty_output_dir_is_used(tmp_path, model_dir):
    output = tmp_path / "run"
    output.mkdir()
    assert main(_base(model_dir, tmp_path, output)) == 0
    assert os.path.isfile(output / "adapter_model.safetensors")


def test_a_failure_after_the_checks_leaves_no_empty_output_dir(tmp_path, model_dir, monkeypatch, capsys):
    # The Trainer creates the output folder when it is built; a run that fails before writing into it removes it.
    def fails(self, *args, **kwargs):
        raise ValueError("stopped before the first step")

    monkeypatch.setattr(SteerTrainer, "train", fails)
    output = tmp_path / "run"
    assert main(_base(model_dir, tmp_path, output)) == 2
    assert "stopped before the first step" in _one_error_line(capsys, alone=False)
    assert not output.exists()


def _final_vector(output) -> torch.Tensor:
    return peft_steer.get_vectors(PeftModel.from_pretrained(make_model("llama"), output))[1]


def test_resume_skips_a_checkpoint_cut_off_while_being_written(tmp_path, model_dir, capsys):
    output = tmp_path / "run"
    base = [*_base(model_dir, tmp_path, output), "--max-steps", "4", "--save-steps", "2"]
    assert main(base) == 0
    uninterrupted = _final_vector(output)
    # As a kill while checkpoint-4 was written leaves it: the weights cut short, trainer_state.json not yet there.
    newest = output / "checkpoint-4"
    (newest / "trainer_state.json").unlink()
    weights = newest / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    capsys.readouterr()
    assert main([*base, "--resume"]) == 0
    out = capsys.readouterr().out
    assert f"Resuming from {output / 'checkpoint-2'}" in out and "checkpoint-4 is incomplete" in out
    torch.testing.assert_close(_final_vector(output), uninterrupted, atol=1e-6, rtol=1e-6)
    assert os.path.isfile(newest / "trainer_state.json")  # written again, whole
    # A cut-off checkpoint named explicitly is refused; with none complete, --resume alone is too.
    (newest / "trainer_state.json").unlink()
    assert main([*base, "--resume", str(newest)]) == 2
    assert f"--resume {newest}: checkpoint-4 is incomplete" in _one_error_line(capsys)
    (output / "checkpoint-2" / "trainer_state.json").unlink()
    assert main([*base, "--resume"]) == 2
    assert "no complete checkpoint" in _one_error_line(capsys)


def test_a_full_disk_at_the_final_save_keeps_the_earlier_adapter(tmp_path, model_dir, monkeypatch, capsys):
    output = tmp_path / "run"
    base = [*_base(model_dir, tmp_path, output), "--save-steps", "2"]
    assert main(base) == 0
    before = _final_vector(output)
    fail_weight_writes(monkeypatch, when=lambda path: "checkpoint-" not in path and "vectors" not in path)
    capsys.readouterr()
    assert main([*base, "--max-steps", "4", "--resume"]) == 2
    assert "No space left on device" in _one_error_line(capsys, alone=False)
    # The adapter of the first run still loads, whole; nothing half-written is left beside the output folder.
    torch.testing.assert_close(_final_vector(output), before)
    assert os.path.isdir(output / "checkpoint-4")
    assert sorted(os.listdir(tmp_path)) == sorted(["pairs.csv", "run", "tiny-llama"])


def test_a_run_whose_vector_diverges_stops_and_saves_nothing(tmp_path, model_dir, capsys):
    output = tmp_path / "run"
    # AdamW moves each coordinate by about the learning rate: 1e30 after step 1, then the activations overflow.
    arguments = [*_base(model_dir, tmp_path, output), "--max-steps", "4", "--save-steps", "1", "--learning-rate"]
    assert main([*arguments, "1e30"]) == 2
    line = _one_error_line(capsys, alone=False)
    assert "step 2" in line and "not finite" in line
    assert sorted(name for name in os.listdir(output) if name.startswith("checkpoint-")) == ["checkpoint-1"]
    assert not os.path.exists(output / "adapter_model.safetensors")


def test_resume_skips_a_checkpoint_whose_state_does_not_parse_and_says_so(tmp_path, model_dir, capsys):
    """A full disk leaves a 0-byte trainer_state.json: the checkpoint is incomplete, not a JSON error (issue 24)."""
    output = tmp_path / "run"
    for step, state in ((2, "{}"), (4, "")):
        (output / f"checkpoint-{step}").mkdir(parents=True)
        (output / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    assert checked_output(str(output), True) == str(output / "checkpoint-2")
    said = capsys.readouterr().out
    assert f"Resuming from {output / 'checkpoint-2'}; " in said
    assert "checkpoint-4 is incomplete (its trainer_state.json does not parse" in said
    with pytest.raises(CommandError, match="checkpoint-4 is incomplete .*trainer_state.json does not parse"):
        checked_output(str(output), str(output / "checkpoint-4"))
    # a folder that is no checkpoint at all: said so, not "cut off while being written"
    assert main([*_base(model_dir, tmp_path, output), "--resume", "/etc"]) == 2
    assert "--resume /etc: no checkpoint there" in _one_error_line(capsys)


@pytest.mark.parametrize("writer", ["torch.save", "safetensors"])
def test_a_full_disk_while_a_checkpoint_is_written_is_one_line(tmp_path, model_dir, monkeypatch, capsys, writer):
    """Not a RuntimeError / SafetensorError traceback (issue 24); --resume then skips the cut-off checkpoint."""
    import peft.peft_model
    from safetensors import SafetensorError

    def full_disk(*args, **kwargs):
        if writer == "torch.save":
            raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file")
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, message: "No space left on device" })')

    if writer == "torch.save":
        monkeypatch.setattr(torch, "save", full_disk)
    else:
        monkeypatch.setattr(peft.peft_model, "safe_save_file", full_disk)
    output = tmp_path / "run"
    assert main([*_base(model_dir, tmp_path, output), "--max-steps", "1", "--save-steps", "1"]) == 2
    line = _one_error_line(capsys, alone=False)
    assert f"writing a checkpoint to {output} failed" in line and "disk full" in line and "--resume" in line
