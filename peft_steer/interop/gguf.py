"""llama.cpp control vectors (GGUF) in and out.

llama.cpp's convention, read from its source: the loader (``common/common.cpp``,
``common_control_vector_load_one``) reads 1-D F32 tensors named ``direction.N``, refuses ``N == 0`` ("invalid (zero)
direction tensor layer index") and sums several files, each times its scale; ``llama_adapter_cvec::apply``
(``src/llama-adapter.cpp``) stores ``direction.N`` for layer ``il = N`` ("buffer doesn't have data for layer 0, since
it's never present"), and every model graph adds it with ``build_cvec(cur, il)`` after the residual add at the end of
block ``il``. So ``direction.N`` is added to the output of block ``N`` (0-indexed), the same block as Hugging Face's
``model.layers[N]`` and peft-steer's ``layers=[N]``; block 0 cannot be steered there.

Export writes to a temporary file beside the output and renames it at the end, so a failure leaves the old file (if
any) as it was; import refuses what llama.cpp would not read (non-float or 2-D tensors, vectors of differing
lengths), naming the file and the tensor.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np
import torch
from torch import nn

from ..adapter.model import check_vector
from .adapter_files import CONFIG_NAME, WEIGHTS_NAME, base_structure, read_adapter, staging_path, write_adapter

GGUF_ARCH = "controlvector"
# Float tensor types whose values convert to float32 exactly (F64 is rounded); llama.cpp itself reads only F32.
_FLOAT_TYPES = ("F32", "F16", "F64")
# What GGUFReader raises on a truncated or damaged file (numpy views past the end, bad counts, duplicate names).
_READER_ERRORS = (ValueError, IndexError, KeyError, TypeError, OverflowError)


def export_gguf(
    adapter: str | os.PathLike, out_path: str | os.PathLike, model_hint: str | None = None, overwrite: bool = False
) -> None:
    """Write a saved steering adapter as a llama.cpp control vector: ``direction.N = multiplier * v_N`` (float32).

    Use it with ``llama-cli --control-vector FILE`` (or ``--control-vector-scaled FILE SCALE``). A vector at block 0
    is refused: llama.cpp cannot steer block 0's output. An existing ``out_path`` is refused unless ``overwrite``,
    and never replaced by a half-written file.
    """
    adapter, out_path = os.fspath(adapter), os.fspath(out_path)
    _check_output(adapter, out_path, overwrite)
    config, vectors = read_adapter(adapter)
    if 0 in vectors:
        raise ValueError(
            f"{adapter} steers block 0, which llama.cpp cannot steer (its loader refuses direction.0); "
            "train the vector at another block."
        )
    weights_path = os.path.join(adapter, WEIGHTS_NAME)
    directions = {
        block: _direction(weights_path, block, vector, config.multiplier) for block, vector in vectors.items()
    }
    hint = model_hint or _model_type(config.base_model_name_or_path)
    _write_gguf(out_path, directions, hint)


def _check_output(adapter: str, out_path: str, overwrite: bool) -> None:
    own_files = {os.path.realpath(os.path.join(adapter, name)) for name in (CONFIG_NAME, WEIGHTS_NAME)}
    if os.path.realpath(out_path) in own_files:
        raise ValueError(f"{out_path} is a file of the adapter {adapter} itself: write the control vector elsewhere.")
    if os.path.isdir(out_path):
        raise IsADirectoryError(f"{out_path} is a folder: give the name of the .gguf file to write.")
    if os.path.exists(out_path) and not overwrite:
        raise FileExistsError(f"{out_path} exists: pass --overwrite (overwrite=True) to replace it.")


def _direction(weights_path: str, block: int, vector: torch.Tensor, multiplier: float) -> np.ndarray:
    """``multiplier * vector`` as float32 (bf16 / f16 / f64 vectors are converted), checked finite."""
    vector = vector.float()
    check_vector(vector, block, vector.shape[0], weights_path)
    scaled = multiplier * vector
    if not torch.isfinite(scaled).all():
        raise ValueError(
            f"{weights_path}: multiplier {multiplier} times the vector for block {block} overflows float32."
        )
    return scaled.numpy()


def _write_gguf(out_path: str, directions: dict[int, np.ndarray], hint: str) -> None:
    import gguf

    staging = staging_path(out_path)
    try:
        writer = gguf.GGUFWriter(staging, arch=GGUF_ARCH)
        writer.add_string(f"{GGUF_ARCH}.model_hint", hint)
        writer.add_uint32(f"{GGUF_ARCH}.layer_count", len(directions))
        for block, direction in sorted(directions.items()):
            writer.add_tensor(f"direction.{block}", direction)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(staging, out_path)
    except OSError as error:
        # The error names the temporary file, which is removed below: name the output instead.
        raise OSError(
            error.errno, f"writing {out_path} failed, nothing was written: {error.strerror or error}"
        ) from error
    finally:
        if os.path.exists(staging):
            os.remove(staging)


def read_gguf(path: str | os.PathLike) -> tuple[dict[int, torch.Tensor], str | None]:
    """``({block: float32 vector}, model_hint)`` of a llama.cpp control vector file; tensors naming the same block
    (``direction.1``, ``direction.01``) are summed, as llama.cpp does."""
    path = os.fspath(path)
    reader = _open(path)
    architecture = _field(reader, "general.architecture")
    if architecture != GGUF_ARCH:
        raise ValueError(f"{path} is a GGUF file of architecture {architecture!r}, not a control vector.")
    vectors: dict[int, torch.Tensor] = {}
    first: tuple[str, int] | None = None
    for tensor in reader.tensors:
        block, data = _read_direction(path, tensor)
        first = first or (tensor.name, data.shape[0])
        if data.shape[0] != first[1]:
            raise ValueError(f"{path}: {tensor.name!r} has {data.shape[0]} values, but {first[0]!r} has {first[1]}.")
        vectors[block] = vectors[block] + data if block in vectors else data
    if not vectors:
        raise ValueError(f"{path} holds no direction tensors.")
    return vectors, _field(reader, f"{GGUF_ARCH}.model_hint")


def _open(path: str) -> Any:
    import gguf

    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise ValueError(f"{path} is empty: not a GGUF file.")
    try:
        return gguf.GGUFReader(path)
    except _READER_ERRORS as error:
        if "magic" in str(error):
            raise ValueError(f"{path} is not a GGUF file (it does not start with the GGUF magic number).") from None
        raise ValueError(f"{path} is not a valid GGUF file (truncated or damaged?): {error}") from None


def _read_direction(path: str, tensor: Any) -> tuple[int, torch.Tensor]:
    """``(block, float32 vector)`` of one tensor, refusing what llama.cpp's loader refuses."""
    name = tensor.name
    if not re.fullmatch(r"direction\.\d+", name):
        raise ValueError(f"{path}: tensor {name!r} is not a control vector direction (direction.N).")
    block = int(name.split(".")[1])
    if block == 0:
        raise ValueError(f"{path}: direction.0 is not a valid control vector block (llama.cpp refuses it too).")
    kind = tensor.tensor_type.name
    if kind not in _FLOAT_TYPES:
        raise ValueError(f"{path}: tensor {name!r} is {kind}; a control vector direction is a float tensor (F32).")
    shape = tuple(int(size) for size in tensor.shape)
    if any(size != 1 for size in shape[1:]):  # ggml counts trailing sizes of 1 as no dimension
        raise ValueError(f"{path}: tensor {name!r} has shape {shape}; a control vector direction is 1-D.")
    data = torch.from_numpy(np.array(tensor.data, dtype=np.float32)).reshape(-1)
    if not torch.isfinite(data).all():
        raise ValueError(f"{path}: tensor {name!r} contains NaN or inf values.")
    return block, data


def import_gguf(path: str | os.PathLike, base_model: str | os.PathLike | nn.Module, out: str | os.PathLike):
    """Turn a llama.cpp control vector into a steering adapter folder for ``base_model``."""
    vectors, hint = read_gguf(path)
    model = base_structure(base_model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if hint and model_type and hint != model_type:
        raise ValueError(f"{path} was made for a {hint!r} model; {base_model} is a {model_type!r} model.")
    return write_adapter(out, vectors, model)


def _field(reader: Any, key: str) -> str | None:
    field = reader.get_field(key)
    if field is None:
        return None
    value = field.contents()
    return value.decode() if isinstance(value, bytes) else value


def _model_type(base_model: str | None) -> str:
    if not base_model:
        return "unknown"
    try:
        return base_structure(base_model).config.model_type
    except (OSError, ValueError):
        return "unknown"
