"""llama.cpp control vectors (GGUF) in and out.

llama.cpp's convention, read from its source: the loader (``common/common.cpp``,
``common_control_vector_load_one``) reads 1-D F32 tensors named ``direction.N``, refuses ``N == 0`` ("invalid (zero)
direction tensor layer index") and sums several files, each times its scale; ``llama_adapter_cvec::apply``
(``src/llama-adapter.cpp``) stores ``direction.N`` for layer ``il = N`` ("buffer doesn't have data for layer 0, since
it's never present"), and every model graph adds it with ``build_cvec(cur, il)`` after the residual add at the end of
block ``il``. So ``direction.N`` is added to the output of block ``N`` (0-indexed), the same block as Hugging Face's
``model.layers[N]`` and peft-steer's ``layers=[N]``; block 0 cannot be steered there.

repeng (0.4.0, ``repeng/extract.py`` and ``repeng/control.py``) writes and reads the same files with the same
numbering: ``ControlVector.directions[N]`` is read from the output of block ``N`` and written as ``direction.N``, and
``ControlModel(model, layer_ids)`` adds ``coeff * directions[N]`` to the output of ``model.layers[N]`` for each of its
``layer_ids`` only (negative ids count from the end). Hence ``import_gguf``'s ``layers`` (its ``layer_ids``, or
llama.cpp's ``--control-vector-layer-range``) and ``multiplier`` (its ``coeff``, llama.cpp's scale).

Export writes to a temporary file beside the output and renames it at the end, so a failure leaves the old file (if
any) as it was; import refuses what llama.cpp would not read (non-float or 2-D tensors, vectors of differing
lengths), naming the file and the tensor.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from ..adapter.blocks import find_block_list
from ..adapter.model import check_vector
from ..staging import publish_new, written_whole
from .adapter_files import CONFIG_NAME, WEIGHTS_NAME, base_structure, read_adapter, write_adapter

GGUF_ARCH = "controlvector"
# Float tensor types whose values convert to float32 exactly (F64 is rounded); llama.cpp itself reads only F32.
_FLOAT_TYPES = ("F32", "F16", "F64")
# What GGUFReader raises on a truncated or damaged file (numpy views past the end, bad counts, duplicate names).
_READER_ERRORS = (ValueError, IndexError, KeyError, TypeError, OverflowError)
_BLOCK_0 = "{path}: direction.0 is not a valid control vector block (llama.cpp refuses it too)"


def export_gguf(
    adapter: str | os.PathLike,
    out_path: str | os.PathLike,
    model_hint: str | None = None,
    overwrite: bool = False,
    all_positions: bool = False,
) -> None:
    """Write a saved steering adapter as a llama.cpp control vector: ``direction.N = multiplier * v_N`` (float32).

    Use it with ``llama-cli --control-vector FILE`` (or ``--control-vector-scaled FILE:SCALE``), or in repeng with
    ``ControlModel(model, sorted(vector.directions)).set_control(ControlVector.import_gguf(FILE), coeff=1.0)``. A
    vector at block 0 is refused: llama.cpp cannot steer block 0's output. Both tools add a control vector at every
    position, so an adapter with ``positions="completion"`` is refused unless ``all_positions`` (it would then steer
    the prompt too). An existing ``out_path`` is refused unless ``overwrite``, and never replaced by a half-written
    file.
    """
    adapter, out_path = os.fspath(adapter), os.fspath(out_path)
    _check_output(adapter, out_path, overwrite)
    config, vectors = read_adapter(adapter)
    if 0 in vectors:
        raise ValueError(
            f"{adapter} steers block 0, which llama.cpp cannot steer (its loader refuses direction.0); "
            "train the vector at another block."
        )
    if config.positions != "all" and not all_positions:
        raise ValueError(
            f"{adapter} steers positions={config.positions!r}, but llama.cpp and repeng add a control vector at "
            "every position (prompt included): pass --all-positions (all_positions=True) to export it anyway."
        )
    weights_path = os.path.join(adapter, WEIGHTS_NAME)
    directions = {
        block: _direction(weights_path, block, vector, config.multiplier) for block, vector in vectors.items()
    }
    hint = model_hint or _model_type(config.base_model_name_or_path)
    _write_gguf(out_path, directions, hint, overwrite)


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


def _gguf() -> Any:
    """The gguf package, or a ValueError saying how to install it (an ImportError would be a traceback)."""
    try:
        import gguf
    except ImportError:
        raise ValueError('llama.cpp control vectors need the gguf package: pip install "peft-steer[gguf]".') from None
    return gguf


def _write_gguf(out_path: str, directions: dict[int, np.ndarray], hint: str, overwrite: bool = False) -> None:
    gguf = _gguf()
    # without overwrite the file is created exclusively: one that appeared since `_check_output` is kept
    with written_whole(out_path, publish=None if overwrite else publish_new) as staging:
        writer = gguf.GGUFWriter(staging, arch=GGUF_ARCH)
        writer.add_string(f"{GGUF_ARCH}.model_hint", hint)
        writer.add_uint32(f"{GGUF_ARCH}.layer_count", len(directions))
        for block, direction in sorted(directions.items()):
            writer.add_tensor(f"direction.{block}", direction)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


def read_gguf(path: str | os.PathLike, f32_only: bool = False) -> tuple[dict[int, torch.Tensor], str | None]:
    """``({block: float32 vector}, model_hint)`` of a llama.cpp control vector file; tensors naming the same block
    (``direction.1``, ``direction.01``) are summed, as llama.cpp does. ``direction.0`` is refused, as llama.cpp
    refuses it; ``f32_only`` refuses F16 / F64 tensors too, as llama.cpp's loader does (peft-steer converts them)."""
    path = os.fspath(path)
    vectors, hint = _read_file(path, ("F32",) if f32_only else _FLOAT_TYPES)
    if 0 in vectors:
        raise ValueError(_BLOCK_0.format(path=path) + ".")
    return vectors, hint


def _read_file(path: str, float_types: tuple[str, ...] = _FLOAT_TYPES) -> tuple[dict[int, torch.Tensor], str | None]:
    """``read_gguf`` with ``direction.0`` kept (repeng writes it for a vector trained on block 0)."""
    reader = _open(path)
    architecture = _field(reader, "general.architecture")
    if architecture != GGUF_ARCH:
        raise ValueError(f"{path} is a GGUF file of architecture {architecture!r}, not a control vector.")
    vectors: dict[int, torch.Tensor] = {}
    first: tuple[str, int] | None = None
    for tensor in reader.tensors:
        block, data = _read_direction(path, tensor, float_types)
        first = first or (tensor.name, data.shape[0])
        if data.shape[0] != first[1]:
            raise ValueError(f"{path}: {tensor.name!r} has {data.shape[0]} values, but {first[0]!r} has {first[1]}.")
        vectors[block] = vectors[block] + data if block in vectors else data
    if not vectors:
        raise ValueError(f"{path} holds no direction tensors.")
    return vectors, _field(reader, f"{GGUF_ARCH}.model_hint")


def _open(path: str) -> Any:
    gguf = _gguf()

    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise ValueError(f"{path} is empty: not a GGUF file.")
    try:
        return gguf.GGUFReader(path)
    except _READER_ERRORS as error:
        if "magic" in str(error):
            raise ValueError(f"{path} is not a GGUF file (it does not start with the GGUF magic number).") from None
        raise ValueError(f"{path} is not a valid GGUF file (truncated or damaged?): {error}") from None


def _read_direction(path: str, tensor: Any, float_types: tuple[str, ...]) -> tuple[int, torch.Tensor]:
    """``(block, float32 vector)`` of one tensor, refusing what llama.cpp's loader refuses."""
    name = tensor.name
    if not re.fullmatch(r"direction\.\d+", name):
        raise ValueError(f"{path}: tensor {name!r} is not a control vector direction (direction.N).")
    block = int(name.split(".")[1])
    kind = tensor.tensor_type.name
    if kind not in float_types:
        allowed = " / ".join(float_types)
        raise ValueError(f"{path}: tensor {name!r} is {kind}; a control vector direction is a {allowed} tensor.")
    shape = tuple(int(size) for size in tensor.shape)
    if any(size != 1 for size in shape[1:]):  # ggml counts trailing sizes of 1 as no dimension
        raise ValueError(f"{path}: tensor {name!r} has shape {shape}; a control vector direction is 1-D.")
    data = torch.from_numpy(np.array(tensor.data, dtype=np.float32)).reshape(-1)
    if not torch.isfinite(data).all():
        raise ValueError(f"{path}: tensor {name!r} contains NaN or inf values.")
    return block, data


def import_gguf(
    path: str | os.PathLike,
    base_model: str | os.PathLike | nn.Module,
    out: str | os.PathLike,
    layers: Iterable[int] | None = None,
    multiplier: float = 1.0,
):
    """Turn a llama.cpp (or repeng) control vector into a steering adapter folder for ``base_model``.

    By default every direction of the file is imported, as llama.cpp applies it (``direction.0`` is refused, as
    llama.cpp refuses the file). ``layers`` imports only those blocks (negative: counted from the end of
    ``base_model``'s blocks), as repeng's ``ControlModel(model, layer_ids)`` steers only its ``layer_ids`` (block 0
    included, when named) and llama.cpp's ``--control-vector-layer-range A B`` only blocks ``A..B``
    (``layers=range(A, B + 1)``); a block the file has no direction for is an error. ``multiplier`` is the adapter's
    default strength: repeng's ``coeff``, llama.cpp's ``--control-vector-scaled`` scale (the vectors stay as in the
    file).
    """
    path = os.fspath(path)
    vectors, hint = _read_file(path)
    if layers is None and 0 in vectors:
        raise ValueError(
            _BLOCK_0.format(path=path) + "; pass layers=[...] (--layers) to import chosen blocks, as repeng's "
            "ControlModel(model, layer_ids) applies them."
        )
    model = base_structure(base_model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if hint and hint != "unknown" and model_type and hint != model_type:  # "unknown": exported without a config
        name = getattr(model, "name_or_path", None) or type(model).__name__
        raise ValueError(f"{path} was made for a {hint!r} model; {name} is a {model_type!r} model.")
    if layers is not None:
        vectors = _select(path, vectors, list(layers), len(find_block_list(model)[1]))
    return write_adapter(out, vectors, model, multiplier=multiplier)


def _select(path: str, vectors: dict[int, torch.Tensor], layers: list[int], num_blocks: int) -> dict[int, torch.Tensor]:
    """The directions of ``layers`` (negative: from the end of ``num_blocks``), each named block present in the file."""
    if not layers:
        raise ValueError(f"{path}: layers=[] selects no block; name at least one, or leave layers out for all.")
    selected = {}
    for index in layers:
        if not -num_blocks <= index < num_blocks:
            raise ValueError(
                f"layers={layers}: block {index} is out of range for a model of {num_blocks} decoder blocks "
                f"(use 0..{num_blocks - 1}, or -{num_blocks}..-1 from the end)."
            )
        block = index % num_blocks
        if block not in vectors:
            raise ValueError(f"{path} has no direction for block {block} (it has blocks {sorted(vectors)}).")
        selected[block] = vectors[block]
    return selected


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
        # a hint is not worth a download (or an offline machine's retries): the config only where it is at hand
        return base_structure(base_model, local_files_only=True).config.model_type
    except (OSError, ValueError):
        return "unknown"
