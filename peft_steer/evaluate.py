"""Scoring a model's behavior: summed completion log-probs and the answer-preference score, with or without steering.

Answer preference: for a pair (question, matching, not_matching), the score is
``sigmoid(log p(matching | prompt) - log p(not_matching | prompt))`` with log-probs summed over the answer tokens;
the behavior score is its mean over the pairs. With ``multipliers`` it is measured once per steering strength,
through ``peft_steer.steering(model, multiplier=m)``.

This module must not import TRL: data flows from ``peft_steer`` to ``trl_integration``, never back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from .control import prompt_lengths, steering, steering_model

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def default_format_prompt(question: str) -> str:
    """The plain base-model format: ``Question: ...\\nAnswer:`` (completions are scored with a leading space)."""
    return f"Question: {question}\nAnswer:"


def _has_steering(model: nn.Module) -> bool:
    try:
        steering_model(model)
    except ValueError:
        return False
    return True


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@torch.no_grad()
def completion_log_probs(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    completions: Sequence[str],
    batch_size: int = 32,
    *,
    progress: bool | str = False,
) -> torch.Tensor:
    """Summed log-probability of each completion given its prompt.

    The prompt is tokenized with the tokenizer's special tokens (e.g. BOS), the completion without, and the two id
    lists are concatenated, so the boundary between them is exact. Rows are batched (sorted by length, padded on
    the right) and the result is returned in the input order.

    Args:
        model: A causal LM, or a PeftModel around one (a steering adapter with ``positions='completion'`` is told
            where each prompt ends).
        tokenizer: The model's tokenizer (a Hugging Face tokenizer; ``pad_token_id`` may be unset).
        prompts: One prompt per row.
        completions: One completion per row, scored token by token after its prompt. Include a leading space
            where the format needs one.
        batch_size: Rows per forward pass.
        progress: Show a tqdm bar; a string is used as its description.

    Returns:
        A float64 tensor of shape ``[len(prompts)]`` (per-token terms are summed in float64).
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    prompt_ids = [list(tokenizer(p, add_special_tokens=True)["input_ids"]) for p in prompts]
    completion_ids = [list(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in completions]
    if any(len(ids) == 0 for ids in prompt_ids):
        raise ValueError("An empty prompt (no tokens, not even BOS) cannot condition a completion.")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = _model_device(model)
    steered = _has_steering(model)
    order = sorted(range(len(prompts)), key=lambda i: len(prompt_ids[i]) + len(completion_ids[i]))
    result = torch.zeros(len(prompts), dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        starts = range(0, len(order), batch_size)
        description = progress if isinstance(progress, str) else "log-probs"
        for start in tqdm(starts, desc=description, disable=not progress, leave=False):
            rows = order[start : start + batch_size]
            lengths = [len(prompt_ids[i]) + len(completion_ids[i]) for i in rows]
            width = max(lengths)
            input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(rows), width), dtype=torch.long)
            scored = torch.zeros((len(rows), width), dtype=torch.bool)  # positions holding a completion token
            for r, i in enumerate(rows):
                ids = prompt_ids[i] + completion_ids[i]
                input_ids[r, : len(ids)] = torch.tensor(ids)
                attention[r, : len(ids)] = 1
                scored[r, len(prompt_ids[i]) : len(ids)] = True
            boundary = torch.tensor([len(prompt_ids[i]) for i in rows])
            context = prompt_lengths(model, boundary.to(device)) if steered else nullcontext()
            with context:
                logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
            # Only the positions that predict a completion token; float64 from the logsumexp on keeps the sum of
            # many per-token terms exact to float32 precision.
            predicting = scored[:, 1:].to(device)
            targets = input_ids[:, 1:].to(device)[predicting]
            selected = logits[:, :-1][predicting].float()
            token_log_probs = selected.gather(-1, targets[:, None]).squeeze(-1).double()
            token_log_probs = token_log_probs - torch.logsumexp(selected, dim=-1).double()
            row_of_token = torch.arange(len(rows), device=device)[:, None].expand_as(predicting)[predicting]
            sums = torch.zeros(len(rows), dtype=torch.float64, device=device).index_add_(
                0, row_of_token, token_log_probs
            )
            result[rows] = sums.cpu()
    finally:
        model.train(was_training)
    return result


@dataclass
class Preference:
    """Answer preference at one steering strength.

    Attributes:
        score: Mean over pairs of ``sigmoid(margin)``: 1 always prefers the matching answer, 0 never.
        margin: Mean log-prob margin, ``log p(matching) - log p(not_matching)`` (summed over answer tokens).
        margins: The per-pair margins, float64 tensor ``[n]``.
    """

    score: float
    margin: float
    margins: torch.Tensor

    @property
    def n(self) -> int:
        """Number of pairs scored."""
        return int(self.margins.numel())


def _field(row: Mapping[str, str] | Sequence[str], name: str, index: int) -> str:
    return row[name] if isinstance(row, Mapping) else row[index]


def answer_preference(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    rows: Iterable[Mapping[str, str] | Sequence[str]],
    format_prompt: Callable[[str], str] = default_format_prompt,
    multipliers: Iterable[float] | None = None,
    *,
    format_answer: Callable[[str], str] = lambda answer: " " + answer,
    batch_size: int = 32,
    progress: bool = True,
) -> dict[float | None, Preference]:
    """Mean answer preference (and mean log-prob margin) of ``model`` on preference pairs.

    Args:
        model: A causal LM or a PeftModel. With ``multipliers`` it must hold a steering adapter.
        tokenizer: The model's tokenizer.
        rows: Pairs as mappings with ``question``, ``matching`` and ``not_matching`` (e.g. rows of a behavior's
            ``test.csv``), or as ``(question, matching, not_matching)`` tuples.
        format_prompt: Question -> prompt text (e.g. ``functools.partial(organism.format_prompt, tag=TAG)``).
        multipliers: Steering strengths to measure at, each inside ``peft_steer.steering(model, multiplier=m)``;
            ``None`` measures the model as it is, once.
        format_answer: Answer -> completion text; by default the answer after one space.
        batch_size: Rows per forward pass.
        progress: Show a tqdm progress bar over the data.

    Returns:
        ``{m: Preference}`` for each multiplier in order, or ``{None: Preference}`` without multipliers.
    """
    rows = list(rows)
    if not rows:
        raise ValueError("answer_preference needs at least one (question, matching, not_matching) pair.")
    questions = [_field(row, "question", 0) for row in rows]
    prompts = [format_prompt(q) for q in questions]
    completions = [format_answer(_field(row, "matching", 1)) for row in rows]
    completions += [format_answer(_field(row, "not_matching", 2)) for row in rows]
    strengths: list[float | None] = [None] if multipliers is None else [float(m) for m in multipliers]
    if multipliers is not None and not _has_steering(model):
        raise ValueError("answer_preference(multipliers=...) needs a model with a steering adapter.")
    results: dict[float | None, Preference] = {}
    for m in strengths:
        context = nullcontext() if m is None else steering(model, multiplier=m)
        label = "answer preference" if m is None else f"answer preference m={m:+g}"
        with context:
            log_probs = completion_log_probs(
                model, tokenizer, prompts * 2, completions, batch_size=batch_size, progress=label if progress else False
            )
        margins = log_probs[: len(rows)] - log_probs[len(rows) :]
        results[m] = Preference(
            score=float(torch.sigmoid(margins).mean()), margin=float(margins.mean()), margins=margins
        )
    return results
