"""Preference data for BiPO: the paper's four behavior data sets and local files, as prompt / chosen / rejected.

Accepted inputs, detected from the column names:

- BiPO / CAA rows ``question, matching, not_matching``: turned into ``prompt`` (the question in the tokenizer's chat
  template, with the paper's system prompt) and ``chosen`` / ``rejected`` (the matching / not-matching answer as the
  assistant's turn). A tokenizer without a chat template (a base model) gets a plain ``Question: ...\\nAnswer:``
  format instead.
- TRL's preference formats, passed through unchanged: standard (``prompt``, ``chosen``, ``rejected`` strings; or
  ``chosen`` / ``rejected`` with the prompt inside them) and conversational (lists of ``{"role", "content"}``
  messages).

Sources: a behavior name (the copy shipped in ``peft_steer/datasets``), a local ``.csv`` / ``.json`` / ``.jsonl``
file, a `datasets.Dataset`, or a list of dicts. Bad data raises `DataError` naming the file, the row and the column;
pairs whose chosen answer equals the rejected one are dropped with a warning that counts them.

This module must not import TRL: data flows from ``peft_steer`` to ``trl_integration``, never back.
"""

from __future__ import annotations

import csv
import json
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from datasets import Dataset

BEHAVIORS = ("hallucination", "jailbreak", "power-seeking", "wealth-seeking")
SPLITS = ("train", "test", "test_infer")
DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "datasets")
# The system prompt of the official BiPO code (Llama-2 chat format).
SYSTEM_PROMPT = "You are a helpful, honest and concise assistant."
BIPO_COLUMNS = ("question", "matching", "not_matching")
FILE_TYPES = (".csv", ".json", ".jsonl")

Source = str | os.PathLike | Dataset | Sequence[dict]


class DataError(ValueError):
    """Preference data that cannot be used; the message names the file (or data set), the row and the column."""


@dataclass(frozen=True)
class _Row:
    """One record and where it came from, for error messages."""

    values: dict[str, Any]
    where: str


# ---- the shipped behavior data sets ------------------------------------------------------------------------------


def behavior_path(behavior: str, split: str = "train") -> str:
    """Path of the CSV file of ``behavior`` / ``split`` shipped in ``peft_steer/datasets``."""
    if behavior not in BEHAVIORS:
        raise DataError(f"Unknown behavior {behavior!r}: choose one of {', '.join(BEHAVIORS)}, or pass a file.")
    if split not in SPLITS:
        raise DataError(f"Unknown split {split!r} of behavior {behavior!r}: choose one of {', '.join(SPLITS)}.")
    return os.path.join(DATA_DIR, behavior, f"{split}.csv")


def read_behavior_rows(behavior: str, split: str = "train") -> list[dict[str, str]]:
    """The raw rows of a shipped data set, e.g. ``test_infer`` (question, A, B, matching) for A/B evaluation."""
    return [row.values for row in _read_file(behavior_path(behavior, split))]


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


# ---- loading and checking ----------------------------------------------------------------------------------------


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
            ``.jsonl`` file, a `datasets.Dataset`, or a list of dicts.
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
        rows, label = _read_file(path), path
    elif isinstance(source, Dataset):
        label = name or "dataset"
        rows = [_Row(dict(record), f"{label}[{index}]") for index, record in enumerate(source)]
    elif isinstance(source, Sequence):
        label = name or "dataset"
        rows = []
        for index, record in enumerate(source):
            if not isinstance(record, dict):
                raise DataError(f"{label}[{index}] is a {type(record).__name__}, not a dict of columns.")
            rows.append(_Row(dict(record), f"{label}[{index}]"))
    else:
        raise DataError(
            f"Cannot read preference data from a {type(source).__name__}: pass a behavior name, a .csv/.json/.jsonl "
            "path, a datasets.Dataset or a list of dicts."
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
    rows = [_Row(dict(record), f"{name}[{index}]") for index, record in enumerate(dataset)]
    keep = _check_trl_rows(rows, columns, name)
    if len(keep) == len(rows):
        return dataset
    return dataset.select(keep)


def _to_preference(
    rows: list[_Row],
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


def _text(row: _Row, column: str, allow_empty: bool = False) -> str:
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


def _messages(row: _Row, column: str) -> list:
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


def _check_trl_rows(rows: list[_Row], columns: list[str], label: str) -> list[int]:
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
            chosen, rejected = _text(row, "chosen"), _text(row, "rejected")
            if "prompt" in columns:
                _text(row, "prompt", allow_empty=True)
        (same if chosen == rejected else keep).append(index)
    _warn_same(same, rows, label)
    if not keep:
        raise DataError(f"Every pair of {label} has chosen == rejected: there is nothing to train on.")
    return keep


def _warn_same(same: list[int], rows: list[_Row], label: str) -> None:
    if same:
        warnings.warn(
            f"{label}: dropped {len(same)} of {len(rows)} pairs whose chosen answer equals the rejected one (first: "
            f"{rows[same[0]].where}). They carry no preference.",
            UserWarning,
            stacklevel=4,
        )


# ---- BiPO rows -> prompt / chosen / rejected ---------------------------------------------------------------------


def _from_bipo(
    rows: list[_Row], label: str, tokenizer: Any, system_prompt: str | None, chat_template: bool | None
) -> Dataset:
    _missing_columns(list(rows[0].values), BIPO_COLUMNS, label)
    formatter = PairFormatter(tokenizer, system_prompt=system_prompt, chat_template=chat_template)
    prompts, chosen, rejected, same = [], [], [], []
    for index, row in enumerate(rows):
        question = _text(row, "question", allow_empty=True)
        matching, not_matching = _text(row, "matching"), _text(row, "not_matching")
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


class PairFormatter:
    """Renders a question and its answers as prompt / completion text, the way the model sees them.

    With a chat template: the prompt is the system and user turns plus the generation prompt, and each completion is
    whatever the template adds for the assistant's answer (for Llama-2: ``" {answer} </s>"``, the official BiPO format).
    A leading BOS that the template writes as text is removed when the tokenizer adds BOS itself, so the model sees one.
    Without a template (a base model): ``"Question: {question}\\nAnswer:"`` and ``" {answer}"`` (EOS is added by the
    trainer).
    """

    def __init__(
        self, tokenizer: Any = None, *, system_prompt: str | None = SYSTEM_PROMPT, chat_template: bool | None = None
    ) -> None:
        has_template = tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))
        if chat_template and not has_template:
            raise DataError(
                "chat_template=True, but "
                + ("no tokenizer was given." if tokenizer is None else "the tokenizer has no chat template.")
            )
        self.tokenizer = tokenizer
        self.use_template = has_template if chat_template is None else bool(chat_template)
        self.system_prompt = system_prompt
        self._system_role: bool | None = None  # found out on the first question: does the template take it?
        self._strip_bos = False
        if self.use_template and tokenizer.bos_token:
            encoded = tokenizer("x")["input_ids"]
            self._strip_bos = bool(encoded) and encoded[0] == tokenizer.bos_token_id

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _turns(self, question: str) -> list[dict]:
        if not self.system_prompt:
            return [{"role": "user", "content": question}]
        if self._system_role is None:
            try:
                probe = [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": "?"}]
                self._render(probe, True)
                self._system_role = True
            except Exception:  # jinja raises TemplateError (or anything) when the template refuses a system role
                self._system_role = False
        if self._system_role:
            return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": question}]
        return [{"role": "user", "content": f"{self.system_prompt}\n\n{question}"}]

    def prompt(self, question: str) -> str:
        """The prompt text of ``question``."""
        if not self.use_template:
            return f"Question: {question}\nAnswer:"
        return self._without_bos(self._render(self._turns(question), True))

    def _without_bos(self, text: str) -> str:
        bos = self.tokenizer.bos_token
        return text[len(bos) :] if self._strip_bos and text.startswith(bos) else text

    def __call__(self, question: str, answers: Sequence[str]) -> tuple[str, list[str]]:
        """``(prompt, [completion of each answer])``."""
        prompt = self.prompt(question)
        if not self.use_template:
            return prompt, [f" {answer.strip()}" for answer in answers]
        turns = self._turns(question)
        completions = []
        for answer in answers:
            full = self._without_bos(self._render([*turns, {"role": "assistant", "content": answer.strip()}], False))
            # A template that renders the prompt differently alone than before an answer: keep the answer as BiPO
            # does (a leading space), the trainer adds EOS.
            completions.append(full[len(prompt) :] if full.startswith(prompt) else f" {answer.strip()}")
        return prompt, completions


# ---- files -------------------------------------------------------------------------------------------------------


def _read_file(path: str) -> list[_Row]:
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
        return _read_csv(text, path)
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
            rows.append(_Row(record, f"{path}, line {line_number}"))
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
        rows.append(_Row(record, f"{path}, record {index} (0-based)"))
    return rows


def _read_csv(text: str, path: str) -> list[_Row]:
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
        rows.append(_Row(dict(zip(header, cells + [None] * (len(header) - len(cells)))), where))
    return rows
