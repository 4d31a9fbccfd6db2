"""The prefix-activation cache: the output of blocks 0..L, computed once per training sequence.

Blocks 0..L do not depend on the steering vector of block L (the vector is added to block L's output), so their
output for a given token sequence never changes during training. The cache keeps it per sequence; each training step
then runs only blocks L+1..N-1, the final norm and the head: blocks 0..L-1 pass their input through unchanged and
block L returns the cached output, to which the steering hook on block L adds ``m * v`` exactly as on the plain path.

Sequences are keyed by their token ids, so the cache needs no dataset indices and works with any sampler, data
parallelism and resumed runs. It is filled during the reference pass (``precompute_ref_log_probs``) or, for a
sequence not seen yet, by a forward that stops at block L.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from peft_steer.adapter.blocks import find_block_list, reading_output

from ._accelerate_compat import has_offload_hook
from ._runtime import free_host_memory

logger = logging.getLogger(__name__)

STORAGES = ("auto", "device", "cpu", "disk", "off")
DROPOUT_OPTIONS = ("attention_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop", "hidden_dropout", "dropout")


def fallback_reason(inner_model: nn.Module, block: int) -> str | None:
    """Why blocks 0..``block`` of this model cannot be cached, or None when they can."""
    path, blocks = find_block_list(inner_model)
    prefix = list(blocks[: block + 1])
    trainable = [
        f"{path}.{index}.{name}"
        for index, module in enumerate(prefix)
        for name, parameter in module.named_parameters()
        if parameter.requires_grad
    ]
    if trainable:
        return f"blocks 0..{block} have trainable parameters ({trainable[0]}, ...), so their output changes"
    config = getattr(inner_model, "config", None)
    dropout = {name: getattr(config, name) for name in DROPOUT_OPTIONS if getattr(config, name, 0) or 0}
    if any(isinstance(m, nn.Dropout) and m.p > 0 for b in prefix for m in b.modules()) or dropout:
        return f"dropout is active in blocks 0..{block} ({dropout or 'nn.Dropout'}), so their output is random"
    if any(has_offload_hook(module) for module in prefix):
        return f"blocks 0..{block} are offloaded by accelerate hooks"
    return None


class PrefixCache:
    """Block ``block``'s output for each token sequence seen, on the accelerator, in host memory or on disk."""

    def __init__(self, inner_model: nn.Module, block: int, storage: str, directory: str | None = None) -> None:
        if storage not in ("device", "cpu", "disk"):
            raise ValueError(f"prefix cache storage {storage!r}: choose 'device', 'cpu' or 'disk'.")
        self.inner_model = inner_model
        self.block = block
        _, self.blocks = find_block_list(inner_model)
        self.storage = storage
        self.entries: dict[bytes, torch.Tensor | tuple[int, int, tuple[int, ...]]] = {}
        self.nbytes = 0
        self.replaying = False  # True while `replay` stands in for blocks 0..L
        self._file = None
        if storage == "disk":
            os.makedirs(directory or tempfile.gettempdir(), exist_ok=True)
            self._file = tempfile.NamedTemporaryFile(prefix="prefix-cache-", suffix=".bin", dir=directory)
        self._dtype: torch.dtype | None = None

    def close(self) -> None:
        """Drop every entry and delete the disk file, if any."""
        self.entries.clear()
        self.nbytes = 0
        if self._file is not None:
            self._file.close()
            self._file = None

    # ---- keys and storage ----------------------------------------------------------------------------------

    @staticmethod
    def keys(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[bytes]:
        """One key per row: its token ids without the right padding."""
        lengths = attention_mask.sum(dim=1).tolist()
        ids = input_ids.cpu().numpy()
        return [ids[row, :length].tobytes() for row, length in enumerate(lengths)]

    def missing(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[int]:
        return [row for row, key in enumerate(self.keys(input_ids, attention_mask)) if key not in self.entries]

    def _put(self, key: bytes, value: torch.Tensor) -> None:
        self._dtype = value.dtype
        if self.storage == "disk":  # float32 on disk: exact for fp16 / bf16 / fp32 activations
            array = value.detach().float().cpu().numpy()
            offset = self._file.tell()
            self._file.write(array.tobytes())
            self.entries[key] = (offset, array.size, tuple(array.shape))
        else:
            self.entries[key] = value.detach().to("cpu" if self.storage == "cpu" else value.device).clone()
        self.nbytes += value.numel() * value.element_size()

    def _get(self, key: bytes) -> torch.Tensor:
        entry = self.entries[key]
        if isinstance(entry, torch.Tensor):
            return entry
        offset, size, shape = entry
        self._file.flush()
        array = np.fromfile(self._file.name, dtype=np.float32, count=size, offset=offset)
        return torch.from_numpy(array.reshape(shape)).to(self._dtype)

    def gather(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The cached outputs of a batch, ``[rows, width, hidden]``, zeros at the padding."""
        keys = self.keys(input_ids, attention_mask)
        first = self._get(keys[0])
        out = torch.zeros((len(keys), input_ids.shape[1], first.shape[-1]), dtype=first.dtype, device=input_ids.device)
        for row, key in enumerate(keys):
            value = first if row == 0 else self._get(key)
            out[row, : value.shape[0]] = value.to(input_ids.device, non_blocking=True)
        return out

    # ---- filling ---------------------------------------------------------------------------------------------

    @contextmanager
    def capturing(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, stop: bool = False) -> Iterator[None]:
        """Store block L's output for the rows of this forward that are not cached yet. With ``stop``, the forward
        ends after block L, and the ``with`` block with it (`reading_output`). Use it only while steering is
        disabled."""
        keys = self.keys(input_ids, attention_mask)
        lengths = attention_mask.sum(dim=1).tolist()

        def capture(output: torch.Tensor) -> None:
            if not isinstance(output, torch.Tensor):  # `replay` stands in a tensor for the block's whole output
                raise TypeError(f"block {self.block} returns a {type(output).__name__}, not a tensor")
            for row, key in enumerate(keys):
                if key not in self.entries:
                    self._put(key, output[row, : lengths[row]])

        with reading_output(self.blocks[self.block], capture, stop=stop):
            yield

    @torch.no_grad()
    def fill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, base_only) -> None:
        """Compute and store the rows not cached yet, running the model only up to block L."""
        rows = self.missing(input_ids, attention_mask)
        if not rows:
            return
        ids, mask = input_ids[rows], attention_mask[rows]
        with base_only, self.capturing(ids, mask, stop=True):
            self.inner_model(input_ids=ids, attention_mask=mask, use_cache=False)

    # ---- replaying -------------------------------------------------------------------------------------------

    @contextmanager
    def replay(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Iterator[None]:
        """Within the block, a forward of this batch skips blocks 0..L: they return their input and block L the
        cached output (its forward hooks, the steering among them, still run)."""
        cached = self.gather(input_ids, attention_mask)

        def passthrough(*args, **kwargs):
            return args[0] if args else kwargs["hidden_states"]

        def cached_output(*args, **kwargs):
            return cached

        replaced = [(module, module.__dict__.get("forward")) for module in self.blocks[: self.block + 1]]
        try:
            for index, (module, _) in enumerate(replaced):
                module.forward = cached_output if index == self.block else passthrough
            self.replaying = True
            yield
        finally:
            self.replaying = False
            for module, original in replaced:
                if original is None:
                    del module.forward
                else:
                    module.forward = original


def estimate_bytes(token_count: int, hidden_size: int, dtype: torch.dtype) -> int:
    return token_count * hidden_size * torch.empty(0, dtype=dtype).element_size()


def choose_storage(requested: str, size: int, device: torch.device) -> str:
    """'auto': the accelerator if the cache takes under 20% of its free memory, else host memory under 25% of the
    available RAM, else disk."""
    if requested != "auto":
        return "cpu" if requested == "device" and device.type == "cpu" else requested
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if size < 0.2 * free:
            return "device"
    available = free_host_memory() or 0
    return "cpu" if size < 0.25 * available else "disk"
