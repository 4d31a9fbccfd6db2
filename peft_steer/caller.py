"""Pointing a warning at the user's own line, however many library frames lie between it and the check.

Python 3.12's ``warnings.warn(skip_file_prefixes=...)`` does this; peft-steer supports 3.11, so the stack level is
counted here, at the time of the warning, instead of being a fixed number that another library's call chain decides.
"""

from __future__ import annotations

import inspect
import os
import sys
import warnings
from collections.abc import Iterable

__all__ = ["LIBRARIES", "warn_at_caller"]

# The packages between a user's call and a check: peft-steer's two, and the libraries that call back into them (a
# trainer's data sets are checked from inside DPOTrainer.__init__). Named, not imported: one not loaded is no frame.
LIBRARIES = ("peft_steer", "trl_integration", "trl", "transformers", "datasets")


def warn_at_caller(message: str, category: type[Warning] = UserWarning, libraries: Iterable[str] = LIBRARIES) -> None:
    """``warnings.warn(message, category)`` attributed to the first frame outside ``libraries`` (top-level package
    names)."""
    folders = tuple(_folder(name) for name in libraries if name in sys.modules)
    frame, level = inspect.currentframe(), 1  # level 1: this function's own frame
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(folders):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def _folder(package: str) -> str:
    # The package's folder with a trailing separator, so that "trl" does not match "trl_integration".
    return os.path.dirname(os.path.abspath(sys.modules[package].__file__)) + os.sep
