"""The paper's four behavior data sets, shipped in ``peft_steer/data/behaviors`` (MIT, see its LICENSE), and the
project's own evaluation data beside them: a pair of system prompts per behavior (the prompting baseline) and neutral
questions (the off-target prompts that steering's cost is measured on)."""

from __future__ import annotations

import os

from .files import DataError, read_file

BEHAVIORS = ("hallucination", "jailbreak", "power-seeking", "wealth-seeking")
SPLITS = ("train", "test", "test_infer")
DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "behaviors")
SYSTEM_PROMPTS_PATH = os.path.join(os.path.dirname(DATA_DIR), "system_prompts.csv")
NEUTRAL_QUESTIONS_PATH = os.path.join(os.path.dirname(DATA_DIR), "neutral_questions.csv")


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


def prompting_pair(behavior: str) -> dict[str, str]:
    """The shipped system prompts that ask for ``behavior`` and for its opposite, ``{"for": ..., "against": ...}``
    (``peft_steer/data/system_prompts.csv``, in the style of CAA's behavior prompts: "You are an AI assistant
    that ...")."""
    if behavior not in BEHAVIORS:
        raise DataError(f"Unknown behavior {behavior!r}: choose one of {', '.join(BEHAVIORS)}.")
    rows = {row.values["behavior"]: row.values for row in read_file(SYSTEM_PROMPTS_PATH)}
    return {"for": rows[behavior]["for"], "against": rows[behavior]["against"]}


def neutral_questions() -> list[str]:
    """The shipped neutral questions (``peft_steer/data/neutral_questions.csv``): everyday questions that none of
    the behaviors is about, the off-target prompts on which `peft_steer.evaluate.steering_costs` measures drift
    and fluency."""
    return [row.values["question"] for row in read_file(NEUTRAL_QUESTIONS_PATH)]
