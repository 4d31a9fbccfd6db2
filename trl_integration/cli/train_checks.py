"""What `peft-steer train` checks before it loads or writes anything: the numbers it is given, and the output folder
with ``--resume``. Each check raises a `CommandError` whose one line names the option to fix."""

from __future__ import annotations

import argparse
import math
import os

from .._trl_compat import checkpoints, is_complete_checkpoint
from ..outputs import incomplete, last_complete_checkpoint, resuming_from
from .errors import CommandError

# flag -> the attribute it sets; a value must be finite and above 0 / finite and 0 or more / a whole number from 1 /
# a whole number of steps from 1 or a fraction of all steps (TrainingArguments reads a value below 1 so).
_POSITIVE = {"--learning-rate": "learning_rate", "--beta": "beta", "--epochs": "num_train_epochs"}
_NOT_NEGATIVE = {"--warmup-steps": "warmup_steps", "--weight-decay": "weight_decay"}
_COUNTS = {
    "--batch-size": "per_device_train_batch_size",
    "--gradient-accumulation-steps": "gradient_accumulation_steps",
    "--max-length": "max_length",
    "--limit": "limit",
}
_STEPS = {"--save-steps": "save_steps", "--logging-steps": "logging_steps"}


def check_numbers(args: argparse.Namespace) -> None:
    """Refuse a number the run cannot train with: a NaN or infinite one ends in a NaN vector or an error deep inside
    the Trainer, and ``--epochs 0`` or ``--learning-rate 0`` in an untrained vector saved as if trained."""
    for flag, name in _POSITIVE.items():
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise CommandError(f"{flag} {value:g}: must be a finite number above 0.")
    for flag, name in _NOT_NEGATIVE.items():
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise CommandError(f"{flag} {value:g}: must be a finite number, 0 or more.")
    for flag, name in _COUNTS.items():
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CommandError(f"{flag} {value}: must be a whole number, 1 or more.")
    for flag, name in _STEPS.items():
        value = getattr(args, name)
        if value is not None and not (0 < value < 1 or (value >= 1 and float(value).is_integer())):
            raise CommandError(
                f"{flag} {value:g}: must be a whole number, 1 or more (or a fraction of all steps, below 1)."
            )
    if args.max_steps != -1 and args.max_steps < 1:
        raise CommandError(
            f"--max-steps {args.max_steps}: must be a whole number, 1 or more (or -1: train for --epochs)."
        )


def checked_output(output_dir: str, resume: bool | str | None) -> str | None:
    """The checkpoint to resume from (``None``: a new run), with ``output_dir`` checked: a new or empty folder, or one
    that holds the checkpoints of the run that ``--resume`` continues. Prints which checkpoint a run resumes from."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise CommandError(f"--output-dir {output_dir}: a file, not a folder.")
    found = checkpoints(output_dir)
    if resume is None and found:
        raise CommandError(
            f"{output_dir} already holds checkpoints: pass --resume to continue that run, or another --output-dir."
        )
    if resume is True and not found:
        raise CommandError(f"--resume: {output_dir} holds no checkpoint-* folder to resume from.")
    if not found and os.path.isdir(output_dir) and os.listdir(output_dir):
        raise CommandError(
            f"--output-dir {output_dir} is not empty and holds no checkpoint to resume: its files would be "
            "overwritten. Choose a new or empty folder."
        )
    if resume is None:
        return None
    if resume is True:
        path, skipped = last_complete_checkpoint(output_dir)
        if path is None:
            reasons = "; ".join(incomplete(folder) for folder in skipped)
            raise CommandError(f"--resume: no complete checkpoint in {output_dir} ({reasons}).")
        print(resuming_from(path, skipped))
        return path
    if not os.path.isdir(resume):
        raise CommandError(f"--resume {resume}: no such checkpoint folder.")
    if not is_complete_checkpoint(resume):
        raise CommandError(
            f"--resume {resume}: {incomplete(resume)}; pass an earlier checkpoint, or --resume alone for the last "
            "complete one."
        )
    print(resuming_from(resume, []))
    return resume
