"""llama.cpp control vectors (GGUF) in and out.

llama.cpp's convention, read from its source: the loader (``common/common.cpp``,
``common_control_vector_load_one``) reads 1-D F32 tensors named ``direction.N``, refuses ``N == 0`` ("invalid (zero)
direction tensor layer index") and sums several files, each times its scale; ``llama_adapter_cvec::apply``
(``src/llama-adapter.cpp``) stores ``direction.N`` for layer ``il = N`` ("buffer doesn't have data for layer 0, since
it's never present"), and every model graph adds it with ``build_cvec(cur, il)`` after the residual add at the end of
block ``il``. So ``direction.N`` is added to the output of block ``N`` (0-indexed), the same block as Hugging Face's
``model.layers[N]`` and peft-steer's ``layers=[N]``; block 0 cannot be steered there.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np
import torch
from torch import nn

from .adapter_files import base_structure, read_adapter, write_adapter

GGUF_ARCH = "controlvector"


def export_gguf(adapter: str | os.PathLike, out_path: str | os.PathLike, model_hint: str | None = None) -> None:
    """Write a saved steering adapter as a llama.cpp control vector: ``direction.N = multiplier * v_N``.

    Use it with ``llama-cli --control-vector FILE`` (or ``--control-vector-scaled FILE SCALE``). A vector at block 0
    is refused: llama.cpp cannot steer block 0's output.
    """
    import gguf

    config, vectors = read_adapter(os.fspath(adapter))
    if 0 in vectors:
        raise ValueError(
            f"{adapter} steers block 0, which llama.cpp cannot steer (its loader refuses direction.0); "
            "train the vector at another block."
        )
    hint = model_hint or _model_type(config.base_model_name_or_path)
    out_path = os.fspath(out_path)
    staging = f"{out_path}.partial"
    try:
        writer = gguf.GGUFWriter(staging, arch=GGUF_ARCH)
        writer.add_string(f"{GGUF_ARCH}.model_hint", hint)
        writer.add_uint32(f"{GGUF_ARCH}.layer_count", len(vectors))
        for block, vector in sorted(vectors.items()):
            writer.add_tensor(f"direction.{block}", (config.multiplier * vector).numpy().astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(staging, out_path)
    finally:
        if os.path.exists(staging):
            os.remove(staging)


def read_gguf(path: str | os.PathLike) -> tuple[dict[int, torch.Tensor], str | None]:
    """``({block: vector}, model_hint)`` of a llama.cpp control vector file; duplicates of a block are summed,
    as llama.cpp does."""
    import gguf

    path = os.fspath(path)
    reader = gguf.GGUFReader(path)
    architecture = _field(reader, "general.architecture")
    if architecture != GGUF_ARCH:
        raise ValueError(f"{path} is a GGUF file of architecture {architecture!r}, not a control vector.")
    vectors: dict[int, torch.Tensor] = {}
    for tensor in reader.tensors:
        name = tensor.name
        if not re.fullmatch(r"direction\.\d+", name):
            raise ValueError(f"{path}: tensor {name!r} is not a control vector direction (direction.N).")
        block = int(name.split(".")[1])
        if block == 0:
            raise ValueError(f"{path}: direction.0 is not a valid control vector block (llama.cpp refuses it too).")
        data = torch.from_numpy(np.array(tensor.data, dtype=np.float32)).reshape(-1)
        vectors[block] = vectors[block] + data if block in vectors else data
    if not vectors:
        raise ValueError(f"{path} holds no direction tensors.")
    return vectors, _field(reader, f"{GGUF_ARCH}.model_hint")


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
