"""The official BiPO vectors (``vec_ep{E}_layer{L}.pt`` torch files of CaoYuanpu/BiPO) as steering adapters."""

from __future__ import annotations

import os
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
    except Exception as error:  # the restricted unpickler refuses arbitrary objects
        raise ValueError(
            f"{path} is not a plain tensor file (refused by torch.load(weights_only=True)): {error}"
        ) from None
    if not isinstance(loaded, torch.Tensor):
        raise ValueError(f"{path} holds a {type(loaded).__name__}, not a steering vector tensor.")
    if loaded.dim() != 1 or not loaded.is_floating_point():
        raise ValueError(f"{path} holds a {loaded.dtype} tensor of shape {tuple(loaded.shape)}, not a 1-D vector.")
    match = OFFICIAL_NAME.search(os.path.basename(path))
    layer = int(match["layer"]) if match else None
    epoch = int(match["epoch"]) if match else None
    return OfficialVector(loaded.detach().float().clone(), layer, epoch)


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
