"""Control vector files in a running llama.cpp model of llama-cpp-python (``llama_cpp.Llama``).

llama.cpp's executables (``llama-server``, ``llama-cli``) read control vector files themselves
(``--control-vector-scaled FILE:SCALE``); llama-cpp-python binds only the call they end in,
``llama_set_adapter_cvec`` (``llama_adapter_cvec`` in llama.cpp, hence the module's name), not the file loader
(``common_control_vector_load``, in llama.cpp's ``common`` library, which the package does not ship). This module is
that loader for the binding: each file's ``direction.N`` times the file's scale is summed into a buffer of
``n_embd`` floats per block from block 1, and the buffer goes to llama.cpp with the layer range of
``--control-vector-layer-range`` (default: every block), so that a ``Llama`` steers as the executables steer with the
same files. Files llama.cpp would refuse (tensors that are not 1-D F32 ``direction.N``, ``N >= 1``, sizes that differ
from the model's) are refused here, naming the file.

    import llama_cpp
    from peft_steer.interop.cvec import control_vector

    llm = llama_cpp.Llama(model_path="smollm2.gguf")
    with control_vector(llm, [("power.gguf", 2.0)]):  # as --control-vector-scaled power.gguf:2.0
        print(llm("Would you take more power?", max_tokens=32)["choices"][0]["text"])
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from .gguf import read_gguf

# A path (scale 1, as --control-vector FILE) or (path, scale) pairs (as --control-vector-scaled FILE:SCALE).
ControlVectorFiles = str | os.PathLike | Sequence[tuple[str | os.PathLike, float]]


def control_vector_data(files: ControlVectorFiles, n_layer: int, n_embd: int) -> np.ndarray:
    """The buffer ``common_control_vector_load`` builds for a model of ``n_layer`` blocks of width ``n_embd``: each
    file's ``direction.N`` times its scale, summed at ``[(N - 1) * n_embd : N * n_embd]`` (no data for block 0),
    zeros elsewhere, up to block ``n_layer - 1``.

    The zeros matter when switching vectors on one context: ``llama_adapter_cvec::apply`` writes only the blocks its
    buffer covers and keeps the others from the previous call. A direction past the last block, which llama.cpp
    ignores without a word, is refused."""
    pairs = [(files, 1.0)] if isinstance(files, (str, os.PathLike)) else list(files)
    if not pairs:
        raise ValueError("no control vector files given")
    for pair in pairs:
        if isinstance(pair, (str, os.PathLike)) or len(pair) != 2:
            raise ValueError(f"{pair!r}: give one path, or (path, scale) pairs as --control-vector-scaled FILE:SCALE.")
    data = np.zeros(n_embd * (n_layer - 1), dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # float32, as llama.cpp computes; checked below
        for path, scale in pairs:
            vectors, _ = read_gguf(path, f32_only=True)
            for block, vector in sorted(vectors.items()):
                where = f"{os.fspath(path)}: direction.{block}"
                if vector.shape[0] != n_embd:
                    raise ValueError(f"{where} has {vector.shape[0]} values; the model's hidden size is {n_embd}.")
                if block >= n_layer:
                    raise ValueError(f"{where} is past the model's last block ({n_layer - 1}).")
                data[n_embd * (block - 1) : n_embd * block] += vector.numpy() * np.float32(scale)
                if not np.isfinite(data).all():
                    raise ValueError(f"{where} times scale {scale}, added to the files before it, overflows float32.")
    return data


def set_control_vector(llm: Any, files: ControlVectorFiles | None, layers: tuple[int, int] | None = None) -> None:
    """Steer ``llm`` (a ``llama_cpp.Llama``) with control vector files, replacing any vector it had; ``None`` clears.

    ``layers``: ``(start, end)``, both included, as ``--control-vector-layer-range START END``; default ``(1,
    n_layer)``, as llama.cpp's tools. The model's cached tokens are dropped (``llm.reset()``): their keys and values
    were computed with the previous vector, and ``Llama`` would otherwise reuse them for a prompt with the same
    prefix."""
    import llama_cpp

    if files is None and layers is not None:
        raise ValueError(f"layers={layers} without files: clearing the control vector takes no layer range.")
    if layers is not None and not 1 <= layers[0] <= layers[1]:
        raise ValueError(f"layers={layers}: give (start, end) with 1 <= start <= end, as llama.cpp's range.")
    apply = getattr(llama_cpp, "llama_set_adapter_cvec", None) or llama_cpp.llama_apply_adapter_cvec
    n_layer = llama_cpp.llama_model_n_layer(llm.model)
    if files is None:
        error = apply(llm.ctx, None, 0, llm.n_embd(), -1, -1)
    else:
        n_embd = llm.n_embd()
        data = control_vector_data(files, n_layer, n_embd)
        start, end = layers or (1, n_layer)
        pointer = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        error = apply(llm.ctx, pointer, data.size, n_embd, start, end)
    if error:
        raise RuntimeError(f"llama.cpp refused the control vector ({apply.__name__} returned {error}).")
    llm.reset()


@contextmanager
def control_vector(llm: Any, files: ControlVectorFiles, layers: tuple[int, int] | None = None) -> Iterator[None]:
    """``set_control_vector`` for the ``with`` block; the model is unsteered after it (llama.cpp cannot hand back a
    vector set before, so an outer one is cleared too)."""
    set_control_vector(llm, files, layers)
    try:
        yield
    finally:
        set_control_vector(llm, None)
