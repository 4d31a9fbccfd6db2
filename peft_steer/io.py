"""Reading a saved steering adapter folder without a model (safetensors only: nothing is unpickled)."""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file

from .config import STEERING, SteeringConfig

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"


def read_adapter(path: str) -> tuple[SteeringConfig, dict[int, torch.Tensor]]:
    """Return ``(config, {block: vector})`` of the steering adapter saved in folder ``path``."""
    config_path, weights_path = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    for required in (config_path, weights_path):
        if not os.path.isfile(required):
            raise FileNotFoundError(f"{required} does not exist: {path} is not a saved steering adapter folder.")
    config = SteeringConfig.from_pretrained(path)
    if config.peft_type != STEERING:
        raise ValueError(f"{config_path} describes a {config.peft_type} adapter, not a steering adapter.")
    vectors = {}
    for key, tensor in load_file(weights_path).items():
        block = key.rsplit(".", 1)[-1]
        if ".steering_vectors." not in f".{key}" or not block.isdigit():
            raise ValueError(f"{weights_path} holds {key!r}, which is not a steering vector.")
        vectors[int(block)] = tensor
    return config, vectors
