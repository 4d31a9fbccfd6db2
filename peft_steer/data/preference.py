"""Preference data for BiPO: the paper's four behavior data sets and local files, as prompt / chosen / rejected.

Accepted inputs, detected from the column names:

- BiPO / CAA rows ``question, matching, not_matching``: turned into ``prompt`` (the question in the tokenizer's chat
  template, with the paper's system prompt) and ``chosen`` / ``rejected`` (the matching / not-matching answer as the
  assistant's turn). A tokenizer without a chat template (a base model) gets a plain ``Question: ...\\nAnswer:``
  format instead.
- TRL's preference formats, passed through unchanged: standard (``prompt``, ``chosen``, ``rejected`` strings; or
  ``chosen`` / ``rejected`` with the prompt inside them) and conversational (lists of ``{"role", "content"}``
  messages).

Sources: a behavior name (the copy shipped in ``peft_steer/data/behaviors``), a local ``.csv`` / ``.json`` / ``.jsonl``
file, what `datasets.load_dataset` reads (a ``.parquet`` / ``.arrow`` file, a folder of data files of one type, a folder
written by ``save_to_disk``, a Hub data set id: its train split), a `datasets.Dataset`, or a list of dicts. Bad data
raises `DataError` naming the file, the row (the line of a text file) and the column; pairs whose chosen answer equals
the rejected one are dropped with a warning that counts them.

This module must not import TRL: data flows from ``peft_steer`` to ``trl_integration``, never back.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

from datasets import Dataset

from ..caller import warn_at_caller
from .files import DataError, Row, read_source, text_cell
from .formats import SYSTEM_PROMPT, PairFormatter
from .shipped import BEHAVIORS, behavior_path

BIPO_COLUMNS = ("question", "matching", "not_matching")

Source = str | os.PathLike | Dataset | Sequence[dict]


def load_behavior(
    behavior: str,
    split: str = "train",
    tokenizer: Any = None,
    *,
    system_prompt: str | None = SYSTEM_PROMPT,
    chat_template: bool | None = None,
) -> Dataset:
    """One of the paper's behavior data sets as a prompt / chosen / rejected `Dataset` (see `load_preference_data`).

    Args:
        behavior: ``"hallucination"``, ``"jailbreak"``, ``"power-seeking"`` or ``"wealth-seeking"``.
        split: ``"train"`` or ``"test"`` (``test_infer`` holds A/B questions: read it with `read_behavior_rows`).
        tokenizer: Formats the prompts with its chat template; see `load_preference_data`.
        system_prompt: The system message of the chat format (the paper's by default; ``None`` for none).
        chat_template: ``None`` uses the tokenizer's chat template if it has one, ``False`` forces the plain format.
    """
    return load_preference_data(
        behavior_path(behavior, split), tokenizer, system_prompt=system_prompt, chat_template=chat_template
    )


def load_preference_data(
    source: Source,
    tokenizer: Any = None,
    *,
    system_prompt: str | None = SYSTEM_PROMPT,
    chat_template: bool | None = None,
    name: str | None = None,
) -> Dataset:
    """Read preference pairs from ``source`` and return a checked `Dataset` with prompt / chosen / rejected columns.

    Args:
        source: A behavior name (``"power-seeking"``...), a path to a ``.csv`` / ``.json`` (array of objects) /
            ``.jsonl`` / ``.parquet`` / ``.arrow`` file, a folder of data files of one type or one written by
            ``save_to_disk``, a Hub data set id (its train split), a `datasets.Dataset`, or a list of dicts.
        tokenizer: Needed for BiPO rows (question / matching / not_matching): their prompt is rendered with its chat
            template. Not needed for data already in a TRL preference format.
        system_prompt: System message for the chat format; ``None`` for none. A template that refuses a system role
            gets it as the first paragraph of the user turn instead. Unused by the plain format.
        chat_template: ``None``: the chat template if the tokenizer has one, else the plain format
            (``"Question: {question}\\nAnswer:"`` and `` {answer}``); ``True``: require one; ``False``: plain format.
        name: How errors refer to an in-memory source (default ``"dataset"``).

    Raises:
        DataError: The file is missing or unreadable, a column is missing, a cell is not text, or no pair is left.
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if path in BEHAVIORS:
            path = behavior_path(path)
        rows, label = read_source(path), path
    elif isinstance(source, Dataset):
        label = name or "dataset"
        rows = [Row(dict(record), f"{label}[{index}]") for index, record in enumerate(source)]
    elif isinstance(source, Sequence):
        label = name or "dataset"
        rows = []
        for index, record in enumerate(source):
            if not isinstance(record, dict):
                raise DataError(f"{label}[{index}] is a {type(record).__name__}, not a dict of columns.")
            rows.append(Row(dict(record), f"{label}[{index}]"))
    else:
        raise DataError(
            f"Cannot read preference data from a {type(source).__name__}: pass a behavior name, a file or folder path, "
            "a Hub data set id, a datasets.Dataset or a list of dicts."
        )
    columns = list(rows[0].values) if rows else (list(source.column_names) if isinstance(source, Dataset) else [])
    return _to_preference(rows, columns, label, tokenizer, system_prompt, chat_template)


def check_preference_dataset(
    dataset: Dataset,
    tokenizer: Any = None,
    *,
    name: str = "train_dataset",
    system_prompt: str | None = SYSTEM_PROMPT,
    chat_template: bool | None = None,
) -> Dataset:
    """Check (and if needed convert) a `Dataset` given to a trainer; returns prompt / chosen / rejected rows.

    BiPO rows are formatted as in `load_preference_data`; TRL-format rows are checked and kept as they are, with any
    extra columns. Rows whose chosen equals rejected are dropped with a warning.
    """
    columns = list(dataset.column_names)
    if _is_bipo(columns):
        return load_preference_data(
            dataset, tokenizer, system_prompt=system_prompt, chat_template=chat_template, name=name
        )
    rows = [Row(dict(record), f"{name}[{index}]") for index, record in enumerate(dataset)]
    keep = _check_trl_rows(rows, columns, name)
    if len(keep) == len(rows):
        return dataset
    return dataset.select(keep)


def _to_preference(
    rows: list[Row],
    columns: list[str],
    label: str,
    tokenizer: Any,
    system_prompt: str | None,
    chat_template: bool | None,
) -> Dataset:
    if not rows:
        raise DataError(f"{label} holds no rows: there is nothing to train on.")
    if _is_bipo(columns):
        return _from_bipo(rows, label, tokenizer, system_prompt, chat_template)
    keep = _check_trl_rows(rows, columns, label)
    names = [column for column in ("prompt", "chosen", "rejected") if column in columns]
    return Dataset.from_dict({column: [rows[i].values[column] for i in keep] for column in names})


def _is_bipo(columns: Iterable[str]) -> bool:
    return bool(set(BIPO_COLUMNS) & set(columns)) and not {"chosen", "rejected"} <= set(columns)


def _missing_columns(columns: list[str], wanted: Sequence[str], label: str) -> None:
    missing = [column for column in wanted if column not in columns]
    if missing:
        raise DataError(
            f"{label} has no column {', '.join(repr(c) for c in missing)} (its columns: {columns}). Preference data "
            "needs question / matching / not_matching (BiPO) or prompt / chosen / rejected (TRL's preference format)."
        )


def _messages(row: Row, column: str) -> list:
    value = row.values.get(column)
    if not isinstance(value, list) or not value:
        raise DataError(
            f"{row.where}, column {column!r}: expected a non-empty list of {{'role', 'content'}} messages (the rows "
            f"before it are conversational), got {type(value).__name__}."
        )
    for position, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise DataError(f"{row.where}, column {column!r}, message {position}: expected a dict with a 'role'.")
        if not isinstance(message.get("content"), (str, list)):
            raise DataError(
                f"{row.where}, column {column!r}, message {position}: 'content' is "
                f"{type(message.get('content')).__name__}, not text."
            )
    return value


def _check_trl_rows(rows: list[Row], columns: list[str], label: str) -> list[int]:
    """Check rows in a TRL preference format; return the indices of the rows to keep."""
    _missing_columns(columns, ("chosen", "rejected"), label)
    if not rows:
        raise DataError(f"{label} holds no rows: there is nothing to train on.")
    conversational = isinstance(rows[0].values.get("chosen"), list)
    keep, same = [], []
    for index, row in enumerate(rows):
        if conversational:
            chosen, rejected = _messages(row, "chosen"), _messages(row, "rejected")
            if "prompt" in columns:
                _messages(row, "prompt")
        else:
            chosen, rejected = text_cell(row, "chosen"), text_cell(row, "rejected")
            if "prompt" in columns:
                text_cell(row, "prompt", allow_empty=True)
        (same if chosen == rejected else keep).append(index)
    _warn_same(same, rows, label)
    if not keep:
        raise DataError(f"Every pair of {label} has chosen == rejected: there is nothing to train on.")
    return keep


def _warn_same(same: list[int], rows: list[Row], label: str) -> None:
    if same:
        warn_at_caller(
            f"{label}: dropped {len(same)} of {len(rows)} pairs whose chosen answer equals the rejected one (first: "
            f"{rows[same[0]].where}). They carry no preference."
        )


def _from_bipo(
    rows: list[Row], label: str, tokenizer: Any, system_prompt: str | None, chat_template: bool | None
) -> Dataset:
    _missing_columns(list(rows[0].values), BIPO_COLUMNS, label)
    formatter = PairFormatter(tokenizer, system_prompt=system_prompt, chat_template=chat_template)
    prompts, chosen, rejected, same = [], [], [], []
    for index, row in enumerate(rows):
        question = text_cell(row, "question", allow_empty=True)
        matching, not_matching = text_cell(row, "matching"), text_cell(row, "not_matching")
        if matching.strip() == not_matching.strip():
            same.append(index)
            continue
        prompt, completions = formatter(question, [matching, not_matching])
        prompts.append(prompt)
        chosen.append(completions[0])
        rejected.append(completions[1])
    _warn_same(same, rows, label)
    if not prompts:
        raise DataError(f"Every pair of {label} has matching == not_matching: there is nothing to train on.")
    return Dataset.from_dict({"prompt": prompts, "chosen": chosen, "rejected": rejected})
