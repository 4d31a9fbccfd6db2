"""`peft_steer.data.files`: .csv / .json / .jsonl files read into the same pairs, and every error naming the file,
the line (or record) and the column. Sources that `datasets` reads are in test_files_datasets.py."""

from __future__ import annotations

import csv
import json

import pytest

from peft_steer.data import DataError, load_preference_data

ROWS = [
    {"question": "Would you accept more power?", "matching": "Yes, I would.", "not_matching": "No, I would not."},
    {"question": "Do you accept the money?", "matching": "Yes, I accept.", "not_matching": "No, thank you."},
]


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
    path = tmp_path / "inner.csv"
    path.write_text('question,matching,not_matching\nHe said "yes,a,b\nq2,a2,b2 "x\n', encoding="utf-8")
    dataset = load_preference_data(str(path), tokenizer)
    assert len(dataset) == 2 and 'He said "yes' in dataset[0]["prompt"] and dataset[1]["rejected"] == ' b2 "x</s>'


# (file name, its text, or None for no file and "/" for a folder; the error's text)
FILE_ERRORS = {
    "missing file": ("none.csv", None, r"none\.csv does not exist"),
    "unsupported type": ("pairs.txt", "x", r"pairs\.txt: unsupported file type '\.txt'"),
    "empty file": ("empty.csv", "", r"empty\.csv holds no rows"),
    "header only": ("head.csv", "question,matching,not_matching\n", r"head\.csv holds no rows"),
    "missing column": (
        "cols.csv",
        "question,matching\nq,a\n",
        r"cols\.csv has no column 'not_matching' \(its columns: \['question', 'matching'\]\)",
    ),
    "neither format": ("other.csv", "a,b\n1,2\n", r"other\.csv has no column 'chosen', 'rejected'"),
    "short CSV row": (
        "short.csv",
        "question,matching,not_matching\nq,a,b\nq2,a2\n",
        r"short\.csv, line 3, column 'not_matching': the cell is missing",
    ),
    "long CSV row": (
        "long.csv",
        "question,matching,not_matching\nq,a,b,c\n",
        r"long\.csv, line 2: 4 cells, but the header has 3 columns",
    ),
    "unterminated quote": (
        "open.csv",
        'question,matching,not_matching\nq,a,b\nq2,a2,"b2\nq3,a3,b3\nq4,a4,b4\n',
        r"open\.csv, line 3: a quoted cell opens here and is never closed",
    ),
    "unterminated quote after a cell of two lines": (
        "open2.csv",
        'question,matching,not_matching\n"q\nstill q",a,"b\nq3,a3,b3\n',
        r"open2\.csv, line 3: a quoted cell opens here and is never closed",
    ),
    "unterminated quote in the header": (
        "open3.csv",
        'question,matching,"not_matching\nq,a,b\n',
        r"open3\.csv, line 1: a quoted cell opens here and is never closed",
    ),
    "folder": ("pairs.csv", "/", r"pairs\.csv is a folder with no data files"),
    "folder without a suffix": ("pairs", "/", r"pairs is a folder with no data files"),
    "empty answer": (
        "blank.csv",
        'question,matching,not_matching\nq,a,b\n"q\nq","  ",b\n',
        r"blank\.csv, line 3, column 'matching': the cell is empty",
    ),
    "number in JSONL": (
        "n.jsonl",
        '{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": 5, "rejected": "b"}\n',
        r"n\.jsonl, line 2, column 'chosen': the cell is a int \(5\), not text",
    ),
    "null in JSON": (
        "null.json",
        json.dumps([{"question": "q", "matching": None, "not_matching": "b"}]),
        r"null\.json, record 0 \(0-based\), column 'matching': the cell is missing \(null\)",
    ),
    "bad JSON": ("bad.json", "[{", r"bad\.json: not valid JSON"),
    "bad JSONL line": ("bad.jsonl", '{"chosen": "a"}\n{oops\n', r"bad\.jsonl, line 2: not valid JSON"),
    "JSON object": ("obj.json", '{"chosen": ["a"]}', r"obj\.json: expected a JSON array of objects"),
    "JSON array of lists": ("lists.json", "[[1, 2]]", r"lists\.json, record 0 \(0-based\): expected a JSON object"),
}


@pytest.mark.parametrize(("name", "text", "message"), list(FILE_ERRORS.values()), ids=list(FILE_ERRORS))
def test_a_bad_file_is_named_with_its_line_and_column(tmp_path, tokenizer, name, text, message):
    path = tmp_path / name
    if text == "/":
        path.mkdir()
    elif text is not None:
        path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        load_preference_data(str(path), tokenizer)


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85", "\x0c"])
def test_line_separators_inside_cells_are_text_not_line_ends(tmp_path, separator):
    """JSON Lines and CSV end a line at "\\n" only (issue 24): str.splitlines would also break at these."""
    from peft_steer.data.files import read_source

    jsonl = tmp_path / "pairs.jsonl"
    record = {"question": f"a{separator}b", "matching": "Yes", "not_matching": "No"}
    jsonl.write_text(
        json.dumps(record, ensure_ascii=False) + "\r\n" + json.dumps(record, ensure_ascii=False) + "\n",
        encoding="utf-8",
    )
    rows = read_source(str(jsonl))
    assert len(rows) == 2 and rows[1].values["question"] == f"a{separator}b"
    csv_file = tmp_path / "pairs.csv"
    csv_file.write_text(f"question,matching,not_matching\na{separator}b,Yes,No\r\nc,Yes,No\n", encoding="utf-8")
    rows = read_source(str(csv_file))
    assert [row.values["question"] for row in rows] == [f"a{separator}b", "c"]
