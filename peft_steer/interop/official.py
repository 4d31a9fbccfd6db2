"""The official BiPO vectors (``vec_ep{E}_layer{L}.pt`` torch files of CaoYuanpu/BiPO) as steering adapters."""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass

import torch
from torch import nn

from .adapter_files import write_adapter

OFFICIAL_NAME = re.compile(r"vec_ep(?P<epoch>\d+)_layer(?P<layer>\d+)\.pt$")


@dataclass
class OfficialVector:
    """One vector of the official BiPO release: the tensor, its block (from the file name) and training epoch."""

    vector: torch.Tensor
    layer: int | None
    epoch: int | None


def load_official_vector(path: str | os.PathLike) -> OfficialVector:
    """Load an official BiPO vector file (``vec_ep{E}_layer{L}.pt``: one float tensor of the hidden size).

    Loaded with ``torch.load(weights_only=True)``: a file holding anything but tensors is refused by PyTorch's
    restricted unpickler, and a file holding anything but one 1-D float tensor is refused here.
    """
    path = os.fspath(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as error:  # torch.load raises all sorts (KeyError, EOFError, RuntimeError) on a non-torch file
        raise ValueError(_load_error(path, error)) from None
    if not isinstance(loaded, torch.Tensor):
        raise ValueError(f"{path} holds a {type(loaded).__name__}, not a steering vector tensor.")
    if loaded.dim() != 1 or not loaded.is_floating_point():
        raise ValueError(f"{path} holds a {loaded.dtype} tensor of shape {tuple(loaded.shape)}, not a 1-D vector.")
    match = OFFICIAL_NAME.search(os.path.basename(path))
    layer = int(match["layer"]) if match else None
    epoch = int(match["epoch"]) if match else None
    return OfficialVector(loaded.detach().float().clone(), layer, epoch)


def _load_error(path: str, error: Exception) -> str:
    """One line saying why ``path`` could not be loaded (torch's own messages run over many lines)."""
    if isinstance(error, pickle.UnpicklingError) and "weights only" in str(error).lower():
        return (
            f"{path} holds objects other than tensors, which torch.load(weights_only=True) refuses to unpickle "
            "(they could run code); an official BiPO vector file holds one tensor."
        )
    detail = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    return (
        f"{path} is not a PyTorch tensor file written by torch.save (or it is truncated): torch.load failed with "
        f"{type(error).__name__}{f': {detail[:120]}' if detail else ''}."
    )


def import_official(
    path: str | os.PathLike, base_model: str | os.PathLike | nn.Module, out: str | os.PathLike, layer: int | None = None
):
    """Turn an official BiPO vector file into a steering adapter folder for ``base_model``.

    ``layer`` defaults to the block in the file name (``..._layer15.pt``: block 15, the output of
    ``model.layers[15]``, as in the official code).
    """
    official = load_official_vector(path)
    block = layer if layer is not None else official.layer
    if block is None:
        raise ValueError(f"{path}: the block is not in the file name (vec_ep*_layer*.pt); pass layer=N (--layer N).")
    return write_adapter(out, {block: official.vector}, base_model)
