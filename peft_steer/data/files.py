"""Reading preference rows, each tagged with where it came from: local .csv / .json / .jsonl files (read here, so that
an error names the line), and what `datasets.load_dataset` reads (.parquet / .arrow files, folders of data files,
folders written by `save_to_disk`, data sets on the Hugging Face Hub), whose errors name the row."""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass
from typing import Any

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

TEXT_FILE_TYPES = (".csv", ".json", ".jsonl")
DATASET_FILE_TYPES = (".parquet", ".arrow")
FILE_TYPES = TEXT_FILE_TYPES + DATASET_FILE_TYPES
# The `datasets` builder of each data file type; a folder is read with one builder.
_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json"}
_FOLDER_TYPES = (".parquet", ".arrow", ".csv", ".json", ".jsonl")
_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


class DataError(ValueError):
    """Preference data that cannot be used; the message names the file (or data set), the row and the column."""


@dataclass(frozen=True)
class Row:
    """One record and where it came from, for error messages."""

    values: dict[str, Any]
    where: str


def text_cell(row: Row, column: str, allow_empty: bool = False) -> str:
    """The text in ``column`` of ``row``; a `DataError` naming the row and column for a missing cell (a short CSV row,
    a JSON null or an absent key), one that is not text (a number, list or object), or an empty one (unless
    ``allow_empty``). The one cell check of every reader of rows: training, and each metric of ``eval``."""
    value = row.values.get(column)
    if value is None:
        raise DataError(f"{row.where}, column {column!r}: the cell is missing (null); it must be text.")
    if not isinstance(value, str):
        raise DataError(
            f"{row.where}, column {column!r}: the cell is a {type(value).__name__} ({value!r:.60}), not text."
        )
    if not allow_empty and not value.strip():
        raise DataError(f"{row.where}, column {column!r}: the cell is empty.")
    return value


def read_source(source: str) -> list[Row]:
    """The records of a local file or folder (`read_file`), or else of the Hub data set ``source`` (its train split)."""
    if os.path.exists(source) or not is_hub_id(source):
        return read_file(source)
    try:
        dataset = load_dataset(source, split="train")
    except Exception as error:  # datasets raises many types here (offline, not found, no train split, ...)
        raise DataError(
            f"{source} is no local file or folder, and loading it from the Hub failed: {_one_line(error)}"
        ) from None
    return dataset_rows(dataset, source)


def is_hub_id(source: str) -> bool:
    """Whether ``source``, which is not a local path, reads as a Hub data set id (``name`` or ``owner/name``) rather
    than as a missing file (a data file suffix, an absolute or relative path)."""
    extension = os.path.splitext(source)[1].lower()
    return bool(_HUB_ID.fullmatch(source)) and extension not in FILE_TYPES and not source.startswith(".")


def read_file(path: str) -> list[Row]:
    """The records of a local file or folder; a `DataError` names the file and line (.csv / .json / .jsonl) or row
    (what `datasets` reads: .parquet / .arrow files, folders of data files, `save_to_disk` folders) of what is wrong."""
    if os.path.isdir(path):
        return read_folder(path)
    extension = os.path.splitext(path)[1].lower()
    if extension not in FILE_TYPES:
        raise DataError(f"{path}: unsupported file type {extension or '(none)'!r}; use one of {', '.join(FILE_TYPES)}.")
    if not os.path.isfile(path):
        raise DataError(f"{path} does not exist (or is not a regular file).")
    if extension in DATASET_FILE_TYPES:
        return dataset_rows(_load(path, _BUILDERS[extension], [path], f"cannot be read as a {extension} file"), path)
    try:
        with open(path, encoding="utf-8-sig", newline="") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path} cannot be read as UTF-8 text: {error}") from None
    if extension == ".csv":
        return read_csv(text, path)
    if extension == ".jsonl":
        rows = []
        # "\n" only, as JSON Lines does: str.splitlines also breaks at U+2028, U+2029, \x85 and \x0c, which a JSON
        # string may hold unescaped (json.dumps(..., ensure_ascii=False) writes them); a "\r" left over is whitespace
        for line_number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}, line {line_number}: not valid JSON ({error.msg}).") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}, line {line_number}: expected a JSON object, got {type(record).__name__}.")
            rows.append(Row(record, f"{path}, line {line_number}"))
        return rows
    try:
        records = json.loads(text) if text.strip() else []
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error.msg}, line {error.lineno}).") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON array of objects (or use .jsonl), got a {type(records).__name__}.")
    rows = []
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(f"{path}, record {index} (0-based): expected a JSON object, got {type(record).__name__}.")
        rows.append(Row(record, f"{path}, record {index} (0-based)"))
    return rows


def read_folder(path: str) -> list[Row]:
    """The records of a folder: written by `save_to_disk` (its train split), or of data files of one type, read as
    `datasets.load_dataset(path, split="train")` reads them (every file, or those its split names pick)."""
    if os.path.isfile(os.path.join(path, "state.json")) or os.path.isfile(os.path.join(path, "dataset_dict.json")):
        saved = _load(path, None, [], "cannot be read as a folder written by save_to_disk")
        if isinstance(saved, DatasetDict):
            if "train" not in saved:
                raise DataError(f"{path} holds the splits {list(saved)}, and no 'train' split to train on.")
            saved = saved["train"]
        return dataset_rows(saved, path)
    found = sorted({os.path.splitext(name)[1].lower() for name in _files(path)} & set(_FOLDER_TYPES))
    if not found:
        raise DataError(
            f"{path} is a folder with no data files ({', '.join(_FOLDER_TYPES)}): give a data file, or a folder of "
            "them."
        )
    if len({_BUILDERS[extension] for extension in found}) > 1:
        raise DataError(
            f"{path} holds data files of more than one type ({', '.join(found)}): keep the files of one type in a "
            "folder, or give a file."
        )
    return dataset_rows(_load(path, "folder", [], "cannot be read as a data set"), path)


def dataset_rows(dataset: Dataset, label: str) -> list[Row]:
    """The records of a `Dataset` read from ``label``, each named by its row."""
    return [Row(dict(record), f"{label}, row {index} (0-based)") for index, record in enumerate(dataset)]


def _load(path: str, builder: str | None, data_files: list[str], failure: str) -> Dataset | DatasetDict:
    """``path`` read with `datasets`: a `save_to_disk` folder (``builder`` None), a folder (``"folder"``), or
    ``data_files`` with ``builder``; any error of `datasets` or pyarrow is a `DataError` naming ``path``."""
    try:
        if builder is None:
            return load_from_disk(path)
        if builder == "folder":
            return load_dataset(path, split="train")
        return load_dataset(builder, data_files=data_files, split="train")
    except Exception as error:  # datasets and pyarrow raise many types for a file they cannot read
        raise DataError(f"{path} {failure}: {_one_line(error)}") from None


def _files(folder: str) -> list[str]:
    """The files under ``folder``, leaving out hidden files and folders (``.git``, ``.cache``) as `datasets` does."""
    found = []
    for root, folders, names in os.walk(folder):
        folders[:] = [name for name in folders if not name.startswith((".", "__"))]
        found.extend(os.path.join(root, name) for name in names if not name.startswith((".", "__")))
    return found


def _one_line(error: Exception) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def read_csv(text: str, path: str) -> list[Row]:
    """The rows of CSV ``text`` read from ``path``, keyed by its header; short rows get None for missing cells.

    A quoted cell whose closing quote is missing is a `DataError` at the line where it opens: Python's reader would
    otherwise take the rest of the file as that one cell.
    """
    # CSV ends a record at "\n" or "\r\n" only; str.splitlines would also break at U+2028, U+2029, \x85 and \x0c
    lines = [line + "\n" for line in text.split("\n")]
    lines[-1] = lines[-1][:-1]
    if not lines[-1]:
        lines.pop()
    reader = csv.reader(lines)
    try:
        header = next(reader)
    except StopIteration:
        return []
    except csv.Error as error:
        raise DataError(f"{path}, line 1: not valid CSV ({error}).") from None
    _check_closed_quotes(lines, 1, reader.line_num, path)
    if len(set(header)) != len(header) or any(not column.strip() for column in header):
        raise DataError(f"{path}, line 1: the header {header} has an empty or repeated column name.")
    rows, end = [], reader.line_num
    while True:
        start = end + 1
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as error:
            raise DataError(f"{path}, line {start}: not valid CSV ({error}).") from None
        end = reader.line_num
        _check_closed_quotes(lines, start, end, path)
        if not cells:
            continue
        where = f"{path}, line {start}"
        if len(cells) > len(header):
            raise DataError(f"{where}: {len(cells)} cells, but the header has {len(header)} columns {header}.")
        # A short row leaves its last cells missing (None): reported as missing cells of those columns.
        rows.append(Row(dict(zip(header, cells + [None] * (len(header) - len(cells)))), where))
    return rows


def _check_closed_quotes(lines: list[str], start: int, end: int, path: str) -> None:
    """Raise if the record on lines ``start..end`` (1-based) ends inside a quoted cell.

    Only a record that runs to the end of the file can: the reader keeps reading lines while a quote is open.
    """
    if end < len(lines):
        return
    line = _unclosed_quote_line(lines[start - 1 : end], start)
    if line is not None:
        raise DataError(f'{path}, line {line}: a quoted cell opens here and is never closed (a missing ").')


def _unclosed_quote_line(lines: list[str], first: int) -> int | None:
    """Line number where a quoted cell opens and never closes in this record, or None; follows the csv module's
    default dialect (a quote opens a cell only at its start; ``""`` inside a quoted cell is a quote)."""
    state, opened = "start", None
    for number, line in enumerate(lines, start=first):
        for char in line:
            if state == "quoted":
                state = "quote?" if char == '"' else "quoted"
            elif state == "quote?" and char == '"':
                state = "quoted"  # a doubled quote: one quote character, the cell goes on
            elif char == ",":
                state = "start"
            elif state == "start" and char == '"':
                state, opened = "quoted", number
            else:
                state = "unquoted"
        if state != "quoted":  # the end of a line outside quotes ends the record
            state = "start"
    return opened if state == "quoted" else None
