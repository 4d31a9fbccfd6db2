"""Steering state that belongs to the caller, not to the model: the strengths of open ``steering()`` blocks, the prompt
ends of open ``prompt_lengths()`` blocks, and the first column of the forward running now.

Each lives in a `contextvars.ContextVar`, so every thread and every asyncio task sees its own: one model serves
concurrent requests, each at its own strength, and the model keeps only the stored strengths (``set_multiplier``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
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
    """Within the block, in this context only, ``owner``'s prompts end at ``lengths``."""
    return _opened(_PROMPT_ENDS, owner, lengths)


def prompt_end(owner: object) -> torch.Tensor | None:
    """The prompt lengths of the innermost open block of this context for ``owner``, or None outside any."""
    return next(_innermost(_PROMPT_ENDS, owner), None)


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
