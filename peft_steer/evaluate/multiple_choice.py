"""The A/B behavior score of CAA (Rimsky et al. 2023), the protocol for real chat models.

The question and its two choices are shown, the assistant's answer starts with "(", and the score of a question is
``p(matching letter) / (p(A) + p(B))`` for the next token; the behavior score is the mean over questions.

Which token is "the letter" depends on the tokenizer: on Llama-2 ``"A"`` alone is ``▁A`` but after ``(`` it is ``A``,
and on Llama-3 and Qwen2 ``(A`` is a single token. So the letter is never tokenized alone: ``prompt + "A"`` and
``prompt + "B"`` are tokenized whole and the letter is the token where they first differ (``letter_tokens``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from ..adapter.control import steering
from ..data.batches import prompt_token_ids
from ..data.formats import plain_prompt
from .scoring import scored_batches

CHOICES_FORMAT = "{question}\n\nChoices:\n(A) {A}\n(B) {B}"
LETTERS = ("A", "B")


def plain_ab_prompt(row: Mapping[str, str]) -> str:
    """Row -> prompt without a chat template: ``Question: <question and choices>\\nAnswer: (``."""
    return plain_prompt(CHOICES_FORMAT.format(question=row["question"], A=row["A"], B=row["B"])) + " ("


def chat_ab_prompt(tokenizer, system_prompt: str | None = None) -> Callable[[Mapping[str, str]], str]:
    """Row -> prompt: the question with its choices in the tokenizer's chat template, then ``(``.

    Without a chat template: `plain_ab_prompt`.
    """

    def format_prompt(row: Mapping[str, str]) -> str:
        user = CHOICES_FORMAT.format(question=row["question"], A=row["A"], B=row["B"])
        if getattr(tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": user}]
            if system_prompt:
                messages.insert(0, {"role": "system", "content": system_prompt})
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return text + " ("
        return plain_ab_prompt(row)

    return format_prompt


@dataclass(frozen=True)
class LetterTokens:
    """Where the answer letter of an A/B prompt stands, as the model sees it.

    ``prefix``: the ids common to ``prompt + "A"`` and ``prompt + "B"`` (BOS included), so the letter is read from the
    next-token distribution at position ``len(prefix) - 1``, and stands at position ``len(prefix)`` when appended.
    ``a`` / ``b``: the id of each letter there (e.g. Llama-2 ``A`` 29909 after ``▁(``; Llama-3 ``(A`` 4444 after a
    newline, where the prompt's ``(`` merged with the letter and left the prefix).
    """

    prefix: list[int]
    a: int
    b: int

    def of(self, letter: str) -> int:
        """The id of ``"A"`` or ``"B"``."""
        return self.a if letter == "A" else self.b


def letter_tokens(tokenizer, prompt: str, row: int | None = None) -> LetterTokens:
    """The common prefix of ``prompt + "A"`` and ``prompt + "B"`` and the one token of each letter after it.

    Both texts are tokenized whole, with special tokens and one BOS (``prompt_token_ids``). After their longest
    common prefix each must have exactly one token left (its letter, possibly merged with text before it, as ``(A``
    on Llama-3); anything else means the letter is no single next token, and is refused with a ValueError naming
    ``row`` (1-based) and the tokens.
    """
    ids = {letter: prompt_token_ids(tokenizer, prompt + letter) for letter in LETTERS}
    a, b = ids["A"], ids["B"]
    common = 0
    while common < min(len(a), len(b)) and a[common] == b[common]:
        common += 1
    where = f"A/B row {row}" if row is not None else "A/B prompt"
    if len(a) - common != 1 or len(b) - common != 1:
        shown = {letter: tokenizer.convert_ids_to_tokens(ids[letter][common:]) for letter in LETTERS}
        context = tokenizer.convert_ids_to_tokens(a[max(0, common - 3) : common])
        raise ValueError(
            f"{where}: the answer letter is not a single token after the prompt: after the common tokens ...{context}, "
            f"prompt + 'A' continues with {shown['A']} and prompt + 'B' with {shown['B']} (each needs exactly one "
            f"token there, its letter). The prompt ends with {prompt[-20:]!r}; use a format that ends where the "
            "tokenizer starts a new token before the letter, e.g. with ' (' or '\\n(' as chat_ab_prompt does."
        )
    if common == 0:
        shown_a = tokenizer.convert_ids_to_tokens(a)
        raise ValueError(f"{where}: the letter is the first token ({shown_a}), nothing before it predicts it.")
    return LetterTokens(prefix=a[:common], a=a[common], b=b[common])


def matching_letters(rows: Sequence[Mapping[str, str]], who: str = "ab_score") -> list[str]:
    """The matching letter of each A/B row (``"A"`` / ``"B"``; ``"(A)"`` is accepted), after checking its columns."""
    if not rows:
        raise ValueError(f"{who} needs at least one row (question, A, B, matching).")
    letters = []
    for number, row in enumerate(rows, start=1):
        missing = [column for column in ("question", "A", "B", "matching") if column not in row]
        if missing:
            raise ValueError(f"{who}: row {number} has no column(s) {missing}.")
        letter = str(row["matching"]).strip().strip("()").upper()
        if letter not in LETTERS:
            raise ValueError(f"{who}: row {number} has matching={row['matching']!r}; expected 'A' or 'B'.")
        letters.append(letter)
    return letters


def letter_log_probs(
    model: nn.Module, letters: Sequence[LetterTokens], batch_size: int = 16, progress: bool | str = False
) -> torch.Tensor:
    """``[len(letters), 2]`` float64 log-probs of (A, B) as the next token after each prefix, batched, in input order.

    A steering adapter with ``positions='completion'`` is told that each prompt ends at its prefix (so the position
    that predicts the letter is steered, as in ``completion_log_probs``).
    """
    ids = torch.tensor([[item.a, item.b] for item in letters], dtype=torch.long).reshape(-1, 2)

    def letter_pair(rows: list[int], input_ids: torch.Tensor, keep: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        last = logits.double()  # one kept position per row: the one after its prefix
        return last.gather(-1, ids[rows].to(last.device)) - torch.logsumexp(last, dim=-1, keepdim=True)

    return scored_batches(
        model,
        [item.prefix for item in letters],
        [len(item.prefix) for item in letters],
        [(len(item.prefix) - 1, len(item.prefix)) for item in letters],
        letter_pair,
        columns=2,
        batch_size=batch_size,
        progress=progress,
        description="A/B",
    )


def ab_margins(
    model: nn.Module,
    tokenizer,
    rows: Iterable[Mapping[str, str]],
    multipliers: Iterable[float] | None = None,
    format_prompt: Callable[[Mapping[str, str]], str] | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[float | None, torch.Tensor]:
    """Per row, ``log p(matching letter) - log p(other letter)`` (float64 ``[len(rows)]``): the margin whose sigmoid
    `ab_score` averages. Arguments and keys as in `ab_score`."""
    rows = list(rows)
    letters = matching_letters(rows, "ab_score")
    format_prompt = format_prompt or chat_ab_prompt(tokenizer)
    tokens = [letter_tokens(tokenizer, format_prompt(row), number) for number, row in enumerate(rows, start=1)]
    matching_is_a = torch.tensor([letter == "A" for letter in letters])
    margins: dict[float | None, torch.Tensor] = {}
    for m in [None] if multipliers is None else [float(m) for m in multipliers]:
        context = nullcontext() if m is None else steering(model, multiplier=m)
        label = ("A/B score" if m is None else f"A/B score m={m:+g}") if progress else False
        with context:
            log_probs = letter_log_probs(model, tokens, batch_size, label)
        margin = log_probs[:, 0] - log_probs[:, 1]
        margins[m] = torch.where(matching_is_a, margin, -margin)
    return margins


def ab_score(
    model: nn.Module,
    tokenizer,
    rows: Iterable[Mapping[str, str]],
    multipliers: Iterable[float] | None = None,
    format_prompt: Callable[[Mapping[str, str]], str] | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[float | None, float]:
    """Mean ``p(matching letter) / (p(A) + p(B))`` over rows with ``question``, ``A``, ``B``, ``matching``.

    Rows are e.g. a behavior's ``test_infer.csv`` (``peft_steer.data.read_behavior_rows(behavior, "test_infer")``);
    ``matching`` is ``"A"`` or ``"B"`` (``"(A)"`` is accepted too). Each letter is the token where ``prompt + "A"``
    and ``prompt + "B"`` first differ, read from the next-token distribution after their common prefix
    (``letter_tokens``; a format whose letters are not one token there is refused). With ``multipliers`` the score
    is measured once per strength inside ``peft_steer.steering(model, multiplier=m)``; returns ``{m: score}``
    (``{None: score}`` without multipliers). ``format_prompt`` defaults to ``chat_ab_prompt(tokenizer)``. The
    per-row margins are `ab_margins`.
    """
    margins = ab_margins(model, tokenizer, rows, multipliers, format_prompt, batch_size, progress)
    # sigmoid(log p(match) - log p(other)) = p(match) / (p(A) + p(B))
    return {m: float(torch.sigmoid(margin).mean()) for m, margin in margins.items()}
