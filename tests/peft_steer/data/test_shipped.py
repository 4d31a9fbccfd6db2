"""`peft_steer.data.shipped` and the behavior sets it ships: the official BiPO data, complete, with its license."""

from __future__ import annotations

import csv
import filecmp
import os

import pytest

from peft_steer.data import BEHAVIORS, DATA_DIR, DataError, behavior_path, load_behavior, read_behavior_rows
from tests.conftest import SHARED_DATA

SHARED = str(SHARED_DATA / "bipo")


def _records(path: str) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as file:
        return list(csv.DictReader(file))


@pytest.mark.parametrize("behavior", BEHAVIORS)
def test_shipped_behavior_sets_load_completely(behavior, tokenizer):
    for split in ("train", "test"):
        records = _records(behavior_path(behavior, split))
        dataset = load_behavior(behavior, split, tokenizer)
        assert dataset.column_names == ["prompt", "chosen", "rejected"]
        assert len(dataset) == len(records) > 0  # no pair lost (none has matching == not_matching)
        for index in (0, len(records) - 1):
            assert records[index]["question"] in dataset[index]["prompt"]
            assert dataset[index]["chosen"] == f" {records[index]['matching'].strip()}</s>"
            assert dataset[index]["rejected"] == f" {records[index]['not_matching'].strip()}</s>"
    assert len(read_behavior_rows(behavior, "test_infer")) == len(_records(behavior_path(behavior, "test")))


def test_shipped_files_are_the_official_data_with_its_license():
    with open(os.path.join(DATA_DIR, "LICENSE"), encoding="utf-8") as file:
        assert file.read().startswith("MIT License")
    if not os.path.isdir(SHARED):
        pytest.skip("the shared copy of the official data is not on this machine")
    for behavior in BEHAVIORS:
        for split in ("train", "test", "test_infer"):
            assert filecmp.cmp(behavior_path(behavior, split), os.path.join(SHARED, behavior, f"{split}.csv"), False)


def test_official_rows_with_an_empty_question_are_kept(tokenizer):
    # The official power-seeking set has two rows without a question; the official code trains on them.
    records = _records(behavior_path("power-seeking"))
    empty = [index for index, record in enumerate(records) if not record["question"].strip()]
    assert len(empty) == 2
    dataset = load_behavior("power-seeking", tokenizer=tokenizer)
    assert dataset[empty[0]]["chosen"] == f" {records[empty[0]]['matching']}</s>"


def test_unknown_behavior_and_split():
    with pytest.raises(DataError, match="Unknown behavior 'honesty'"):
        load_behavior("honesty")
    with pytest.raises(DataError, match="Unknown split 'dev'"):
        load_behavior("jailbreak", "dev")
