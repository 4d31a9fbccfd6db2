"""Reading and writing steering adapter folders without a loaded model (safetensors only: nothing is unpickled)."""

from __future__ import annotations

import os
import shutil
import tempfile

import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn

from ..adapter._peft_compat import block_of_saved_key, saved_vector_key
from ..adapter.config import STEERING, SteeringConfig
from ..adapter.model import check_vector, resolve_config

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
        block = block_of_saved_key(key)
        if block is None:
            raise ValueError(f"{weights_path} holds {key!r}, which is not a steering vector.")
        vectors[block] = tensor
    return config, vectors


def base_structure(base_model: str | os.PathLike | nn.Module) -> nn.Module:
    """The base model to check an adapter against: the model itself, or one built on the ``meta`` device from the
    config of a hub id or local folder (no weights are read or downloaded)."""
    if isinstance(base_model, nn.Module):
        return base_model
    config = transformers.AutoConfig.from_pretrained(base_model)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    model.name_or_path = str(base_model)
    return model


def write_adapter(
    directory: str | os.PathLike,
    vectors: dict[int, torch.Tensor],
    base_model: str | os.PathLike | nn.Module,
    **config_options,
) -> SteeringConfig:
    """Write a steering adapter folder for ``base_model`` holding ``vectors`` ({block: tensor}), as
    ``save_pretrained`` would, and return its config. Loadable with ``PeftModel.from_pretrained``.

    Everything is checked first (blocks in range, hidden size, finite values), the folder is written next to its
    destination and moved into place at the end: a failure leaves no half-written folder. An existing non-empty
    ``directory`` is refused.
    """
    directory = os.fspath(directory)
    if os.path.isdir(directory) and os.listdir(directory):
        raise FileExistsError(f"{directory} exists and is not empty: choose another output folder or remove it.")
    model = base_structure(base_model)
    config = resolve_config(model, SteeringConfig(layers=sorted(vectors), **config_options))
    config.base_model_name_or_path = getattr(model, "name_or_path", None) or None
    tensors = {}
    for block, vector in vectors.items():
        check_vector(vector, block, config.hidden_size, f"Writing {directory}")
        tensors[saved_vector_key(block)] = vector.detach().to("cpu", torch.float32).contiguous()

    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".peft-steer-", dir=parent)
    try:
        config.save_pretrained(staging)
        save_file(tensors, os.path.join(staging, WEIGHTS_NAME), metadata={"format": "pt"})
        if os.path.isdir(directory):
            os.rmdir(directory)  # empty, checked above
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return config
