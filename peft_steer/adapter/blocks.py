"""Finding the decoder block list of a transformers model, whatever the architecture calls it."""

from __future__ import annotations

from torch import nn

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
