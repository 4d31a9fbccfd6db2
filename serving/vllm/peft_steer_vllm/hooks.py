"""`BlockSteerer`: forward hooks that add each request's steering to the outputs of the decoder blocks.

Before each forward, one index per token row says which vector it gets: row ``r`` of the batch table holds request
``r``'s vector for its prompt tokens, row ``R + r`` its vector for the tokens from the last prompt token on (they
differ when an adapter has ``positions="completion"``), row ``2R`` zeros (unsteered requests, padding). Each steered
block then adds ``table[index]`` to its output, as peft-steer's `SteeringLayer` does in transformers: ``sum_a m_a *
v_a``, computed in float32 and cast to the activations' dtype for the addition. A batch without a steered request
costs one dictionary look-up per forward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import rows as row_tables
from ._vllm_compat import decoder_blocks, is_missing, positions_of, query_start_loc
from .spec import Steering
from .vectors import SteeringVectors


class BlockSteerer:
    """Installs the hooks on ``model`` for ``adapters`` (name -> vectors, already checked against the model)."""

    def __init__(self, model: nn.Module, adapters: dict[str, SteeringVectors], num_blocks: int) -> None:
        blocks = decoder_blocks(model, num_blocks)
        self.adapters = adapters
        # float32 on the CPU, like the tables built from them; each block casts its table to the activations' dtype
        # and device once per batch (a quantized or offloaded model's parameters tell neither).
        self.vectors = {name: adapter.vectors for name, adapter in adapters.items()}
        self._index: torch.Tensor | None = None  # this forward's token row -> table row
        self._tables: dict[int, torch.Tensor] = {}  # block -> [2R + 1, hidden] float32 for the current batch
        self._cast: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}
        self._prompt_lens = torch.zeros(0, dtype=torch.long)
        self._built_for: tuple[int, int, int] | None = None  # (row table, its version, R) the tables are for
        steered = sorted({block for adapter in adapters.values() for block in adapter.vectors})
        self.handles = [
            model.register_forward_pre_hook(self._plan, with_kwargs=True),
            model.register_forward_hook(self._forget),
        ]
        self.handles += [
            blocks[block].register_forward_hook(self._hook(block)) for block in steered if not is_missing(blocks[block])
        ]

    def _plan(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self._index = None
        table = row_tables.current()
        if table is None or not table.rows:
            return
        starts, positions = query_start_loc(), positions_of(args, kwargs)
        if starts is None or positions is None:
            return
        requests = starts.numel() - 1
        if self._built_for != (id(table), table.version, requests):
            self._build(table.rows, requests)
            self._built_for = (id(table), table.version, requests)
        if not self._tables:
            return
        counts = (starts[1:] - starts[:-1]).to(positions.device)
        request_of = torch.repeat_interleave(torch.arange(requests, device=positions.device), counts)
        tokens = request_of.shape[0]
        # positions="completion" steers from the last prompt token on (its output predicts the first answer token)
        later = positions[:tokens] >= self._prompt_lens.to(positions.device)[request_of] - 1
        index = torch.full((positions.shape[0],), 2 * requests, dtype=torch.long, device=positions.device)
        index[:tokens] = request_of + requests * later
        self._index = index

    def _build(self, table_rows: dict[int, row_tables.Row], requests: int) -> None:
        """One ``[2R + 1, hidden]`` table per block that some request of the batch steers."""
        combined = {steering: self._combine(steering) for steering in {row.steering for row in table_rows.values()}}
        blocks = sorted({block for per_block in combined.values() for block in per_block})
        self._tables, self._cast = {}, {}
        width = next(iter(self.adapters.values())).hidden_size
        for block in blocks:
            table = torch.zeros(2 * requests + 1, width, dtype=torch.float32)
            for index, row in table_rows.items():
                if index < requests and block in combined[row.steering]:
                    table[index], table[requests + index] = combined[row.steering][block]
            self._tables[block] = table
        lengths = torch.full((requests,), 0, dtype=torch.long)
        for index, row in table_rows.items():
            if index < requests and row.prompt_len is not None:
                lengths[index] = row.prompt_len
        self._prompt_lens = lengths

    def _combine(self, steering: Steering) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Block -> (vector for prompt tokens, vector from the last prompt token on), in float32."""
        combined: dict[int, list[torch.Tensor]] = {}
        for name, multiplier in steering.terms:
            every_position = self.adapters[name].positions == "all"
            for block, vector in self.vectors[name].items():
                prompt, later = combined.setdefault(block, [torch.zeros_like(vector), torch.zeros_like(vector)])
                term = multiplier * vector
                later += term
                if every_position:
                    prompt += term
        return {block: (prompt, later) for block, (prompt, later) in combined.items()}

    def _hook(self, block: int):
        def steer(module: nn.Module, args: tuple, output: Any) -> Any:
            if self._index is None or block not in self._tables:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            key = (block, hidden.dtype, hidden.device)
            if key not in self._cast:
                self._cast[key] = self._tables[block].to(hidden.device, hidden.dtype)
            steered = hidden + self._cast[key][self._index.to(hidden.device)]
            return (steered, *output[1:]) if isinstance(output, tuple) else steered

        return steer

    def _forget(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._index = None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
