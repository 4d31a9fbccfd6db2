"""Steered open-ended generation for a list of multipliers, written as JSONL (one record per question and strength)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import reprlib
import textwrap
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from typing import IO, Any

try:
    import fcntl
except ImportError:  # Windows: runs, without the lock
    fcntl = None

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapter.control import has_steering, steering, steering_model
from ..data.batches import pad_id_of, prompt_token_ids
from ..data.formats import plain_prompt
from .records import read_records
from .scoring import model_device


def distinct_strengths(multipliers: Iterable[float]) -> list[float]:
    """The multipliers as floats, each once, in their first order (``1`` and ``1.0`` are one strength, so are ``-0``
    and ``0``: a record per strength, not per spelling)."""
    return list(dict.fromkeys(0.0 if float(m) == 0 else float(m) for m in multipliers))


def run_settings(max_new_tokens: int, generate_kwargs: Mapping[str, Any], settings: Mapping[str, Any] | None) -> dict:
    """What produced a sweep's records, stored in each: the caller's ``settings`` (the command line's: the model, the
    adapter's digest, the prompt format), ``max_new_tokens`` and the decoding options (greedy unless told)."""
    decoding = {"do_sample": False, **generate_kwargs}
    decoding = {name: _as_json(value) for name, value in sorted(decoding.items())}
    return {**(settings or {}), "max_new_tokens": max_new_tokens, "decoding": decoding}


def record_id(question: str, multiplier: float, settings: Mapping[str, Any]) -> str:
    """A short hash of what a record answers (question, multiplier, settings): the same in every run that makes it,
    whatever else the run asks, so that the judge, which keys on it, never takes one answer for another."""
    text = json.dumps([question, float(multiplier), settings], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def check_resumable(
    path: str | os.PathLike,
    max_new_tokens: int = 64,
    settings: Mapping[str, Any] | None = None,
    **generate_kwargs: Any,
) -> list[dict]:
    """The records a `generate_sweep` with these arguments would resume from ``path``, every line checked, without
    changing the file: call it before loading a model. Raises a ValueError naming the line of a record that is not a
    generation record or was made with other settings (naming the setting), and a BlockingIOError while another run
    writes ``path``."""
    recorded = run_settings(max_new_tokens, generate_kwargs, settings)
    if os.path.exists(path):
        with open(path, "rb") as file:
            _lock(file, path, exclusive=False)
    return _read_done(path, recorded, repair=False)


def _read_done(path: str | os.PathLike, settings: dict, repair: bool) -> list[dict]:
    seen: set[str] = set()

    def problem(record: dict) -> str | None:
        found = _record_problem(record, settings)
        if found is None and record["id"] in seen:
            found = f"repeats the record {record['id']} (same question, multiplier and settings): remove one of them."
        seen.add(record.get("id"))
        return found

    return read_records(path, "generation", ("question", "multiplier"), repair=repair, check=problem)


def _record_problem(record: dict, settings: dict) -> str | None:
    """What is wrong with a record of a file this run would resume, or None."""
    fix = "fix or remove that line, or write to another file."
    for name in ("id", "question", "prompt", "generation"):
        if not isinstance(record.get(name), str):
            return f"{name!r} is {_quoted(record.get(name))}, not text; {fix}"
    m = record["multiplier"]
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m):
        return f"'multiplier' is {_quoted(m)}, not a finite number; {fix}"
    if not isinstance(record.get("settings"), dict):
        return (
            "the record does not say what made it (an earlier peft-steer's file, with no 'settings'): move the file "
            "away or write to another one to generate afresh; nothing in it is taken for this run's answers."
        )
    if record["settings"] != settings:
        names = sorted({*settings, *record["settings"]})
        name = next(key for key in names if record["settings"].get(key) != settings.get(key))
        return (
            f"made with {name} {_quoted(record['settings'].get(name))}, this run has {_quoted(settings.get(name))}: "
            "rerun with the same settings to resume this file, or write to another file."
        )
    return None


def _lock(file: IO, path: str | os.PathLike, exclusive: bool = True) -> None:
    """Lock ``path`` through ``file`` for as long as it is open, or raise a BlockingIOError if another run holds it:
    two runs appending to one file would each write the records the other is writing."""
    if fcntl is None:  # not on POSIX: no lock to take
        return
    try:
        fcntl.flock(file.fileno(), (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        raise BlockingIOError(
            f"{path} is being written by another run (it holds the file's lock): wait for it to end, or write to "
            "another file."
        ) from None


def _as_json(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)


def _quoted(value: Any) -> str:
    return reprlib.repr(value)


def generate_sweep(
    model: nn.Module,
    tokenizer,
    questions: Sequence[str],
    multipliers: Iterable[float],
    out_path: str | os.PathLike,
    format_prompt: Callable[[str], str] = plain_prompt,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    progress: bool = True,
    on_record: Callable[[dict], None] | None = None,
    settings: Mapping[str, Any] | None = None,
    **generate_kwargs,
) -> list[dict]:
    """Generate an answer to every question at every multiplier, appending each record to ``out_path`` (JSONL).

    Each record: ``id`` (`record_id`), ``question``, ``multiplier``, ``prompt``, ``generation`` (the new text only)
    and ``settings`` (`run_settings`: ``settings``, which should name the model and adapter, ``max_new_tokens`` and
    the decoding options). Greedy decoding unless ``generate_kwargs`` says otherwise. The prompts are padded on the
    left, as generation needs. Repeated questions and multipliers are asked once. Records are written as they are
    produced, and a rerun with the same ``out_path`` skips every (question, multiplier) the file already holds, so an
    interrupted run loses nothing and resumes; a file made with other settings is refused (`check_resumable`), and
    so is a second run writing the same file at once (the file is locked). ``on_record`` is called with each new
    record. Returns the records of all questions and multipliers, in order (earlier ones included).
    """
    questions, multipliers = list(dict.fromkeys(questions)), distinct_strengths(multipliers)
    if not questions or not multipliers:
        raise ValueError("generate_sweep needs at least one question and one multiplier.")
    if has_steering(model):
        steer = steering
    elif any(multipliers):
        steering_model(model)  # raises the error that says how to add a steering adapter
    else:
        steer = lambda model, multiplier: nullcontext()  # noqa: E731  (an unsteered model at multiplier 0)
    recorded = run_settings(max_new_tokens, generate_kwargs, settings)
    with open(out_path, "a", encoding="utf-8") as out:
        _lock(out, out_path)
        done = {(r["question"], float(r["multiplier"])): r for r in _read_done(out_path, recorded, repair=True)}
        # one strength per forward: batches never mix multipliers
        batches = []
        for m in multipliers:
            left = [i for i, question in enumerate(questions) if (question, m) not in done]
            batches += [(m, left[start : start + batch_size]) for start in range(0, len(left), batch_size)]
        for m, batch in tqdm(batches, desc="steered generation", disable=not progress):
            prompts = [format_prompt(questions[i]) for i in batch]
            with steer(model, multiplier=m):
                texts = generated_texts(model, tokenizer, prompts, max_new_tokens, **generate_kwargs)
            for i, prompt, text in zip(batch, prompts, texts):
                record = {"id": record_id(questions[i], m, recorded), "question": questions[i], "multiplier": m}
                record.update(prompt=prompt, generation=text, settings=recorded)
                out.write(json.dumps(record) + "\n")
                out.flush()
                done[(questions[i], m)] = record
                if on_record is not None:
                    on_record(record)
    return [done[(question, m)] for m in multipliers for question in questions]


@torch.no_grad()
def generated_texts(
    model: nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int = 64, **generate_kwargs
) -> list[str]:
    """The new text of one ``generate`` call on ``prompts`` (one batch, padded on the left as generation needs,
    one BOS each), decoded without special tokens. Greedy unless ``generate_kwargs`` says otherwise; the model
    steers as it stands (wrap the call in ``peft_steer.steering``)."""
    generate_kwargs.setdefault("do_sample", False)
    pad_id = pad_id_of(tokenizer, fallback=tokenizer.eos_token_id)
    ids = [{"input_ids": prompt_token_ids(tokenizer, prompt)} for prompt in prompts]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        encoded = tokenizer.pad(ids, padding=True, return_tensors="pt").to(model_device(model))
    finally:
        tokenizer.padding_side = side
    output = model.generate(**encoded, max_new_tokens=max_new_tokens, pad_token_id=pad_id, **generate_kwargs)
    return tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)


def generate_answers(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    batch_size: int = 8,
    progress: bool | str = False,
    **generate_kwargs,
) -> list[str]:
    """The answer (new text only) to each prompt, in input order, ``batch_size`` prompts per ``generate`` call
    (`generated_texts`); greedy unless ``generate_kwargs`` says otherwise. The model steers as it stands: wrap the
    call in ``peft_steer.steering(model, multiplier=m)``. ``progress``: a tqdm bar (a string is its description)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    label = progress if isinstance(progress, str) else "generation"
    answers: list[str] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=label, disable=not progress, leave=False):
        batch = prompts[start : start + batch_size]
        answers += generated_texts(model, tokenizer, batch, max_new_tokens, **generate_kwargs)
    return answers


def side_by_side(records: list[dict], multipliers: list[float], width: int = 100) -> str:
    """Each question, then its answer at each multiplier, wrapped to ``width`` columns."""
    by_question: dict[str, dict[float, str]] = {}
    for record in records:
        by_question.setdefault(record["question"], {})[float(record["multiplier"])] = record["generation"]
    blocks = []
    for question, answers in by_question.items():
        lines = [textwrap.shorten(f"Q: {question}", width)]
        for m in multipliers:
            answer = " ".join(answers.get(m, "").split())
            lines += textwrap.wrap(answer, width, initial_indent=f"  m={m:+g}: ", subsequent_indent=" " * 10) or [
                f"  m={m:+g}: (empty)"
            ]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
