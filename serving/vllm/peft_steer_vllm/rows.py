"""`SteeringRows`: the logits processor that tells the block hooks which request sits in which batch row.

vLLM keeps running requests in a persistent batch and tells every logits processor, before each step, which rows
were added (with the request's `SamplingParams` and prompt), removed or moved. That is exactly what the hooks need:
the steering and prompt length of each row. The processor leaves the logits as they are. In the front end its
``validate_params`` refuses a bad steering field before the request reaches the engine (HTTP 400 on the server).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import config
from ._vllm_compat import BatchUpdate, LogitsProcessor, MoveDirectionality
from .config import LOAD_FORMAT, QUALNAME
from .spec import FIELD, Steering, parse

_current: SteeringRows | None = None  # the worker process's table (one engine, one model per worker process)


@dataclass(frozen=True)
class Row:
    """A steered request in the batch: its steering, and its prompt length (None for prompt embeddings)."""

    steering: Steering
    prompt_len: int | None


def requested(params: object) -> object | None:
    """The steering field of a request's `SamplingParams`, or None when it gives none."""
    extra = getattr(params, "extra_args", None) or {}
    return extra.get(FIELD)


class SteeringRows(LogitsProcessor):
    @classmethod
    def validate_params(cls, sampling_params) -> None:
        # Runs in the front end for every request: a bad field is refused there, never inside a running batch.
        value = requested(sampling_params)
        if value is not None:
            parse(value, config.current().adapters)

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        global _current
        if vllm_config.load_config.load_format != LOAD_FORMAT:
            raise ValueError(
                f"peft-steer-vllm: the logits processor {QUALNAME} needs load_format={LOAD_FORMAT!r} (it installs "
                "the steering hooks): start the engine with peft_steer_vllm.engine_args(...) or peft-steer-vllm serve."
            )
        serve = config.current()
        self.adapters = serve.adapters
        self.default = serve.default_steering()
        self.rows: dict[int, Row] = {}
        self.version = 0  # changes whenever a row changes: the hooks rebuild their per-row tables then
        _current = self

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        # vLLM's order: removed, then added, then moved.
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, params, prompt_ids, _ in batch_update.added:
            value = requested(params)
            steering = self.default if value is None else parse(value, self.adapters)
            if steering:
                self.rows[index] = Row(steering, None if prompt_ids is None else len(prompt_ids))
            else:
                self.rows.pop(index, None)
        for first, second, direction in batch_update.moved:
            a, b = self.rows.pop(first, None), self.rows.pop(second, None)
            if a is not None:
                self.rows[second] = a
            if b is not None and direction == MoveDirectionality.SWAP:
                self.rows[first] = b
        self.version += 1

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def is_argmax_invariant(self) -> bool:
        return True


def current() -> SteeringRows | None:
    """The row table of this worker process, once vLLM has built it."""
    return _current
