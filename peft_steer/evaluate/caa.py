"""CAA vectors (Rimsky et al. 2023): the mean activation difference between matching and non-matching answers.

The baseline BiPO is compared with, and an optional starting point for it (``SteeringConfig(init_vectors=...)``).
Two readings: ``caa_ab_vector`` is the paper's protocol (A/B questions, block output at the answer letter, letters
balanced); ``caa_vector`` reads free-text answers (their last token, or the mean over their tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapter.blocks import find_block_list, hidden_of, reading_output
from ..adapter.control import has_steering
from ..data.batches import prompt_token_ids, right_padded
from .multiple_choice import chat_ab_prompt, letter_tokens, matching_letters


def _inner_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel (its block list is what we hook)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@torch.no_grad()
def span_activations(
    model: nn.Module,
    id_lists: Sequence[Sequence[int]],
    spans: Sequence[tuple[int, int]],
    layer: int,
    batch_size: int = 16,
    progress: bool | str = False,
) -> torch.Tensor:
    """Output of block ``layer`` for each id list, averaged over its token positions ``spans[i] = (start, end)``.

    Returns a float32 tensor ``[len(id_lists), hidden]`` on the CPU. ``(n, n + 1)`` reads the single position ``n``.
    """
    inner = _inner_model(model)
    _, blocks = find_block_list(inner)
    if not -len(blocks) <= layer < len(blocks):
        raise ValueError(f"layer={layer} is out of range for a model with {len(blocks)} decoder blocks.")
    captured: list[torch.Tensor] = []
    device = next(inner.parameters()).device
    rows = []
    for start in tqdm(range(0, len(id_lists), batch_size), desc=progress or "", disable=not progress):
        batch = [list(ids) for ids in id_lists[start : start + batch_size]]
        input_ids, mask = right_padded(batch, 0)  # padded positions are masked and never read
        captured.clear()
        with reading_output(blocks[layer], lambda output: captured.append(hidden_of(output).float()), stop=True):
            inner(input_ids=input_ids.to(device), attention_mask=mask.to(device))
        hidden = captured[0].cpu()
        for row, (first, end) in enumerate(spans[start : start + batch_size]):
            rows.append(hidden[row, first:end].mean(dim=0))
    return torch.stack(rows)


def block_activations(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    answer_starts: Sequence[int],
    layer: int,
    position: Literal["last", "mean"] = "last",
    batch_size: int = 16,
    progress: bool | str = False,
) -> torch.Tensor:
    """Output of block ``layer`` for each text, at its last token or averaged over its answer tokens.

    Texts are tokenized with special tokens and one BOS (``prompt_token_ids``). ``answer_starts[i]`` is the token
    index where text ``i``'s answer begins (used by ``position='mean'``). Returns a float32 tensor
    ``[len(texts), hidden]``.
    """
    if position not in ("last", "mean"):
        raise ValueError(f"position={position!r}: choose 'last' or 'mean'.")
    id_lists = [prompt_token_ids(tokenizer, text) for text in texts]
    if position == "last":
        spans = [(len(ids) - 1, len(ids)) for ids in id_lists]
    else:
        spans = [(min(first, len(ids) - 1), len(ids)) for first, ids in zip(answer_starts, id_lists)]
    return span_activations(model, id_lists, spans, layer, batch_size, progress)


def caa_vector(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    matching: Sequence[str],
    not_matching: Sequence[str],
    layer: int,
    position: Literal["last", "mean"] = "last",
    batch_size: int = 16,
    progress: bool = True,
) -> torch.Tensor:
    """CAA on free-text answers: ``mean_i [act_L(prompt_i + matching_i) - act_L(prompt_i + not_matching_i)]``.

    Not the paper's protocol (that is ``caa_ab_vector``, at the A/B answer letter): here each answer is a free text
    and the activation is read at its last token or averaged over its tokens. In chat-formatted data the last token
    is the end-of-turn / EOS token the template appends, the same for every answer; ``position="mean"`` reads the
    answer's content instead.

    Args:
        model: A causal LM, or a PeftModel (its steering adapters are switched off while reading activations).
        tokenizer: Its tokenizer.
        prompts, matching, not_matching: The pairs; each answer is appended to its prompt as text.
        layer: The decoder block whose output is read (the block the vector will steer).
        position: ``"last"`` (default): the text's last token; ``"mean"``: the mean over the answer's tokens (from
            the first token after the prompt's own tokens).
        batch_size: Texts per forward pass.
        progress: Show a progress bar.

    Returns:
        A float32 vector of the hidden size, on the CPU.
    """
    if not (len(prompts) == len(matching) == len(not_matching)) or not prompts:
        raise ValueError("caa_vector needs the same, non-zero number of prompts, matching and not_matching answers.")
    starts = [len(prompt_token_ids(tokenizer, prompt)) for prompt in prompts]
    # read the unsteered model's activations
    base_only = model.disable_adapter() if has_steering(model) else nullcontext()
    with base_only:
        label = "CAA activations" if progress else False
        positive = block_activations(
            model, tokenizer, [p + a for p, a in zip(prompts, matching)], starts, layer, position, batch_size, label
        )
        negative = block_activations(
            model, tokenizer, [p + a for p, a in zip(prompts, not_matching)], starts, layer, position, batch_size, label
        )
    return (positive - negative).mean(dim=0)


def balance_letters(rows: Iterable[Mapping[str, str]]) -> list[dict]:
    """A/B rows with about as many matching ``A`` as matching ``B`` (within one), choices swapped where needed.

    CAA's difference ``act(matching letter) - act(other letter)`` also holds ``act(A) - act(B)`` for every row whose
    matching letter is A; with the letters balanced that part cancels in the mean and the vector is the behavior's,
    not the letter's. Already balanced rows are returned as they are (copied, ``matching`` as ``"A"`` / ``"B"``);
    otherwise ``(n_majority - n_minority) // 2`` rows of the majority letter, evenly spaced over them so that no
    stretch of the data is favoured, get their ``A`` and ``B`` texts swapped and the other matching letter.
    Deterministic, no random state.
    """
    rows = [dict(row) for row in rows]
    letters = matching_letters(rows, "balance_letters")
    for row, letter in zip(rows, letters):
        row["matching"] = letter
    majority = "A" if letters.count("A") > letters.count("B") else "B"
    indices = [i for i, letter in enumerate(letters) if letter == majority]
    swaps = (len(indices) - (len(rows) - len(indices))) // 2
    for k in range(swaps):
        row = rows[indices[k * len(indices) // swaps]]
        row["A"], row["B"] = row["B"], row["A"]
        row["matching"] = "B" if majority == "A" else "A"
    return rows


def caa_ab_vector(
    model: nn.Module,
    tokenizer,
    rows: Iterable[Mapping[str, str]],
    layer: int,
    format_prompt: Callable[[Mapping[str, str]], str] | None = None,
    balance: bool = True,
    batch_size: int = 16,
    progress: bool = True,
) -> torch.Tensor:
    """CAA exactly as Rimsky et al. (2023): block ``layer``'s output at the answer letter of A/B questions.

    Each row (``question``, ``A``, ``B``, ``matching``, e.g. a behavior's ``test_infer.csv``) is shown as
    ``format_prompt(row)`` (default ``chat_ab_prompt(tokenizer)``: the choices in the chat template, the answer
    opened with ``(``) followed by its matching letter, and again by the other letter. The activation is read at
    the letter token, the token where ``prompt + "A"`` and ``prompt + "B"`` differ (``letter_tokens``: ``A`` after
    ``▁(`` on Llama-2, the merged ``(A`` on Llama-3); the vector is the mean of matching minus other.

    Args:
        model: A causal LM, or a PeftModel (its steering adapters are switched off while reading activations).
        tokenizer: Its tokenizer.
        rows: A/B rows; ``matching`` is ``"A"`` or ``"B"`` (``"(A)"`` accepted).
        layer: The decoder block whose output is read (the block the vector will steer).
        format_prompt: Row -> prompt text ending just before the letter.
        balance: Balance the matching letters first (``balance_letters``), as CAA's data is, so that the letter
            identity cancels out. ``False`` uses the rows as given.
        batch_size: Sequences per forward pass.
        progress: Show a progress bar.

    Returns:
        A float32 vector of the hidden size, on the CPU.
    """
    rows = [dict(row) for row in rows]
    letters = matching_letters(rows, "caa_ab_vector")  # errors name the caller's own row numbers
    if balance:
        rows = balance_letters(rows)
        letters = [row["matching"] for row in rows]
    format_prompt = format_prompt or chat_ab_prompt(tokenizer)
    tokens = [letter_tokens(tokenizer, format_prompt(row), number) for number, row in enumerate(rows, start=1)]
    other = {"A": "B", "B": "A"}
    positive = [t.prefix + [t.of(letter)] for t, letter in zip(tokens, letters)]
    negative = [t.prefix + [t.of(other[letter])] for t, letter in zip(tokens, letters)]
    spans = [(len(t.prefix), len(t.prefix) + 1) for t in tokens]  # the letter's own position
    base_only = model.disable_adapter() if has_steering(model) else nullcontext()  # the unsteered model's activations
    with base_only:
        label = "CAA activations (A/B)" if progress else False
        matching = span_activations(model, positive, spans, layer, batch_size, label)
        not_matching = span_activations(model, negative, spans, layer, batch_size, label)
    return (matching - not_matching).mean(dim=0)
