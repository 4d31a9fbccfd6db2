"""Reading preference rows from local files (.csv, .json, .jsonl), each row tagged with where it came from."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from typing import Any

FILE_TYPES = (".csv", ".json", ".jsonl")


class DataError(ValueError):
    """Preference data that cannot be used; the message names the file (or data set), the row and the column."""


@dataclass(frozen=True)
class Row:
    """One record and where it came from, for error messages."""

    values: dict[str, Any]
    where: str


def read_file(path: str) -> list[Row]:
    """The records of a .csv / .json / .jsonl file; a `DataError` names the file and line of what is wrong."""
    extension = os.path.splitext(path)[1].lower()
    if extension not in FILE_TYPES:
        raise DataError(f"{path}: unsupported file type {extension or '(none)'!r}; use one of {', '.join(FILE_TYPES)}.")
    if not os.path.isfile(path):
        raise DataError(f"{path} does not exist (or is not a file).")
    try:
        with open(path, encoding="utf-8-sig", newline="") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path} cannot be read as UTF-8 text: {error}") from None
    if extension == ".csv":
        return read_csv(text, path)
    if extension == ".jsonl":
        rows = []
        for line_number, line in enumerate(text.splitlines(), start=1):
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


def read_csv(text: str, path: str) -> list[Row]:
    """The rows of CSV ``text`` read from ``path``, keyed by its header; short rows get None for missing cells."""
    reader = csv.reader(text.splitlines(keepends=True))
    try:
        header = next(reader)
    except StopIteration:
        return []
    except csv.Error as error:
        raise DataError(f"{path}, line 1: not valid CSV ({error}).") from None
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
        if not cells:
            continue
        where = f"{path}, line {start}"
        if len(cells) > len(header):
            raise DataError(f"{where}: {len(cells)} cells, but the header has {len(header)} columns {header}.")
        # A short row leaves its last cells missing (None): reported as missing cells of those columns.
        rows.append(Row(dict(zip(header, cells + [None] * (len(header) - len(cells)))), where))
    return rows
