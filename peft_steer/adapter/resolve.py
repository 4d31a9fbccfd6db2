"""Checking a steering config and its vectors against a model, before anything is changed."""

from __future__ import annotations

import torch
from torch import nn

from .blocks import find_block_list, hidden_size_of
from .config import SteeringConfig, check_real


def check_vector(vector: torch.Tensor, block: int, hidden_size: int, what: str) -> None:
    """Raise a clear error for a vector that cannot steer block ``block`` of a model of width ``hidden_size``."""
    if not isinstance(vector, torch.Tensor):
        raise TypeError(f"{what}: the vector for block {block} must be a torch.Tensor, got {type(vector).__name__}.")
    check_real(vector, f"{what}: the vector for block {block}")
    if vector.dim() != 1 or vector.shape[0] != hidden_size:
        raise ValueError(
            f"{what}: the vector for block {block} has shape {tuple(vector.shape)}; the model's hidden size is "
            f"{hidden_size}, so it must have shape ({hidden_size},)."
        )
    if not torch.isfinite(vector.float()).all():  # as stored: a float64 value beyond float32's range becomes inf
        raise ValueError(
            f"{what}: the vector for block {block} contains NaN or inf values in float32 (the vectors' dtype)."
        )


def resolve_config(model: nn.Module, config: SteeringConfig) -> SteeringConfig:
    """Check ``config`` against ``model`` and fill in the resolved blocks, hidden size and block count.

    Every check runs before anything is changed, so a bad config leaves the model and the config untouched.
    Works on a model on the ``meta`` device too (only its structure and config are read).
    """
    model_name = type(model).__name__
    path, blocks = find_block_list(model, config.blocks_path)
    num_blocks, hidden_size = len(blocks), hidden_size_of(model)
    if config.num_blocks is not None and config.num_blocks != num_blocks:
        raise ValueError(
            f"This steering adapter was made for a model with {config.num_blocks} decoder blocks; "
            f"{model_name} has {num_blocks}. Load it onto the base model it was trained on."
        )
    if config.hidden_size is not None and config.hidden_size != hidden_size:
        raise ValueError(
            f"This steering adapter was made for hidden size {config.hidden_size}; {model_name} has "
            f"{hidden_size}. Load it onto the base model it was trained on."
        )
    for index in config.layers:
        if not -num_blocks <= index < num_blocks:
            raise ValueError(
                f"SteeringConfig(layers={config.layers}): block {index} is out of range for {model_name}, which "
                f"has {num_blocks} decoder blocks (use 0..{num_blocks - 1}, or -{num_blocks}..-1 from the end)."
            )
    layers = [index % num_blocks for index in config.layers]
    if len(set(layers)) != len(layers):
        raise ValueError(f"SteeringConfig(layers={config.layers}) names the same block twice.")
    init_vectors = dict(config.init_vectors or {})
    for index, vector in init_vectors.items():
        if not (-num_blocks <= index < num_blocks and index % num_blocks in layers):
            raise ValueError(
                f"SteeringConfig(init_vectors=...) has a vector for block {index}, which is not in layers={layers}."
            )
        check_vector(vector, index, hidden_size, "SteeringConfig(init_vectors=...)")

    config.layers = layers
    config.init_vectors = {index % num_blocks: vector for index, vector in init_vectors.items()} or None
    config.hidden_size, config.num_blocks = hidden_size, num_blocks
    config.target_modules = [f"{path}.{index}" for index in layers]
    return config
