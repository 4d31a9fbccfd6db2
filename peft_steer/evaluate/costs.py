"""What a steering strength costs the model, measured against the same model unsteered (multiplier 0).

- drift: the mean KL divergence ``KL(steered || unsteered)`` of the next-token distribution at the end of each
  off-target prompt (e.g. `peft_steer.data.neutral_questions`): how far steering moves the model where the behavior
  is not asked for;
- perplexity: ``exp`` of the mean negative log-prob, under the unsteered model, of the tokens of the steered greedy
  answers to those prompts (pooled over all answer tokens): does the steered model still say what the model would
  find likely;
- repetition: the share of each answer's token n-grams that repeat an earlier one, averaged over answers: an
  answer that loops scores close to 1.

This module must not import TRL: data flows from ``peft_steer`` to ``trl_integration``, never back.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..adapter.control import steering
from ..data.batches import pad_id_of, prompt_token_ids
from .generation import generate_answers
from .log_probs import completion_log_probs, completion_token_ids
from .scoring import scored_batches

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["Cost", "next_token_drift", "perplexity", "repetition", "steering_costs"]


@dataclass
class Cost:
    """What one steering strength costs, against the unsteered model.

    Attributes:
        drift: Mean ``KL(steered || unsteered)`` of the next-token distribution after each prompt, in nats.
        perplexity: Perplexity of the steered answers under the unsteered model (NaN when no answer has a token).
        repetition: Mean share of repeated token n-grams of the steered answers (`repetition`).
        answers: The steered greedy answers, one per prompt.
    """

    drift: float
    perplexity: float
    repetition: float
    answers: list[str]


def repetition(sequence: str | Sequence[Hashable], n: int = 4) -> float:
    """The share of the n-grams of ``sequence`` that repeat an earlier n-gram of it: ``1 - distinct / total``.

    A string is read as words (its whitespace-separated pieces, punctuation kept on its word); any other sequence
    (e.g. an answer's token ids, which also catch a loop inside one word) as it is. A sequence with no repeated
    n-gram scores 0; one sentence of ``w`` items said ``k`` times in a row has ``k * w - n + 1`` n-grams of which
    ``w`` are distinct (for ``n <= w``), so it scores ``1 - w / (k * w - n + 1)``, towards 1 as it loops on. A sequence
    of fewer than ``n`` items has no n-gram and scores 0. This is rep-n of Welleck et al. (2019).
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}.")
    items = sequence.split() if isinstance(sequence, str) else list(sequence)
    grams = [tuple(items[i : i + n]) for i in range(len(items) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def perplexity(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    completions: Sequence[str],
    batch_size: int = 16,
    *,
    progress: bool | str = False,
) -> float:
    """Perplexity of the completions given their prompts, pooled over all completion tokens.

    ``exp(-sum of log p(token) / number of tokens)`` over every token of every completion, each scored after its
    prompt and the completion tokens before it (`completion_log_probs`, which tokenizes the same way: the prompt with
    the tokenizer's special tokens, the completion without). The model is scored as it stands: wrap the call in
    ``peft_steer.steering(model, multiplier=0)`` to score under the unsteered model. NaN when the completions have no
    token at all.
    """
    log_probs = completion_log_probs(model, tokenizer, prompts, completions, batch_size, progress=progress)
    tokens = sum(len(ids) for ids in completion_token_ids(tokenizer, completions))
    return math.exp(-float(log_probs.sum()) / tokens) if tokens else math.nan


def _log_softmax(logits: torch.Tensor) -> torch.Tensor:
    # one rounding for both sides of the KL: an unchanged distribution then has a divergence of exactly 0
    return torch.log_softmax(logits.float(), dim=-1)


def _next_token_log_probs(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[list[int]], batch_size: int, label: str
) -> torch.Tensor:
    """``[len(prompt_ids), vocab]`` float32 log-probs of the token after each prompt, in input order."""
    rows: dict[int, torch.Tensor] = {}

    def keep_log_probs(batch: list[int], input_ids: torch.Tensor, keep: torch.Tensor, logits: torch.Tensor):
        rows.update(zip(batch, _log_softmax(logits).cpu()))
        return torch.zeros(len(batch))

    _last_positions(model, tokenizer, prompt_ids, keep_log_probs, batch_size, label)
    return torch.stack([rows[i] for i in range(len(prompt_ids))])


def _last_positions(model, tokenizer, prompt_ids, score, batch_size, label) -> torch.Tensor:
    # The last prompt column predicts the next token; a `positions="completion"` adapter steers it (the prompt
    # ends after it), as it steers the letter position of the A/B score.
    return scored_batches(
        model,
        prompt_ids,
        [len(ids) for ids in prompt_ids],
        [(len(ids) - 1, len(ids)) for ids in prompt_ids],
        score,
        pad_id=pad_id_of(tokenizer),
        batch_size=batch_size,
        progress=label,
    )


def next_token_drift(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    multipliers: Iterable[float],
    batch_size: int = 16,
    *,
    progress: bool = False,
) -> dict[float, float]:
    """Mean ``KL(steered || unsteered)`` of the next-token distribution after each prompt, at each multiplier.

    Args:
        model: A PeftModel with a steering adapter; unsteered means ``peft_steer.steering(model, multiplier=0)``
            (a vector stacked on a LoRA keeps the LoRA).
        tokenizer: The model's tokenizer; each prompt gets its special tokens (one BOS).
        prompts: Off-target prompts, formatted as the model sees them (e.g. `peft_steer.data.neutral_questions`
            through ``PairFormatter(tokenizer).prompt``).
        multipliers: The strengths to measure.
        batch_size: Prompts per forward pass.
        progress: Show a tqdm bar per pass.

    Returns:
        ``{m: mean KL in nats}`` in the order given: 0 at multiplier 0, and at any strength of a zero vector.
    """
    prompt_ids = [prompt_token_ids(tokenizer, prompt) for prompt in prompts]
    if not prompt_ids or any(len(ids) == 0 for ids in prompt_ids):
        raise ValueError("next_token_drift needs at least one prompt, and no empty one.")
    with steering(model, multiplier=0.0):
        reference = _next_token_log_probs(model, tokenizer, prompt_ids, batch_size, "drift m=0" if progress else "")

    def divergence(batch: list[int], input_ids: torch.Tensor, keep: torch.Tensor, logits: torch.Tensor):
        steered = _log_softmax(logits).double()
        unsteered = reference[batch].to(steered.device, torch.float64)
        return (steered.exp() * (steered - unsteered)).sum(-1)

    drift = {}
    for m in [float(m) for m in multipliers]:
        with steering(model, multiplier=m):
            label = f"drift m={m:+g}" if progress else ""
            kl = _last_positions(model, tokenizer, prompt_ids, divergence, batch_size, label)
        drift[m] = float(kl.mean()) + 0.0  # + 0.0: a sum of -0.0 terms prints as 0
    return drift


def steering_costs(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    multipliers: Iterable[float],
    *,
    max_new_tokens: int = 32,
    n: int = 4,
    batch_size: int = 8,
    progress: bool = False,
) -> dict[float, Cost]:
    """Drift, perplexity and repetition of the steered model at each multiplier, on off-target prompts.

    At each strength ``m`` the model answers every prompt greedily (``max_new_tokens`` at most) inside
    ``peft_steer.steering(model, multiplier=m)``; the answers are scored under the unsteered model (multiplier 0)
    for perplexity, and for the repetition of their token ``n``-grams; drift is `next_token_drift` on the same
    prompts. The cost grows with ``len(prompts) * len(multipliers) * max_new_tokens`` (one generated token is one
    forward of a batch): a few prompts and short answers are enough to see a strength break the model.

    Args:
        model: A PeftModel with a steering adapter.
        tokenizer: The model's tokenizer.
        prompts: Off-target prompts, formatted as the model sees them.
        multipliers: The strengths to measure.
        max_new_tokens: Tokens per greedy answer at most.
        n: The n-gram length of `repetition` (tokens).
        batch_size: Prompts per forward pass and per ``generate`` call.
        progress: Show tqdm bars.

    Returns:
        ``{m: Cost}`` in the order given.
    """
    multipliers = [float(m) for m in multipliers]
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
    drift = next_token_drift(model, tokenizer, prompts, multipliers, batch_size, progress=progress)
    costs = {}
    for m in multipliers:
        with steering(model, multiplier=m):
            label = f"answers m={m:+g}" if progress else False
            answers = generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size, label)
        with steering(model, multiplier=0.0):
            label = f"perplexity m={m:+g}" if progress else False
            fluency = perplexity(model, tokenizer, prompts, answers, batch_size, progress=label)
        # on tokens: a loop inside one word ("ideideide") has no repeated word n-gram
        mean_repetition = sum(repetition(ids, n) for ids in completion_token_ids(tokenizer, answers)) / len(answers)
        costs[m] = Cost(drift=drift[m], perplexity=fluency, repetition=mean_repetition, answers=answers)
    return costs
