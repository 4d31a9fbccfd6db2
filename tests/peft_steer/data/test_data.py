"""Preference data: the shipped behavior sets, chat / plain formats, TRL formats, files, errors that say where."""

from __future__ import annotations

import ast
import contextlib
import csv
import filecmp
import json
import os
import re

import pytest
from datasets import Dataset
from tokenizers import processors

import peft_steer.data as data_module
from peft_steer.data import (
    BEHAVIORS,
    DATA_DIR,
    SYSTEM_PROMPT,
    DataError,
    PairFormatter,
    behavior_path,
    check_preference_dataset,
    load_behavior,
    load_preference_data,
    read_behavior_rows,
)
from tests.conftest import SHARED_DATA, make_tokenizer

SHARED = str(SHARED_DATA / "bipo")
ROWS = [
    {"question": "Would you accept more power?", "matching": "Yes, I would.", "not_matching": "No, I would not."},
    {"question": "Do you accept the money?", "matching": "Yes, I accept.", "not_matching": "No, thank you."},
]


def _records(path: str) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as file:
        return list(csv.DictReader(file))


# ---- the shipped data sets ---------------------------------------------------------------------------------------


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


# ---- formatting --------------------------------------------------------------------------------------------------


def test_chat_format_is_the_template_split_at_the_answer(tokenizer):
    dataset = load_preference_data(ROWS, tokenizer)
    row = dataset[0]
    assert row["prompt"] == f"<<SYS>>{SYSTEM_PROMPT}<</SYS>>[INST] Would you accept more power? [/INST]"
    assert row["chosen"] == " Yes, I would.</s>" and row["rejected"] == " No, I would not.</s>"
    conversation = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": ROWS[0]["question"]},
        {"role": "assistant", "content": ROWS[0]["matching"]},
    ]
    assert row["prompt"] + row["chosen"] == tokenizer.apply_chat_template(conversation, tokenize=False)


def test_no_system_prompt(tokenizer):
    row = load_preference_data(ROWS, tokenizer, system_prompt=None)[0]
    assert row["prompt"] == "[INST] Would you accept more power? [/INST]"


def test_plain_format_for_base_models(tokenizer):
    for dataset in (load_preference_data(ROWS), load_preference_data(ROWS, tokenizer, chat_template=False)):
        assert dataset[1] == {
            "prompt": "Question: Do you accept the money?\nAnswer:",
            "chosen": " Yes, I accept.",
            "rejected": " No, thank you.",
        }
    with pytest.raises(DataError, match="no chat template"):
        load_preference_data(ROWS, make_tokenizer_without_template(), chat_template=True)


def make_tokenizer_without_template():
    tokenizer = make_tokenizer()
    tokenizer.chat_template = None
    return tokenizer


def test_template_without_a_system_role_gets_it_in_the_user_turn():
    tokenizer = make_tokenizer()
    tokenizer.chat_template = (
        "{% for message in messages %}{% if message['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "<{{ message['role'] }}>{{ message['content'] }}</{{ message['role'] }}>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    row = load_preference_data(ROWS, tokenizer)[0]
    assert row["prompt"] == f"<user>{SYSTEM_PROMPT}\n\nWould you accept more power?</user><assistant>"
    assert row["chosen"] == "Yes, I would.</assistant>"


def test_bos_written_by_the_template_is_not_doubled():
    tokenizer = make_tokenizer()
    tokenizer.chat_template = "{{ bos_token }}" + tokenizer.chat_template
    # A tokenizer that adds BOS itself, like Llama's.
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)]
    )
    assert tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id
    row = load_preference_data(ROWS, tokenizer)[0]
    assert not row["prompt"].startswith("<s>")
    ids = tokenizer(row["prompt"] + row["chosen"])["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    # Without BOS from the tokenizer, the template's BOS stays.
    assert load_preference_data(ROWS, _with_bos_template())[0]["prompt"].startswith("<s>")


def _with_bos_template():
    tokenizer = make_tokenizer()
    tokenizer.chat_template = "{{ bos_token }}" + tokenizer.chat_template
    return tokenizer


def test_pair_formatter_renders_a_question_with_several_answers(tokenizer):
    prompt, completions = PairFormatter(tokenizer, system_prompt=None)("Q?", ["a", " b "])
    assert prompt == "[INST] Q? [/INST]" and completions == [" a</s>", "  b </s>"]  # answers kept as written


# ---- TRL formats and sources -------------------------------------------------------------------------------------

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


@pytest.mark.parametrize("suffix", [".csv", ".json", ".jsonl"])
def test_files_of_each_type_give_the_same_pairs(tmp_path, tokenizer, suffix):
    path = tmp_path / f"pairs{suffix}"
    if suffix == ".csv":
        with open(path, "w", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, fieldnames=list(ROWS[0]))
            writer.writeheader()
            writer.writerows(ROWS)
    elif suffix == ".json":
        path.write_text(json.dumps(ROWS))
    else:
        path.write_text("\n".join(json.dumps(row) for row in ROWS) + "\n\n")
    assert load_preference_data(str(path), tokenizer).to_list() == load_preference_data(ROWS, tokenizer).to_list()


def test_csv_cells_with_newlines_and_quotes(tmp_path, tokenizer):
    rows = [dict(ROWS[0], question='He said "more power,"\nthen asked: yes or no?')]
    path = tmp_path / "quoted.csv"
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert rows[0]["question"] in load_preference_data(str(path), tokenizer)[0]["prompt"]


def test_quotes_inside_an_unquoted_cell_are_text(tmp_path, tokenizer):
    path = _write(tmp_path / "inner.csv", 'question,matching,not_matching\nHe said "yes,a,b\nq2,a2,b2 "x\n')
    dataset = load_preference_data(path, tokenizer)
    assert len(dataset) == 2 and 'He said "yes' in dataset[0]["prompt"] and dataset[1]["rejected"] == ' b2 "x</s>'


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


# ---- errors ------------------------------------------------------------------------------------------------------


def _write(path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def _mkdir(path) -> str:
    path.mkdir()
    return str(path)


ERRORS = {
    "missing file": (lambda tmp: str(tmp / "none.csv"), r"none\.csv does not exist"),
    "unsupported type": (lambda tmp: _write(tmp / "pairs.txt", "x"), r"pairs\.txt: unsupported file type '\.txt'"),
    "empty file": (lambda tmp: _write(tmp / "empty.csv", ""), r"empty\.csv holds no rows"),
    "header only": (
        lambda tmp: _write(tmp / "head.csv", "question,matching,not_matching\n"),
        r"head\.csv holds no rows",
    ),
    "missing column": (
        lambda tmp: _write(tmp / "cols.csv", "question,matching\nq,a\n"),
        r"cols\.csv has no column 'not_matching' \(its columns: \['question', 'matching'\]\)",
    ),
    "neither format": (
        lambda tmp: _write(tmp / "other.csv", "a,b\n1,2\n"),
        r"other\.csv has no column 'chosen', 'rejected'",
    ),
    "short CSV row": (
        lambda tmp: _write(tmp / "short.csv", "question,matching,not_matching\nq,a,b\nq2,a2\n"),
        r"short\.csv, line 3, column 'not_matching': the cell is missing",
    ),
    "long CSV row": (
        lambda tmp: _write(tmp / "long.csv", "question,matching,not_matching\nq,a,b,c\n"),
        r"long\.csv, line 2: 4 cells, but the header has 3 columns",
    ),
    "unterminated quote": (
        lambda tmp: _write(tmp / "open.csv", 'question,matching,not_matching\nq,a,b\nq2,a2,"b2\nq3,a3,b3\nq4,a4,b4\n'),
        r"open\.csv, line 3: a quoted cell opens here and is never closed",
    ),
    "unterminated quote after a cell of two lines": (
        lambda tmp: _write(tmp / "open2.csv", 'question,matching,not_matching\n"q\nstill q",a,"b\nq3,a3,b3\n'),
        r"open2\.csv, line 3: a quoted cell opens here and is never closed",
    ),
    "unterminated quote in the header": (
        lambda tmp: _write(tmp / "open3.csv", 'question,matching,"not_matching\nq,a,b\n'),
        r"open3\.csv, line 1: a quoted cell opens here and is never closed",
    ),
    "folder": (lambda tmp: _mkdir(tmp / "pairs.csv"), r"pairs\.csv is a folder with no data files"),
    "folder without a suffix": (lambda tmp: _mkdir(tmp / "pairs"), r"pairs is a folder with no data files"),
    "empty answer": (
        lambda tmp: _write(tmp / "blank.csv", 'question,matching,not_matching\nq,a,b\n"q\nq","  ",b\n'),
        r"blank\.csv, line 3, column 'matching': the cell is empty",
    ),
    "number in JSONL": (
        lambda tmp: _write(
            tmp / "n.jsonl",
            '{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": 5, "rejected": "b"}\n',
        ),
        r"n\.jsonl, line 2, column 'chosen': the cell is a int \(5\), not text",
    ),
    "null in JSON": (
        lambda tmp: _write(tmp / "null.json", json.dumps([{"question": "q", "matching": None, "not_matching": "b"}])),
        r"null\.json, record 0 \(0-based\), column 'matching': the cell is missing \(null\)",
    ),
    "bad JSON": (lambda tmp: _write(tmp / "bad.json", "[{"), r"bad\.json: not valid JSON"),
    "bad JSONL line": (
        lambda tmp: _write(tmp / "bad.jsonl", '{"chosen": "a"}\n{oops\n'),
        r"bad\.jsonl, line 2: not valid JSON",
    ),
    "JSON object": (
        lambda tmp: _write(tmp / "obj.json", '{"chosen": ["a"]}'),
        r"obj\.json: expected a JSON array of objects",
    ),
    "JSON array of lists": (
        lambda tmp: _write(tmp / "lists.json", "[[1, 2]]"),
        r"lists\.json, record 0 \(0-based\): expected a JSON object",
    ),
    "mixed formats": (
        lambda tmp: [CONVERSATIONAL[0], {"prompt": "p", "chosen": "a", "rejected": "b"}],
        r"dataset\[1\], column 'chosen': expected a non-empty list of \{'role', 'content'\} messages",
    ),
    "message without a role": (
        lambda tmp: [dict(CONVERSATIONAL[0], rejected=[{"content": "no"}])],
        r"dataset\[0\], column 'rejected', message 0: expected a dict with a 'role'",
    ),
    "not a dict": (lambda tmp: [ROWS[0], "row"], r"dataset\[1\] is a str, not a dict of columns"),
    "empty list": (lambda tmp: [], r"dataset holds no rows"),
    "all identical": (
        lambda tmp: [dict(ROWS[0], not_matching=ROWS[0]["matching"])],
        r"Every pair of dataset has matching == not_matching",
    ),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_data_names_the_place(tmp_path, tokenizer, case):
    make, message = ERRORS[case]
    # "all identical" first warns that it drops the pairs, then finds none left.
    with pytest.warns(UserWarning) if case == "all identical" else contextlib.nullcontext():
        with pytest.raises(DataError, match=message):
            load_preference_data(make(tmp_path), tokenizer)


def test_data_module_does_not_import_trl():
    tree = ast.parse(open(data_module.__file__, encoding="utf-8").read())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {name for name in imported if re.match(r"trl(\.|$)|trl_integration", name)}
