"""Steered open-ended generation for a list of multipliers, written as JSONL (one record per question and strength)."""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapter.control import has_steering, steering, steering_model
from ..data.batches import pad_id_of, prompt_token_ids
from ..data.formats import plain_prompt
from .records import read_records
from .scoring import model_device


def read_done(path: str | os.PathLike) -> list[dict]:
    """The complete generation records of a JSONL file an earlier run wrote (none when it does not exist); a last
    line cut off by an interruption is removed from the file (`read_records`)."""
    return read_records(path, "generation", ("question", "multiplier"), repair=True)


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
    **generate_kwargs,
) -> list[dict]:
    """Generate an answer to every question at every multiplier, appending each record to ``out_path`` (JSONL).

    Each record: ``id``, ``question``, ``multiplier``, ``prompt``, ``generation`` (the new text only). Greedy
    decoding unless ``generate_kwargs`` says otherwise. The prompts are padded on the left, as generation needs.
    Records are written as they are produced, and a rerun with the same ``out_path`` skips every (question,
    multiplier) the file already holds, so an interrupted run loses nothing and resumes. ``on_record`` is called
    with each new record. Returns the records of all questions and multipliers, in order (earlier ones included).
    """
    multipliers = [float(m) for m in multipliers]
    if not questions or not multipliers:
        raise ValueError("generate_sweep needs at least one question and one multiplier.")
    if has_steering(model):
        steer = steering
    elif any(multipliers):
        steering_model(model)  # raises the error that says how to add a steering adapter
    else:
        steer = lambda model, multiplier: nullcontext()  # noqa: E731  (an unsteered model at multiplier 0)
    done = {(record["question"], float(record["multiplier"])): record for record in read_done(out_path)}
    # one strength per forward: batches never mix multipliers
    batches = []
    for m in multipliers:
        left = [i for i, question in enumerate(questions) if (question, m) not in done]
        batches += [(m, left[start : start + batch_size]) for start in range(0, len(left), batch_size)]
    with open(out_path, "a", encoding="utf-8") as out:
        for m, batch in tqdm(batches, desc="steered generation", disable=not progress):
            prompts = [format_prompt(questions[i]) for i in batch]
            with steer(model, multiplier=m):
                texts = generated_texts(model, tokenizer, prompts, max_new_tokens, **generate_kwargs)
            for i, prompt, text in zip(batch, prompts, texts):
                record = {"id": f"{m:+g}/{i}", "question": questions[i], "multiplier": m, "prompt": prompt}
                record["generation"] = text
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
