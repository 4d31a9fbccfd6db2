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
    if os.path.isdir(path):
        raise DataError(f"{path} is a folder, not a file: give a {', '.join(FILE_TYPES)} file.")
    extension = os.path.splitext(path)[1].lower()
    if extension not in FILE_TYPES:
        raise DataError(f"{path}: unsupported file type {extension or '(none)'!r}; use one of {', '.join(FILE_TYPES)}.")
    if not os.path.isfile(path):
        raise DataError(f"{path} does not exist (or is not a regular file).")
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
    """The rows of CSV ``text`` read from ``path``, keyed by its header; short rows get None for missing cells.

    A quoted cell whose closing quote is missing is a `DataError` at the line where it opens: Python's reader would
    otherwise take the rest of the file as that one cell.
    """
    lines = text.splitlines(keepends=True)
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
