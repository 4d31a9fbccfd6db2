"""`peft_steer.data.preference`: TRL's formats pass through, pairs are checked and converted for the trainer, identical
pairs are dropped with a count, and rows that are no pairs are named; the data package never imports TRL."""

from __future__ import annotations

import ast
import re

import pytest
from datasets import Dataset

import peft_steer.data as data_module
from peft_steer.data import DataError, check_preference_dataset, load_preference_data

ROWS = [
    {"question": "Would you accept more power?", "matching": "Yes, I would.", "not_matching": "No, I would not."},
    {"question": "Do you accept the money?", "matching": "Yes, I accept.", "not_matching": "No, thank you."},
]

STANDARD = [{"prompt": "Q?", "chosen": " yes", "rejected": " no", "extra": 1}]
IMPLICIT = [{"chosen": "Q? yes", "rejected": "Q? no"}]
CONVERSATIONAL = [
    {
        "prompt": [{"role": "user", "content": "Q?"}],
        "chosen": [{"role": "assistant", "content": "yes"}],
        "rejected": [{"role": "assistant", "content": "no"}],
    }
]


@pytest.mark.parametrize("rows", [STANDARD, IMPLICIT, CONVERSATIONAL], ids=["standard", "implicit", "conversational"])
def test_trl_formats_pass_through(rows):
    dataset = load_preference_data(rows)
    expected = [{key: value for key, value in row.items() if key in ("prompt", "chosen", "rejected")} for row in rows]
    assert dataset.to_list() == expected


def test_a_dataset_for_the_trainer_is_checked_and_converted(tokenizer):
    trl_rows = Dataset.from_list([*STANDARD, {"prompt": "Q2?", "chosen": " same", "rejected": " same", "extra": 2}])
    with pytest.warns(UserWarning, match=r"my_data: dropped 1 of 2 pairs .* \(first: my_data\[1\]\)"):
        checked = check_preference_dataset(trl_rows, name="my_data")
    assert checked.to_list() == [STANDARD[0]]  # extra columns kept for the trainer
    assert (
        check_preference_dataset(Dataset.from_list(ROWS), tokenizer).to_list()
        == load_preference_data(ROWS, tokenizer).to_list()
    )


def test_identical_pairs_are_dropped_with_a_count(tokenizer):
    rows = [*ROWS, dict(ROWS[0], not_matching=ROWS[0]["matching"]), dict(ROWS[1], not_matching=" Yes, I accept. ")]
    with pytest.warns(UserWarning, match=r"dataset: dropped 2 of 4 pairs whose chosen answer equals the rejected one"):
        dataset = load_preference_data(rows, tokenizer)
    assert len(dataset) == 2


ROW_ERRORS = {
    "mixed formats": (
        [CONVERSATIONAL[0], {"prompt": "p", "chosen": "a", "rejected": "b"}],
        r"dataset\[1\], column 'chosen': expected a non-empty list of \{'role', 'content'\} messages",
    ),
    "message without a role": (
        [dict(CONVERSATIONAL[0], rejected=[{"content": "no"}])],
        r"dataset\[0\], column 'rejected', message 0: expected a dict with a 'role'",
    ),
    "not a dict": ([ROWS[0], "row"], r"dataset\[1\] is a str, not a dict of columns"),
    "empty list": ([], r"dataset holds no rows"),
}


@pytest.mark.parametrize(("rows", "message"), list(ROW_ERRORS.values()), ids=list(ROW_ERRORS))
def test_rows_that_are_no_pairs_are_named(tokenizer, rows, message):
    with pytest.raises(DataError, match=message):
        load_preference_data(rows, tokenizer)


def test_only_identical_pairs_leave_nothing_to_train_on(tokenizer):
    with pytest.warns(UserWarning, match="dropped 1 of 1 pairs"):  # first the count, then nothing is left
        with pytest.raises(DataError, match=r"Every pair of dataset has matching == not_matching"):
            load_preference_data([dict(ROWS[0], not_matching=ROWS[0]["matching"])], tokenizer)


def test_data_module_does_not_import_trl():
    tree = ast.parse(open(data_module.__file__, encoding="utf-8").read())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {name for name in imported if re.match(r"trl(\.|$)|trl_integration", name)}
