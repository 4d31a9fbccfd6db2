"""Steering state that belongs to the caller, not to the model: the strengths of open ``steering()`` blocks, the prompt
ends of open ``prompt_lengths()`` blocks (and the completion positions and ``generate`` calls that follow from them),
and the first column of the forward running now.

Each lives in a `contextvars.ContextVar`, so every thread and every asyncio task sees its own: one model serves
concurrent requests, each at its own strength, and the model keeps only the stored strengths (``set_multiplier``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from typing import Any

import torch

Multiplier = float | torch.Tensor
# The open blocks of this context, oldest first, as (owner, value); the owner is the SteeringModel of the block.
Entries = tuple[tuple[object, Any], ...]

_STRENGTHS: ContextVar[Entries] = ContextVar("peft_steer_strengths", default=())
_PROMPT_ENDS: ContextVar[Entries] = ContextVar("peft_steer_prompt_ends", default=())
# (id of the SteeringModel, column), written at the start of each forward and read by its layers during that forward.
# An id, not the model: the thread's context outlives the forward and must not keep a deleted model alive.
_FIRST_COLUMN: ContextVar[tuple[int, int]] = ContextVar("peft_steer_first_column", default=(0, 0))


@contextmanager
def _opened(var: ContextVar[Entries], owner: object, value: Any) -> Iterator[None]:
    entry = (owner, value)
    var.set((*var.get(), entry))
    try:
        yield
    finally:
        # Remove this block's own entry wherever it stands: blocks left out of order (an ExitStack, a manual __exit__)
        # never bring back a value that an inner block saved before the outer one closed.
        var.set(tuple(open_entry for open_entry in var.get() if open_entry is not entry))


def _innermost(var: ContextVar[Entries], owner: object) -> Iterator[Any]:
    return (value for entry_owner, value in reversed(var.get()) if entry_owner is owner)


def strengths(owner: object, values: Mapping[str, Multiplier]) -> AbstractContextManager[None]:
    """Within the block, in this context only, adapter ``name`` of ``owner`` steers at ``values[name]``."""
    return _opened(_STRENGTHS, owner, dict(values))


def strength(owner: object, adapter_name: str) -> Multiplier | None:
    """The strength of the innermost open block of this context for ``owner``'s adapter, or None outside any."""
    return next((values[adapter_name] for values in _innermost(_STRENGTHS, owner) if adapter_name in values), None)


def prompt_ends(owner: object, lengths: torch.Tensor) -> AbstractContextManager[None]:
    """Within the block, in this context only, ``owner``'s prompts end at ``lengths`` (one per row): steering with
    ``positions='completion'`` covers column ``lengths[row] - 1`` onwards."""
    lengths = torch.as_tensor(lengths)
    if lengths.dim() != 1:
        raise ValueError(f"prompt lengths must be a 1-D tensor with one length per row, got {tuple(lengths.shape)}.")
    return _opened(_PROMPT_ENDS, owner, lengths)


def prompt_end(owner: object) -> torch.Tensor | None:
    """The prompt lengths of the innermost open block of this context for ``owner``, or None outside any."""
    return next(_innermost(_PROMPT_ENDS, owner), None)


def completion_mask(owner: object, hidden: torch.Tensor) -> torch.Tensor:
    """``[batch, seq]`` float mask of the positions of ``hidden`` that ``owner`` steers under
    ``positions='completion'``: from each row's last prompt token on, in the forward running now."""
    lengths = prompt_end(owner)
    if lengths is None:
        raise ValueError(
            "SteeringConfig(positions='completion') needs to know where each prompt ends: call generate(), or run "
            "the forward inside peft_steer.prompt_lengths(model, lengths) (in the same thread or task)."
        )
    lengths = lengths.to(hidden.device)
    if lengths.shape[0] != hidden.shape[0]:
        raise ValueError(f"{lengths.shape[0]} prompt lengths were given but the batch has {hidden.shape[0]} rows.")
    columns = first_column_of(owner) + torch.arange(hidden.shape[1], device=hidden.device)
    return (columns[None, :] >= lengths[:, None] - 1).float()


def generate_with_prompt_ends(owner: object, generate: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``generate(*args, **kwargs)`` inside `prompt_ends` of ``owner``, each row's prompt end read from the attention
    mask (left or right padding; without a mask, every row is the whole width)."""
    tokens = kwargs.get("input_ids", args[0] if args else None)
    mask = kwargs.get("attention_mask")
    if tokens is None:
        return generate(*args, **kwargs)
    if mask is None:
        lengths = torch.full((tokens.shape[0],), tokens.shape[1], device=tokens.device)
    else:
        columns = torch.arange(1, mask.shape[1] + 1, device=mask.device)
        lengths = (columns * (mask > 0)).max(dim=1).values  # one past each row's last real prompt token
    with prompt_ends(owner, lengths):
        return generate(*args, **kwargs)


def record_first_column(owner: object, column: int) -> None:
    """Remember, in this context, the first column of the forward that ``owner`` is starting."""
    _FIRST_COLUMN.set((id(owner), column))


def first_column_of(owner: object) -> int:
    """The first column recorded for ``owner``'s current forward (0 when none was)."""
    recorded_owner, column = _FIRST_COLUMN.get()
    return column if recorded_owner == id(owner) else 0


def caller_state() -> tuple[Entries, Entries]:
    """The open blocks of this context, for a copy of a layer that will run in another thread (nn.DataParallel)."""
    return _STRENGTHS.get(), _PROMPT_ENDS.get()


@contextmanager
def adopted(state: tuple[Entries, Entries] | None) -> Iterator[None]:
    """Within the block, see the open blocks ``state`` (from `caller_state`) instead of this context's.

    ``None`` (a layer that runs where its caller's context is) changes nothing.
    """
    if state is None:
        yield
        return
    tokens = [var.set(entries) for var, entries in zip((_STRENGTHS, _PROMPT_ENDS), state)]
    try:
        yield
    finally:
        for var, token in zip((_STRENGTHS, _PROMPT_ENDS), tokens):
            var.reset(token)
