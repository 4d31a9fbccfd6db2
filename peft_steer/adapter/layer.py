"""`SteeringLayer`: the per-block piece that adds the active adapters' vectors to the block's output."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ._peft_compat import data_parallel_replica
from .blocks import hidden_of, with_hidden
from .context import adopted, caller_state, completion_mask

CHILD = "steer"  # name of the SteeringLayer child of a block; must not contain the prefix (PEFT skips those)


class SteeringState(Protocol):
    """What a layer reads from the `SteeringModel` that owns it: the vectors and configs of every adapter, the
    strength each has for the caller (where each prompt ends is the caller's too: `context.completion_mask`)."""

    steering_vectors: nn.ModuleDict
    peft_config: dict[str, Any]

    def multiplier_of(self, adapter_name: str) -> float | torch.Tensor: ...


class SteeringLayer(nn.Module, BaseTunerLayer):
    """Lives as child ``steer`` of a decoder block; a forward hook on that block adds ``sum_a m_a * v_a``.

    A child module plus a hook (instead of a wrapper that replaces the block) keeps every state-dict key of the
    base model unchanged and lets ``output_hidden_states`` record the steered output. The vectors themselves live
    on the `SteeringModel`, not here: a LoRA model underneath saves every parameter of every tuner layer in its
    tree, and would otherwise pick up the steering vectors as its own.
    """

    adapter_layer_names: tuple[str, ...] = ()
    # Set only on the copies nn.DataParallel runs in other threads: the open steering blocks of the caller's context.
    _caller_state: tuple | None = None

    def __init__(self, block: nn.Module, block_index: int, tuner: SteeringState) -> None:
        nn.Module.__init__(self)
        self.block_index = block_index
        self._active_adapter: list[str] = []
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        # A plain reference, not a submodule: the tuner owns this layer (registering it would make a cycle). The
        # vectors stay on the tuner: a LoRA underneath saves every parameter of its tuner layers, never theirs.
        object.__setattr__(self, "_tuner", tuner)
        # prepend=True: run before transformers' own output-recording hooks, so hidden states show the steered value.
        self._hook = block.register_forward_hook(self._steer_block_output, prepend=True)

    @property
    def tuner(self) -> SteeringState:
        """The `SteeringModel` that owns this layer and holds its vectors."""
        return self._tuner

    def remove(self) -> None:
        """Take the hook off the block (used by ``unload``)."""
        self._hook.remove()

    def _replicate_for_data_parallel(self) -> SteeringLayer:
        return data_parallel_replica(self, _caller_state=caller_state())

    def _get_available_adapters(self) -> set[str]:
        return {name for name, vectors in self._tuner.steering_vectors.items() if str(self.block_index) in vectors}

    def _all_available_adapter_names(self) -> list[str]:
        return sorted(self._get_available_adapters())

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError(
            "A steering vector is not merged into the weights in place; use merge_and_unload() on an architecture "
            "with an output bias, or keep the adapter."
        )

    def unmerge(self) -> None:
        return None

    def delta(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """``sum_a m_a * v_a`` over the active adapters that steer this block, shaped to add to ``hidden``.

        Computed in float32 (the vectors stay fp32 whatever the model dtype) and cast to the activation's dtype
        and device only for the addition.
        """
        tuner = self._tuner
        total: torch.Tensor | None = None
        for name in self.active_adapters:
            vectors = tuner.steering_vectors[name] if name in tuner.steering_vectors else None
            if vectors is None or str(self.block_index) not in vectors:
                continue
            vector = vectors[str(self.block_index)].to(hidden.device, torch.float32)
            term = _scale(vector, tuner.multiplier_of(name), hidden)
            if tuner.peft_config[name].positions == "completion":
                term = term * completion_mask(tuner, hidden)[..., None]
            total = term if total is None else total + term
        return None if total is None else total.to(hidden.dtype)

    def _steer_block_output(self, block: nn.Module, args: Any, output: Any) -> Any:
        if self._disable_adapters:
            return None
        hidden = hidden_of(output)
        # `block` is a copy of this layer's block when nn.DataParallel runs it in a thread of its own.
        with adopted(getattr(block, CHILD, self)._caller_state):
            delta = self.delta(hidden)
        if delta is None:
            return None
        return with_hidden(output, hidden + delta)

    def extra_repr(self) -> str:
        return f"block={self.block_index}, active={self.active_adapters}"


def _scale(vector: torch.Tensor, multiplier: float | torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """``multiplier * vector`` broadcastable to ``hidden`` ([batch, seq, hidden]); one multiplier per row allowed."""
    if isinstance(multiplier, torch.Tensor):
        if multiplier.shape[0] != hidden.shape[0]:
            raise ValueError(
                f"The steering multiplier tensor has {multiplier.shape[0]} values but the batch has "
                f"{hidden.shape[0]} rows: give one multiplier per row (generate with num_beams or "
                "num_return_sequences > 1 multiplies the rows)."
            )
        return multiplier.to(hidden.device, torch.float32)[:, None, None] * vector
    return multiplier * vector
