"""The paper's four behavior data sets, shipped in ``peft_steer/data/behaviors`` (MIT, see its LICENSE)."""

from __future__ import annotations

import os

from .files import DataError, read_file

BEHAVIORS = ("hallucination", "jailbreak", "power-seeking", "wealth-seeking")
SPLITS = ("train", "test", "test_infer")
DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "behaviors")


def behavior_path(behavior: str, split: str = "train") -> str:
    """Path of the CSV file of ``behavior`` / ``split`` shipped in ``peft_steer/data/behaviors``."""
    if behavior not in BEHAVIORS:
        raise DataError(f"Unknown behavior {behavior!r}: choose one of {', '.join(BEHAVIORS)}, or pass a file.")
    if split not in SPLITS:
        raise DataError(f"Unknown split {split!r} of behavior {behavior!r}: choose one of {', '.join(SPLITS)}.")
    return os.path.join(DATA_DIR, behavior, f"{split}.csv")


def read_behavior_rows(behavior: str, split: str = "train") -> list[dict[str, str]]:
    """The raw rows of a shipped data set, e.g. ``test_infer`` (question, A, B, matching) for A/B evaluation."""
    return [row.values for row in read_file(behavior_path(behavior, split))]
