"""Blocks 0..L leave the accelerator while a fully cached run trains.

Once the prefix cache holds every sequence the trainer will see, a training step never runs blocks 0..L: they return
their input, and block L its cached output. Their weights, about (L + 1) / N of the model, then only take memory. For
the time of `train()`, `OffloadedBlocks` moves them to host memory (from an accelerator) or to a file (from host
memory) and leaves an empty tensor of the same dtype and device in each parameter. The parameter objects themselves
stay, so nothing that holds them (DDP, the model's `.device` and `.dtype`) notices. Quantized blocks stay.

They come back when training ends, or before any forward that really runs one of these blocks (a sequence that is not
cached, a reference pass, a `generate` in a callback), with a logged warning.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from peft_steer.adapter.blocks import find_block_list

logger = logging.getLogger(__name__)

DESTINATIONS = ("auto", "cpu", "disk", "off")


def destination_for(requested: str, device: torch.device) -> str | None:
    """Where the blocks go: 'auto' is host memory from an accelerator and a file from host memory; None: stay."""
    if requested not in DESTINATIONS:
        raise ValueError(f"offload_prefix_blocks={requested!r}: choose one of {', '.join(DESTINATIONS)}.")
    if requested == "off" or (requested == "cpu" and device.type == "cpu"):
        return None
    if requested == "auto":
        return "disk" if device.type == "cpu" else "cpu"
    return requested


def offload_blocker(inner_model: nn.Module, block: int) -> str | None:
    """Why blocks 0..``block`` of this model are not offloaded, or None when they can be."""
    _, blocks = find_block_list(inner_model)
    for index, module in enumerate(blocks[: block + 1]):
        for name, parameter in module.named_parameters():
            if type(parameter) is not nn.Parameter:
                # bitsandbytes keeps views of its weights elsewhere (Int8 `state.CB`) and repacks 4-bit weights for
                # the CPU, which `state_dict()` undoes, so an emptied weight would free nothing or break a save.
                return f"block {index} holds quantized weights ({name}: {type(parameter).__name__})"
    return None


class OffloadWriteError(OSError):
    """The blocks could not be written to their file (a full disk, a folder without write access)."""


class OffloadedBlocks:
    """The weights of blocks 0..``block``, moved to ``destination`` ('cpu' or 'disk') by `offload` until `restore`.

    ``replaying`` tells whether the prefix cache is standing in for these blocks right now; a forward that reaches one
    of them at any other time brings all of them back first.
    """

    def __init__(
        self,
        inner_model: nn.Module,
        block: int,
        destination: str,
        replaying: Callable[[], bool],
        directory: str | None = None,
    ) -> None:
        if destination not in ("cpu", "disk"):
            raise ValueError(f"OffloadedBlocks(destination={destination!r}): choose 'cpu' or 'disk'.")
        path, blocks = find_block_list(inner_model)
        self.block, self.destination, self.replaying, self.directory = block, destination, replaying, directory
        self.blocks = list(blocks[: block + 1])
        prefixes = tuple(f"{path}.{index}." for index in range(block + 1))
        # A parameter that something outside blocks 0..L also holds (tied weights) must stay where it is.
        elsewhere = {
            id(parameter)
            for name, parameter in inner_model.named_parameters(remove_duplicate=False)
            if not name.startswith(prefixes)
        }
        self.parameters: list[nn.Parameter] = []
        seen: set[int] = set()
        for module in self.blocks:
            for parameter in module.parameters():
                if id(parameter) in seen | elsewhere or parameter.requires_grad or parameter.numel() == 0:
                    continue
                seen.add(id(parameter))
                self.parameters.append(parameter)
        self.nbytes = sum(parameter.numel() * parameter.element_size() for parameter in self.parameters)
        self.active = False
        self._copies: list[torch.Tensor] = []
        self._layout: list[tuple[int, int, torch.dtype, torch.Size]] = []  # offset, bytes, dtype, shape in the file
        self._file = None
        self._hooks: list = []

    def offload(self) -> None:
        """Move the weights out. On any error (a full disk) every weight is still in place."""
        if self.active or not self.parameters:
            return
        if self.destination == "disk":
            folder = self.directory or tempfile.gettempdir()
            try:
                os.makedirs(folder, exist_ok=True)
                # Unlinked from the start: nothing is left behind, even when the process is killed.
                self._file = tempfile.TemporaryFile(prefix="prefix-blocks-", suffix=".bin", dir=folder)
                for parameter in self.parameters:
                    # Raw bytes, one tensor at a time: no second copy of the blocks in memory, any dtype, no pickle.
                    data = parameter.data.detach().contiguous().cpu()
                    raw = data.view(-1).view(torch.uint8).numpy()
                    self._layout.append((self._file.tell(), raw.size, data.dtype, data.shape))
                    raw.tofile(self._file)
                self._file.flush()
            except OSError as error:
                self._release()
                raise OffloadWriteError(
                    f"Could not write blocks 0..{self.block} ({self.nbytes / 2**20:.1f} MiB) to {folder}: {error}. "
                    "Set SteerConfig(prefix_cache_dir=...) to a folder with room, or offload_prefix_blocks='off'."
                ) from error
        else:
            self._copies = [parameter.data.detach().to("cpu") for parameter in self.parameters]
        originals = []
        try:
            for parameter in self.parameters:
                originals.append(parameter.data)
                parameter.data = torch.empty(0, dtype=parameter.dtype, device=parameter.device)
        except BaseException:
            for parameter, data in zip(self.parameters, originals):
                parameter.data = data
            self._release()
            raise
        del originals
        self._hooks = [module.register_forward_pre_hook(self._needed) for module in self.blocks]
        self.active = True

    def restore(self, reason: str | None = None) -> None:
        """Put every weight back on the device its placeholder is on now. The offloaded copy is kept until every
        weight is back, so a failed restore can be retried."""
        if not self.active:
            return
        # Not inference tensors, even when a forward under `torch.inference_mode()` asked for the blocks.
        with torch.inference_mode(False), torch.no_grad():
            for index, parameter in enumerate(self.parameters):
                if parameter.numel() == 0:
                    parameter.data = self._read(index).to(parameter.device)
        for hook in self._hooks:
            hook.remove()
        self._release()
        self.active = False
        if reason:
            logger.warning("Blocks 0..%d brought back from %s: %s.", self.block, self.destination, reason)

    def _release(self) -> None:
        if self._file is not None:
            self._file.close()  # an unlinked file: closing frees it
        self._file, self._layout, self._copies, self._hooks = None, [], [], []

    def _read(self, index: int) -> torch.Tensor:
        if self.destination == "cpu":
            return self._copies[index]
        offset, size, dtype, shape = self._layout[index]
        self._file.seek(offset)
        raw = np.fromfile(self._file, dtype=np.uint8, count=size)
        return torch.from_numpy(raw).view(dtype).view(shape)

    def _needed(self, module: nn.Module, args: tuple) -> None:
        if not self.replaying():
            self.restore("a forward ran one of them outside the prefix cache; they stay for the rest of training")
