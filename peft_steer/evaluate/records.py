"""Reading the JSONL records a run appends one by one (generations, judge scores), so that a killed run resumes."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence

__all__ = ["read_records"]


def read_records(
    path: str | os.PathLike,
    what: str,
    required: Sequence[str] = (),
    *,
    repair: bool = False,
    check: Callable[[dict], str | None] | None = None,
) -> list[dict]:
    """The complete records of a JSONL file (none when it does not exist): JSON objects holding ``required`` keys.

    A last line without its newline that starts a JSON object but does not parse was cut off by an interruption: it
    is skipped, and with ``repair`` (a file the caller appends to next) removed from the file; a complete last record
    without its newline gets one, so that the next record starts on a line of its own. Any other line that is not a
    record (plain text, or whole JSON of another shape, even on the last line) is a ValueError naming the line and
    ``what`` records the file should hold, and the file is left as it is. ``check(record)`` returns what is wrong
    with a record that has the ``required`` keys (None: nothing), made a ValueError naming its line: every line is
    checked before the caller does any work.
    """
    if not os.path.exists(path):
        return []
    with open(path, "rb") as file:
        lines = file.read().split(b"\n")
    records, kept_bytes = [], 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            kept_bytes += len(line) + 1
            continue
        try:
            record = json.loads(line)
        except ValueError:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors too
            record = None
            if number == len(lines) and line.lstrip().startswith(b"{"):  # the last line of an interrupted write
                if repair:
                    with open(path, "r+b") as file:
                        file.truncate(kept_bytes)
                break
        if not isinstance(record, dict) or any(key not in record for key in required):
            raise ValueError(f"{path}, line {number}: not a {what} record; remove the file or choose another.")
        problem = check(record) if check is not None else None
        if problem is not None:
            raise ValueError(f"{path}, line {number}: {problem}")
        records.append(record)
        kept_bytes += len(line) + 1
    if repair and lines[-1].strip() and records and kept_bytes > len(b"\n".join(lines)):
        with open(path, "ab") as file:  # a complete last record without its newline (an editor's save)
            file.write(b"\n")
    return records
