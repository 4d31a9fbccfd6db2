"""Steered open-ended generation for a list of multipliers, written as JSONL (one record per question and strength)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapter.control import has_steering, steering, steering_model
from ..data.batches import pad_id_of
from ..data.formats import plain_prompt


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
    **generate_kwargs,
) -> list[dict]:
    """Generate an answer to every question at every multiplier and write them to ``out_path`` (JSONL).

    Each record: ``id``, ``question``, ``multiplier``, ``prompt``, ``generation`` (the new text only). Greedy
    decoding unless ``generate_kwargs`` says otherwise. The prompts are padded on the left, as generation needs. The
    file is written as records are produced, so an interruption keeps what was generated.
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
    generate_kwargs.setdefault("do_sample", False)
    pad_id = pad_id_of(tokenizer, fallback=tokenizer.eos_token_id)
    device = next(model.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    records: list[dict] = []
    try:
        with open(out_path, "w", encoding="utf-8") as out:
            jobs = [(m, start) for m in multipliers for start in range(0, len(questions), batch_size)]
            for m, start in tqdm(jobs, desc="steered generation", disable=not progress):
                batch = list(questions[start : start + batch_size])
                prompts = [format_prompt(question) for question in batch]
                encoded = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
                with steer(model, multiplier=m), torch.no_grad():
                    output = model.generate(
                        **encoded, max_new_tokens=max_new_tokens, pad_token_id=pad_id, **generate_kwargs
                    )
                texts = tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
                for offset, (question, prompt, text) in enumerate(zip(batch, prompts, texts)):
                    record = {
                        "id": f"{m:+g}/{start + offset}",
                        "question": question,
                        "multiplier": m,
                        "prompt": prompt,
                        "generation": text,
                    }
                    out.write(json.dumps(record) + "\n")
                    out.flush()
                    records.append(record)
    finally:
        tokenizer.padding_side = side
    return records
