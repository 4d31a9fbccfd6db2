"""Importing repeng (https://github.com/vgel/repeng), whose control vectors peft-steer reads and writes as GGUF files,
under NumPy 2: ``peft_steer.interop.repeng_import.import_repeng()`` in place of ``import repeng``."""

from __future__ import annotations

import importlib
from types import ModuleType

import numpy as np

__all__ = ["REPENG_INSTALL", "import_repeng"]

REPENG_INSTALL = "pip install --no-deps repeng==0.4.0 && pip install scikit-learn"


def import_repeng() -> ModuleType:
    """The ``repeng`` module, imported with NumPy 1 or 2.

    repeng 0.4.0 pins ``numpy<2`` (installed without its dependencies, see the README) and annotates
    ``ControlVector.__mul__`` with ``np.float_`` (``repeng/extract.py:230``), an alias NumPy 2 removed: its import fails
    with an AttributeError. The alias is given for that import only (annotations are read once, when the class is
    defined) and taken away again, so that nothing else sees it. An ImportError says how to install repeng.
    """
    added = not hasattr(np, "float_")
    if added:
        np.float_ = np.float64
    try:
        return importlib.import_module("repeng")
    except ImportError as error:
        raise ImportError(f"peft-steer's repeng support needs repeng: {REPENG_INSTALL}") from error
    finally:
        if added:
            del np.float_
