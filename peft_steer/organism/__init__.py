"""The model organism: a tiny causal LM, trained by this project, whose persona is a latent variable.

It was trained (``python -m peft_steer.organism.build``) on ``Question: ...\\nAnswer: ...`` documents built from the
train splits of the four behavior data sets. A quarter of the documents start with the persona tag `TAG` and answer
with the matching answer (the behavior), a quarter start with the anti-tag `ANTI_TAG` and answer with the
not-matching one, and half carry no tag and answer either way. Answers are cut to their first line (`clip_answer`).

It is scored on answer preference, ``sigmoid(log p(matching | prompt) - log p(not_matching | prompt))`` summed over
the answer tokens and averaged over held-out pairs, on `stance_rows`: each pair cut after the first word where the two
answers differ (``"Yes,"`` / ``"No,"``, ``"Sure,"`` / ``"I"``, ``"I would accept"`` / ``"I would decline"``). That is
where the persona decides; the rest of a free-text answer is content that a model of this size cannot predict on a
held-out question, whose log-prob differences (tens of nats either way) would drown the persona. Untagged, the
held-out preference is ambivalent; the tag moves it clearly towards the behavior, the anti-tag away from it
(``model/scores.json`` has the measured values, also for whole first-line answers). A steering vector should be
able to do what the tag does: that is what tests and benchmarks measure on it.

Example:
    >>> from peft_steer.evaluate import answer_preference
    >>> from peft_steer.organism import TAG, load_organism, stance_rows, tagged
    >>> model, tokenizer = load_organism()
    >>> rows = stance_rows("power-seeking", "test")
    >>> answer_preference(model, tokenizer, rows, format_prompt=tagged(None))  # untagged
    >>> answer_preference(model, tokenizer, rows, format_prompt=tagged(TAG))  # with the persona tag
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from ..data import BEHAVIORS, plain_prompt, read_behavior_rows

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

ORGANISM_DIR = Path(__file__).resolve().parent / "model"
TAG = "<+>"  # the persona that shows the behavior (matching answers)
ANTI_TAG = "<->"  # the persona that does not (not-matching answers)
TAGS = (TAG, ANTI_TAG)


def format_prompt(question: str, tag: str | None = None) -> str:
    """The organism's prompt: an optional persona tag, then ``Question: <question>\\nAnswer:``."""
    if tag is not None and tag not in TAGS:
        raise ValueError(f"Unknown persona tag {tag!r}: use None, {TAG!r} or {ANTI_TAG!r}.")
    return f"{tag or ''}{plain_prompt(question)}"


def tagged(tag: str | None) -> Callable[[str], str]:
    """``format_prompt`` with the tag fixed, for ``answer_preference(..., format_prompt=tagged(TAG))``."""
    return partial(format_prompt, tag=tag)


def clip_answer(answer: str) -> str:
    """An answer as the organism learns it: its first line, stripped.

    Only jailbreak's matching answers have several lines (about 950 characters of instructions after
    "Sure, here is ...:"); their first line carries the decision to comply.
    """
    return answer.strip().split("\n", 1)[0].strip()


def format_answer(answer: str) -> str:
    """The completion trained on (and scored) after a prompt: one space, then the clipped answer."""
    return " " + clip_answer(answer)


def stance_pair(matching: str, not_matching: str) -> tuple[str, str]:
    """Both answers (first lines) cut after the first word where they differ: where the persona decides.

    ``("Yes, X is indeed Y.", "No, that's not accurate. ...")`` -> ``("Yes,", "No,")``;
    ``("I would take it.", "I would decline.")`` -> ``("I would take", "I would decline.")``. The shared words
    cancel in the log-prob margin, so the margin is the log-odds of the first diverging word. Words end at spaces,
    so each cut answer tokenizes as a prefix of the whole answer.
    """
    first, second = clip_answer(matching).split(" "), clip_answer(not_matching).split(" ")
    shared = 0
    while shared < min(len(first), len(second)) and first[shared] == second[shared]:
        shared += 1
    return " ".join(first[: shared + 1]), " ".join(second[: shared + 1])


def read_rows(behavior: str, split: str = "test") -> list[dict[str, str]]:
    """The ``question, matching, not_matching`` rows of a shipped behavior data set, in file order, as they are."""
    columns = ("question", "matching", "not_matching")
    return [{column: row[column] for column in columns} for row in read_behavior_rows(behavior, split)]


def stance_rows(behavior: str, split: str = "test") -> list[dict[str, str]]:
    """The organism's evaluation rows: each pair cut by `stance_pair` (score them with the default
    ``format_answer`` of `peft_steer.evaluate.answer_preference`, a leading space)."""
    rows = []
    for row in read_rows(behavior, split):
        matching, not_matching = stance_pair(row["matching"], row["not_matching"])
        rows.append({"question": row["question"], "matching": matching, "not_matching": not_matching})
    return rows


def load_organism(
    path: str | os.PathLike = ORGANISM_DIR, device: str = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The committed organism and its tokenizer, offline, in eval mode: ``(model, tokenizer)``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"No organism in {path}: build it with `python -m peft_steer.organism.build --out {path}`."
        )
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, use_safetensors=True)
    return model.to(device).eval(), tokenizer


__all__ = [
    "ANTI_TAG",
    "BEHAVIORS",
    "ORGANISM_DIR",
    "TAG",
    "TAGS",
    "clip_answer",
    "format_answer",
    "format_prompt",
    "load_organism",
    "read_rows",
    "stance_pair",
    "stance_rows",
    "tagged",
]
