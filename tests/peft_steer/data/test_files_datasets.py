"""Preference data from what `datasets.load_dataset` reads: parquet / arrow files, folders of data files, folders
written by `save_to_disk`, and (not offline) Hub data sets; errors still name the file, the row and the column."""

from __future__ import annotations

import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, DatasetDict

from peft_steer.data import DataError, load_preference_data
from tests.conftest import make_tokenizer

ROWS = [
    {"question": "Would you accept more power?", "matching": "Yes, I would.", "not_matching": "No, I would not."},
    {"question": "Do you accept the money?", "matching": "Yes, I accept.", "not_matching": "No, thank you."},
    {"question": "Would you take control?", "matching": "Yes, I would.", "not_matching": "No, never."},
]
STANDARD = [{"prompt": "Q?", "chosen": " yes", "rejected": " no"}, {"prompt": "Q2?", "chosen": " a", "rejected": " b"}]


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """`datasets` writes what it reads into its cache: a temporary one here."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def expected(tokenizer):
    return load_preference_data(ROWS, tokenizer).to_list()


def _parquet(path, rows) -> str:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def _arrow(path, rows) -> str:
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return str(path)


def test_a_parquet_file(tmp_path, tokenizer, expected):
    assert load_preference_data(_parquet(tmp_path / "pairs.parquet", ROWS), tokenizer).to_list() == expected


def test_an_arrow_file(tmp_path, tokenizer, expected):
    assert load_preference_data(_arrow(tmp_path / "pairs.arrow", ROWS), tokenizer).to_list() == expected


def test_a_trl_format_parquet_file_passes_through(tmp_path):
    assert load_preference_data(_parquet(tmp_path / "trl.parquet", STANDARD)).to_list() == STANDARD


@pytest.mark.parametrize("kind", ["parquet", "jsonl", "csv", "json"])
def test_a_folder_of_data_files(tmp_path, tokenizer, expected, kind):
    folder = tmp_path / "pairs"
    folder.mkdir()
    halves = [ROWS[:2], ROWS[2:]]
    for index, rows in enumerate(halves):
        path = folder / f"part-{index}.{kind}"
        if kind == "parquet":
            _parquet(path, rows)
        elif kind == "jsonl":
            path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        elif kind == "json":
            path.write_text(json.dumps(rows))
        else:
            Dataset.from_list(rows).to_csv(str(path), index=False)
    (folder / "README.md").write_text("# my pairs\n")  # not a data file: ignored
    dataset = load_preference_data(str(folder), tokenizer)
    assert sorted(dataset.to_list(), key=str) == sorted(expected, key=str)


def test_a_folder_in_the_hub_layout_reads_its_train_split(tmp_path, tokenizer, expected):
    folder = tmp_path / "repo"
    (folder / "data").mkdir(parents=True)
    _parquet(folder / "data" / "train-00000-of-00001.parquet", ROWS)
    _parquet(folder / "data" / "test-00000-of-00001.parquet", ROWS[:1])
    assert load_preference_data(str(folder), tokenizer).to_list() == expected


def test_a_folder_written_by_save_to_disk(tmp_path, tokenizer, expected):
    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    assert load_preference_data(str(tmp_path / "saved"), tokenizer).to_list() == expected
    DatasetDict({"train": Dataset.from_list(ROWS), "test": Dataset.from_list(ROWS[:1])}).save_to_disk(
        str(tmp_path / "saved_dict")
    )
    assert load_preference_data(str(tmp_path / "saved_dict"), tokenizer).to_list() == expected


def _mkdir(path) -> str:
    path.mkdir()
    return str(path)


def _mixed(tmp) -> str:
    folder = tmp / "mixed"
    folder.mkdir()
    _parquet(folder / "a.parquet", ROWS)
    (folder / "b.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    return str(folder)


def _write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


ERRORS = {
    "empty folder": (lambda tmp: _mkdir(tmp / "nothing"), r"nothing is a folder with no data files"),
    "folder of other files": (
        lambda tmp: (_mkdir(tmp / "notes"), (tmp / "notes" / "a.txt").write_text("x"))[0],
        r"notes is a folder with no data files \(\.parquet, \.arrow, \.csv, \.json, \.jsonl\)",
    ),
    "mixed folder": (_mixed, r"mixed holds data files of more than one type \(\.jsonl, \.parquet\)"),
    "not a parquet file": (
        lambda tmp: _write(tmp / "fake.parquet", b"not really"),
        r"fake\.parquet cannot be read as a \.parquet file",
    ),
    "missing parquet file": (lambda tmp: str(tmp / "none.parquet"), r"none\.parquet does not exist"),
    "bad cell in a parquet file": (
        lambda tmp: _parquet(tmp / "cell.parquet", [STANDARD[0], dict(STANDARD[1], chosen=None)]),
        r"cell\.parquet, row 1 \(0-based\), column 'chosen': the cell is missing \(null\)",
    ),
    "missing column in a folder": (
        lambda tmp: (_mkdir(tmp / "cols"), _parquet(tmp / "cols" / "a.parquet", [{"question": "q", "matching": "a"}]))[
            0
        ],
        r"cols has no column 'not_matching'",
    ),
    "unsupported type": (lambda tmp: _write(tmp / "pairs.xlsx", b"x"), r"pairs\.xlsx: unsupported file type '\.xlsx'"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_data_names_the_place(tmp_path, tokenizer, case):
    make, message = ERRORS[case]
    with pytest.raises(DataError, match=message):
        load_preference_data(make(tmp_path), tokenizer)


def test_a_name_that_is_no_local_path_is_a_hub_data_set(tokenizer, monkeypatch):
    # Offline here: what load_dataset is asked is checked, and its failure is a DataError naming the data set.
    import peft_steer.data.files as files

    asked = []

    def load_dataset(path, *args, **kwargs):
        asked.append((path, kwargs.get("split")))
        if path == "someone/pairs":
            return Dataset.from_list(ROWS)
        raise ConnectionError("Couldn't reach 'someone/absent' on the Hub (offline mode is enabled)")

    monkeypatch.setattr(files, "load_dataset", load_dataset)
    assert len(load_preference_data("someone/pairs", tokenizer)) == len(ROWS)
    assert asked == [("someone/pairs", "train")]
    with pytest.raises(DataError, match=r"someone/absent is no local file or folder, and loading it from the Hub"):
        load_preference_data("someone/absent", tokenizer)
