"""Reading and writing steering adapter folders without a loaded model; nothing is unpickled (safetensors, or a
legacy ``.bin`` through ``torch.load(weights_only=True)``).

`read_adapter` is the one reader every command checks a folder with. A folder that cannot be used is a `ValueError`
naming the file to fix (``adapter_config.json`` or the weights file) in one line, so the library and every command
report the same thing.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import reprlib
from typing import Any

import torch
import transformers
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..adapter._peft_compat import block_of_saved_key, saved_vector_key
from ..adapter.config import STEERING, WEIGHTS_NAME, SteeringConfig
from ..adapter.model import check_vector, resolve_config
from ..models import load_config, portable_name
from ..staging import usual_permissions, written_whole

CONFIG_NAME = "adapter_config.json"
# PEFT's older weights file, read when a folder has no safetensors file (as PEFT does), with weights_only=True only.
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
# The fields PEFT passes on without a check of its own, and what each must be in a steering adapter's config.
_TEXT_FIELDS = ("base_model_name_or_path", "blocks_path", "revision")
# A value quoted in an error is cut short: a small JSON file can hold a huge list, or a key thousands of bytes long.
_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 120
_quoted = _SHORT.repr


def read_adapter(path: str | os.PathLike) -> tuple[SteeringConfig, dict[int, torch.Tensor]]:
    """Return ``(config, {block: vector})`` of the steering adapter saved in folder ``path``.

    The one reader of adapter folders: every command checks a folder with it before it loads a model, so that what
    one command refuses, none accepts. The vectors keep the dtype they were saved in. Raises ``ValueError`` (or
    ``FileNotFoundError``) in one line naming the file to fix: a config that is not a steering adapter's, weights that
    are damaged or not tensors, keys that name no block, or vectors that do not fit the config (blocks, hidden size,
    dtype, finite values). A legacy ``adapter_model.bin`` is read with ``torch.load(weights_only=True)`` only.
    """
    path = os.fspath(path)
    config_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} does not exist: {path} is not a saved steering adapter folder.")
    config = _read_config(path, config_path)
    weights_path = _weights_path(path)
    vectors = {}
    for key, tensor in _load_weights(weights_path).items():
        block = block_of_saved_key(key)
        if block is None:
            raise ValueError(
                f"{weights_path} holds {_quoted(key)}, which is not a steering vector's key "
                f"({saved_vector_key(0)[:-1]}<block>, as save_pretrained writes it)."
            )
        _check_saved_vector(weights_path, tensor, block, config)
        vectors[block] = tensor
    layers = sorted(block % config.num_blocks if config.num_blocks else block for block in config.layers)
    if sorted(vectors) != layers:
        raise ValueError(
            f"{weights_path} holds vectors for blocks {sorted(vectors)}, but {config_path} lists layers "
            f"{config.layers}: the folder mixes two adapters; save it again, or copy both files from one save."
        )
    return config, vectors


def read_adapter_for(
    path: str | os.PathLike, base_model: str | os.PathLike | nn.Module, **hub_options: Any
) -> tuple[SteeringConfig, dict[int, torch.Tensor]]:
    """`read_adapter`, and the adapter checked against ``base_model`` (blocks, hidden size), from the model's config
    alone (see `base_structure`): what loading it onto the model would refuse, said before the model is loaded.
    The config returned is resolved for that model."""
    config, vectors = read_adapter(path)
    config_path = os.path.join(os.fspath(path), CONFIG_NAME)
    try:
        config = resolve_config(base_structure(base_model, **hub_options), config)
    except ValueError as error:
        raise ValueError(f"{config_path}: {error}") from None
    weights_path = _weights_path(os.fspath(path))
    for block, vector in vectors.items():
        check_vector(vector, block, config.hidden_size, weights_path)
    return config, vectors


def adapter_digest(config: SteeringConfig, vectors: dict[int, torch.Tensor]) -> str:
    """A short hash of what an adapter steers with: its vectors (as float32, the dtype they steer in) and positions.
    The same for a copied or renamed folder; another for any other vector."""
    digest = hashlib.sha256(f"positions={config.positions}".encode())
    for block, vector in sorted(vectors.items()):
        digest.update(f";{block}:".encode())
        digest.update(vector.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _read_config(folder: str, config_path: str) -> SteeringConfig:
    """The folder's `SteeringConfig`; every way the JSON can be unusable is one line naming ``config_path``."""
    try:
        with open(config_path, "rb") as file:
            text = file.read()
        if text.startswith(codecs.BOM_UTF8):  # PEFT's own reader refuses it too
            raise ValueError(f"{config_path} starts with a byte order mark: save it as UTF-8 without one.")
        raw = json.loads(text.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{config_path} is not UTF-8 text ({error.reason}).") from None
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{config_path} is not valid JSON ({error.msg}, line {error.lineno} column {error.colno})."
        ) from None
    except RecursionError:
        raise ValueError(f"{config_path} nests too deeply to be an adapter config.") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{config_path} must hold a JSON object of adapter settings, not a {_json_type(raw)}.")
    _check_fields(raw, config_path)
    try:
        return SteeringConfig.from_pretrained(folder)
    except (TypeError, ValueError) as error:  # a field SteeringConfig refuses
        raise ValueError(f"{config_path}: {error}") from None


def _check_fields(raw: dict[str, Any], config_path: str) -> None:
    """The fields PEFT and `SteeringConfig` would otherwise fail on with a KeyError or a message without the file."""
    if "peft_type" not in raw:
        raise ValueError(f"{config_path} has no 'peft_type': it is not a saved PEFT adapter config.")
    if raw["peft_type"] != STEERING:
        raise ValueError(
            f"{config_path} describes a {_quoted(raw['peft_type'])} adapter, not a steering adapter (peft_type "
            f"{STEERING!r})."
        )
    if "layers" not in raw:
        raise ValueError(f"{config_path} has no 'layers' (the steered blocks): it is not a complete steering config.")
    layers = raw["layers"]
    if not isinstance(layers, list) or not layers or not all(_is_int(layer) for layer in layers):
        raise ValueError(f"{config_path}: 'layers' is {_quoted(layers)}; it must be a non-empty list of block indices.")
    multiplier = raw.get("multiplier", 1.0)
    if isinstance(multiplier, bool) or not isinstance(multiplier, (int, float)):
        raise ValueError(f"{config_path}: 'multiplier' is {_quoted(multiplier)}; it must be a number.")
    for name in ("hidden_size", "num_blocks"):
        value = raw.get(name)
        if value is not None and not (_is_int(value) and value > 0):
            raise ValueError(f"{config_path}: {name!r} is {_quoted(value)}; it must be a positive integer (or null).")
    if raw.get("init_vectors") is not None:  # save_pretrained writes null: the vectors are the weights file
        raise ValueError(
            f"{config_path}: 'init_vectors' must be null; a saved adapter's vectors are its {WEIGHTS_NAME}."
        )
    for name in _TEXT_FIELDS:
        if raw.get(name) is not None and not isinstance(raw[name], str):
            raise ValueError(f"{config_path}: {name!r} is {_quoted(raw[name])}; it must be text (or null).")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _json_type(value: Any) -> str:
    names = {list: "list", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _weights_path(folder: str) -> str:
    """The folder's weights file: safetensors, else PEFT's legacy ``.bin`` (PEFT's own order)."""
    for name in (WEIGHTS_NAME, LEGACY_WEIGHTS_NAME):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise FileNotFoundError(
        f"{os.path.join(folder, WEIGHTS_NAME)} does not exist: {folder} has the adapter's config but not its vectors; "
        "copy the whole folder that save_pretrained wrote."
    )


def _load_weights(weights_path: str) -> dict[str, torch.Tensor]:
    if weights_path.endswith(LEGACY_WEIGHTS_NAME):
        return _load_legacy(weights_path)
    try:
        return load_file(weights_path)
    except SafetensorError as error:
        raise ValueError(
            f"{weights_path} is not a readable safetensors file (truncated or damaged?): {error}"
        ) from None


def _load_legacy(weights_path: str) -> dict[str, torch.Tensor]:
    """A ``.bin`` weights file read with ``weights_only=True``: tensors only, never arbitrary objects."""
    try:
        tensors = torch.load(weights_path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as error:  # noqa: BLE001  torch.load's errors vary with the damage (pickle, zip, EOF)
        # Not the error's text: torch's advice to retry with weights_only=False would run arbitrary code.
        raise ValueError(
            f"{weights_path} is not a file of tensors ({type(error).__name__} when loading it with "
            f"weights_only=True); save the adapter again with save_pretrained, which writes {WEIGHTS_NAME}."
        ) from None
    if not isinstance(tensors, dict) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in tensors.items()
    ):
        raise ValueError(f"{weights_path} does not hold a mapping of names to tensors, as an adapter's weights do.")
    return tensors


def _check_saved_vector(weights_path: str, tensor: torch.Tensor, block: int, config: SteeringConfig) -> None:
    """A saved vector must be a finite float vector of the config's hidden size, for a block of the config's model."""
    key = saved_vector_key(block)
    if not tensor.is_floating_point():
        raise ValueError(f"{weights_path}: {key!r} is a {tensor.dtype} tensor; a steering vector is floating point.")
    hidden = config.hidden_size
    if tensor.dim() != 1 or (hidden is not None and tensor.shape[0] != hidden):
        expected = f"({hidden},), the adapter's hidden size" if hidden is not None else "one dimension"
        raise ValueError(f"{weights_path}: {key!r} has shape {tuple(tensor.shape)}; a steering vector has {expected}.")
    if config.num_blocks is not None and block >= config.num_blocks:
        raise ValueError(
            f"{weights_path}: {key!r} is for block {block}, but the adapter's model has {config.num_blocks} blocks "
            f"(0..{config.num_blocks - 1})."
        )
    check_vector(tensor, block, tensor.shape[0], weights_path)  # finite in float32, the dtype it steers in


def base_structure(base_model: str | os.PathLike | nn.Module, **hub_options: Any) -> nn.Module:
    """The base model to check an adapter against: the model itself, or one built on the ``meta`` device from the
    config of a hub id, local folder, ``.gguf`` file or ``"smollm2"`` (no weights are read or downloaded).
    ``hub_options`` go to ``from_pretrained`` (e.g. ``local_files_only=True``)."""
    if isinstance(base_model, nn.Module):
        return base_model
    config = load_config(os.fspath(base_model), **hub_options)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    model.name_or_path = portable_name(os.fspath(base_model))
    return model


def write_adapter(
    directory: str | os.PathLike,
    vectors: dict[int, torch.Tensor],
    base_model: str | os.PathLike | nn.Module,
    **config_options,
) -> SteeringConfig:
    """Write a steering adapter folder for ``base_model`` holding ``vectors`` ({block: tensor}), as
    ``save_pretrained`` would (``adapter_config.json``, ``adapter_model.safetensors`` and the model card
    ``README.md``, written by `SteeringConfig.save_pretrained`), and return its config. Loadable with
    ``PeftModel.from_pretrained``.

    A negative block counts from the end (``-1``: the last block), as in ``SteeringConfig(layers=...)``; the folder
    holds the resolved block. Everything is checked first (blocks in range, hidden size, finite values), the folder
    is written next to its destination and moved into place at the end: a failure leaves no half-written folder. An
    existing non-empty ``directory`` (or a file there) is refused.
    """
    directory = os.fspath(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise FileExistsError(f"{directory} is a file: choose another output folder or remove it.")
    if os.path.isdir(directory) and os.listdir(directory):
        raise FileExistsError(f"{directory} exists and is not empty: choose another output folder or remove it.")
    model = base_structure(base_model)
    config = resolve_config(model, SteeringConfig(layers=sorted(vectors), **config_options))
    config.base_model_name_or_path = getattr(model, "name_or_path", None) or None
    tensors = {}
    for block, vector in vectors.items():
        resolved = block % config.num_blocks  # in range: resolve_config checked it
        check_vector(vector, resolved, config.hidden_size, f"Writing {directory}")
        tensors[saved_vector_key(resolved)] = vector.detach().to("cpu", torch.float32).contiguous()
    _write_folder(directory, config, tensors)
    return config


def _write_folder(directory: str, config: SteeringConfig, tensors: dict[str, torch.Tensor]) -> None:
    """Write the folder whole or not at all (an empty ``directory``, checked by the caller, is replaced)."""
    with written_whole(directory, folder=True) as staging:
        config.save_pretrained(staging)
        save_file(tensors, os.path.join(staging, WEIGHTS_NAME), metadata={"format": "pt"})
        usual_permissions(os.path.join(staging, WEIGHTS_NAME))
