"""examples/train_bipo.py trains, saves a loadable adapter and scores it at multipliers -1, 0 and +1."""

from __future__ import annotations

import re

from peft import PeftModel

import peft_steer
from tests.conftest import make_model


def test_example_trains_and_scores(example_run):
    printed = re.findall(r"multiplier ([+-]\d): answer preference ([\d.]+) .* on 8 test pairs", example_run.printed)
    assert [sign for sign, _ in printed] == ["-1", "+0", "+1"]
    assert all(0.0 <= float(score) <= 1.0 for _, score in printed)
    loaded = PeftModel.from_pretrained(make_model("llama"), example_run.output_dir)
    assert loaded.peft_config["default"].layers == [1]
    assert set(peft_steer.get_vectors(loaded)) == {1}
