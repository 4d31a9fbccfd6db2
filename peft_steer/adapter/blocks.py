"""Finding the decoder block list of a transformers model, whatever the architecture calls it, and reading a block's
output."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = [
    "KNOWN_BLOCK_PATHS",
    "StopForward",
    "find_block_list",
    "hidden_of",
    "hidden_size_of",
    "reading_output",
    "with_hidden",
]

# Paths of the usual architectures, tried first: Llama, Mistral, Qwen2, Gemma, Gemma2, Phi3 (model.layers),
# GPT-2 (transformer.h), GPT-NeoX (gpt_neox.layers), and multimodal wrappers (language_model...).
KNOWN_BLOCK_PATHS = (
    "model.layers",
    "transformer.h",
    "gpt_neox.layers",
    "model.decoder.layers",
    "transformer.blocks",
    "model.language_model.layers",
    "language_model.model.layers",
)


def _count_blocks(config) -> int | None:
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(text_config, name, None)
        if isinstance(value, int):
            return value
    return None


def hidden_size_of(model: nn.Module) -> int:
    """The width of the residual stream, from the model config."""
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("hidden_size", "n_embd", "d_model"):
        value = getattr(text_config, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"Cannot read the hidden size from the config of {type(model).__name__}.")


def find_block_list(model: nn.Module, blocks_path: str | None = None) -> tuple[str, nn.ModuleList]:
    """Return ``(path, blocks)``: the decoder block list of a transformers model and its dotted path.

    With ``blocks_path`` that path is used as given. Otherwise the known paths are tried, then any ``ModuleList``
    whose length is the config's number of hidden layers (the shortest path wins).
    """
    if blocks_path is not None:
        try:
            blocks = model.get_submodule(blocks_path)
        except AttributeError:
            raise ValueError(
                f"SteeringConfig(blocks_path={blocks_path!r}): {type(model).__name__} has no module at that path."
            ) from None
        if not isinstance(blocks, nn.ModuleList):
            raise ValueError(
                f"SteeringConfig(blocks_path={blocks_path!r}) names a {type(blocks).__name__}, not the ModuleList "
                "of decoder blocks."
            )
        return blocks_path, blocks

    expected = _count_blocks(model.config) if hasattr(model, "config") else None
    for path in KNOWN_BLOCK_PATHS:
        try:
            blocks = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(blocks, nn.ModuleList) and (expected is None or len(blocks) == expected):
            return path, blocks

    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (expected is None or len(module) == expected)
    ]
    if candidates:
        return min(candidates, key=lambda item: item[0].count("."))
    raise ValueError(
        f"Could not find the decoder block list of {type(model).__name__}. Set it by hand with "
        "SteeringConfig(blocks_path=...), e.g. blocks_path='model.layers'."
    )


def hidden_of(output: Any) -> torch.Tensor:
    """The hidden states of a decoder block's output: the output itself (a tensor, as transformers 5's blocks return),
    or the first item of a tuple (blocks that also return attention weights or a cache)."""
    return output[0] if isinstance(output, tuple) else output


def with_hidden(output: Any, hidden: torch.Tensor) -> Any:
    """``output`` of a decoder block with its hidden states replaced by ``hidden``, in the same form."""
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


class StopForward(Exception):
    """Raised by a `reading_output` hook with ``stop=True``, to end the forward after the block read."""


@contextmanager
def reading_output(block: nn.Module, read: Callable[[Any], None], stop: bool = False) -> Iterator[None]:
    """Within the ``with`` block, every forward of ``block`` hands its output to ``read`` (`hidden_of` gives its hidden
    states).

    With ``stop`` the forward ends right after ``block``: the blocks after it and the LM head cannot change what was
    read, so they are skipped, and the ``with`` block ends there without an error.
    """
    stopper = StopForward()

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        read(output)
        if stop:
            raise stopper

    handle = block.register_forward_hook(hook)
    try:
        yield
    except StopForward as error:
        if error is not stopper:
            raise
    finally:
        handle.remove()
