"""examples/train_bipo.py trains, saves a loadable adapter and scores it at multipliers -1, 0 and +1."""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

from peft import PeftModel

import peft_steer
from tests.conftest import make_model, make_tokenizer

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "train_bipo.py"


def test_example_trains_and_scores(tmp_path, monkeypatch, capsys):
    model_dir = tmp_path / "tiny"
    make_model("llama").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    output = tmp_path / "out"
    argv = ["train_bipo.py", "--model", str(model_dir), "--behavior", "wealth-seeking", "--layer", "1"]
    argv += ["--max-steps", "2", "--batch-size", "2", "--output-dir", str(output), "--eval-pairs", "4"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(SCRIPT), run_name="__main__")
    printed = re.findall(r"multiplier ([+-]\d): answer preference ([\d.]+) .* on 4 test pairs", capsys.readouterr().out)
    assert [sign for sign, _ in printed] == ["-1", "+0", "+1"]
    assert all(0.0 <= float(score) <= 1.0 for _, score in printed)
    loaded = PeftModel.from_pretrained(make_model("llama"), output)
    assert loaded.peft_config["default"].layers == [1]
    assert set(peft_steer.get_vectors(loaded)) == {1}
