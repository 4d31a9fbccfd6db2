"""Reading the vectors a server steers with: peft-steer adapter folders and llama.cpp control vector files.

Without peft or peft-steer (vLLM's environment pins another transformers): an adapter folder is read with json and
safetensors, as PEFT saves it (``adapter_config.json``, ``adapter_model.safetensors`` with one
``base_model.steering_vectors.N`` vector per block ``N``); a ``.gguf`` control vector (llama.cpp, repeng) with the
``gguf`` package, ``direction.N`` added at block ``N``'s output at every position, as llama.cpp does. Every problem is
one `ValueError` naming the file.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import torch

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# PEFT's saved key of block N's vector (peft_steer.adapter._peft_compat.saved_vector_key; a test keeps them equal).
VECTOR_KEY = re.compile(r"base_model\.steering_vectors\.(\d+)")
DIRECTION_KEY = re.compile(r"direction\.(\d+)")
POSITIONS = ("all", "completion")


@dataclass(frozen=True)
class SteeringVectors:
    """One adapter's vectors, as a server applies them.

    Attributes:
        path: The folder or file they were read from.
        vectors: Block index (0-based, Hugging Face's numbering) -> float32 vector of the model's hidden size.
        positions: ``"all"`` tokens, or ``"completion"``: the last prompt token and every generated one.
        num_blocks: The number of decoder blocks of the model the adapter was made for (None: not recorded).
    """

    path: str
    vectors: dict[int, torch.Tensor]
    positions: str = "all"
    num_blocks: int | None = None  # the block count of the model the adapter was made for, when it says

    @property
    def hidden_size(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    def check_model(self, hidden_size: int, num_blocks: int) -> None:
        """Refuse, naming the file, vectors that do not fit a model of this hidden size and block count."""
        if self.hidden_size != hidden_size:
            raise ValueError(
                f"{self.path}: the vectors have {self.hidden_size} values, but the served model's hidden size is "
                f"{hidden_size}: the adapter was made for another model."
            )
        if self.num_blocks is not None and self.num_blocks != num_blocks:
            raise ValueError(
                f"{self.path}: the adapter was made for a model of {self.num_blocks} blocks; the served model has "
                f"{num_blocks}."
            )
        beyond = [block for block in sorted(self.vectors) if block >= num_blocks]
        if beyond:
            raise ValueError(
                f"{self.path}: steers block {beyond[0]}, but the served model has {num_blocks} blocks "
                f"(0..{num_blocks - 1}): the adapter was made for another model."
            )


def read_vectors(path: str | os.PathLike) -> SteeringVectors:
    """The vectors of a peft-steer adapter folder, or of a llama.cpp control vector file (``.gguf``)."""
    path = os.fspath(path)
    if path.endswith(".gguf"):
        return _read_gguf(path)
    if not os.path.isdir(path):
        raise ValueError(f"{path}: no such adapter folder (a peft-steer save_pretrained folder, or a .gguf file).")
    config_path, weights_path = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    config = _read_config(config_path)
    positions = config.get("positions", "all")
    if positions not in POSITIONS:
        raise ValueError(f"{config_path}: 'positions' is {positions!r}; it must be one of {POSITIONS}.")
    layers = config.get("layers")
    if not isinstance(layers, list) or not layers or not all(type(b) is int and b >= 0 for b in layers):
        raise ValueError(
            f"{config_path}: 'layers' is {layers!r}; a saved adapter lists its blocks as non-negative integers."
        )
    vectors = _read_weights(weights_path, VECTOR_KEY)
    if sorted(vectors) != sorted(layers):
        raise ValueError(
            f"{weights_path} holds vectors for blocks {sorted(vectors)}, but {config_path} lists layers {layers}: "
            "the folder is inconsistent."
        )
    hidden = config.get("hidden_size")
    found = next(iter(vectors.values())).shape[0]
    if hidden is not None and hidden != found:
        raise ValueError(f"{weights_path}: the vectors have {found} values; {config_path} says hidden_size {hidden}.")
    blocks = config.get("num_blocks")
    return SteeringVectors(path, vectors, positions, blocks if type(blocks) is int else None)


def _read_config(config_path: str) -> dict:
    if not os.path.isfile(config_path):
        raise ValueError(f"{config_path} does not exist: the folder is not a saved steering adapter.")
    try:
        with open(config_path, encoding="utf-8") as file:
            config = json.load(file)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ValueError(f"{config_path} is not a readable JSON file ({type(error).__name__}).") from None
    if not isinstance(config, dict) or config.get("peft_type") != "STEERING":
        kind = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{config_path} describes a {kind!r} adapter, not a steering adapter (peft_type 'STEERING').")
    return config


def _read_weights(weights_path: str, key_pattern: re.Pattern) -> dict[int, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.isfile(weights_path):
        raise ValueError(f"{weights_path} does not exist: the folder is not a saved steering adapter.")
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{weights_path} is not a readable safetensors file (cut off or damaged?): {error}") from None
    return _checked(weights_path, tensors, key_pattern)


def _checked(
    path: str, tensors: dict[str, torch.Tensor], key_pattern: re.Pattern, sum_repeats: bool = False
) -> dict[int, torch.Tensor]:
    """``{block: float32 vector}``: every tensor a finite 1-D float vector of one common size. Two keys for one block
    (``.2`` and ``.02``) are refused, or summed with ``sum_repeats``, as llama.cpp's loader sums them."""
    vectors: dict[int, torch.Tensor] = {}
    for key, tensor in tensors.items():
        match = key_pattern.fullmatch(key)
        if match is None:
            raise ValueError(f"{path} holds {key!r}, which is not a steering vector.")
        block = int(match.group(1))
        if block in vectors and not sum_repeats:
            raise ValueError(f"{path} holds two vectors for block {block} ({key!r} is the second).")
        if not tensor.is_floating_point() or tensor.dim() != 1 or tensor.shape[0] == 0:
            shape = tuple(tensor.shape)
            raise ValueError(f"{path}: {key!r} is a {tensor.dtype} tensor of shape {shape}, not a float vector.")
        vector = tensor.to(torch.float32)
        if not torch.isfinite(vector).all():
            raise ValueError(f"{path}: {key!r} holds NaN or inf values (in float32).")
        first = next(iter(vectors.items()), None)
        if first is not None and first[1].shape[0] != vector.shape[0]:
            raise ValueError(
                f"{path}: {key!r} has {vector.shape[0]} values, but the vector of block {first[0]} has "
                f"{first[1].shape[0]}."
            )
        vectors[block] = vectors[block] + vector if block in vectors else vector
    if not vectors:
        raise ValueError(f"{path} holds no steering vectors.")
    return vectors


def _read_gguf(path: str) -> SteeringVectors:
    try:
        import gguf
    except ImportError:
        raise ValueError(f"{path}: reading llama.cpp control vectors needs `pip install gguf`.") from None
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such control vector file.")
    try:
        reader = gguf.GGUFReader(path)
        tensors = {tensor.name: torch.from_numpy(tensor.data.copy()).flatten() for tensor in reader.tensors}
        architecture = reader.fields.get("general.architecture")
        architecture = bytes(architecture.parts[-1]).decode() if architecture is not None else None
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, OSError) as error:
        raise ValueError(f"{path} is not a readable GGUF file (truncated or damaged?): {error}") from None
    if architecture != "controlvector":
        raise ValueError(f"{path} is a GGUF file of architecture {architecture!r}, not a control vector.")
    vectors = _checked(path, tensors, DIRECTION_KEY, sum_repeats=True)
    if 0 in vectors:
        raise ValueError(f"{path}: direction.0 is not a valid control vector block (llama.cpp refuses it too).")
    return SteeringVectors(path, vectors, "all")
