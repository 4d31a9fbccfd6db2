"""What `peft-steer train` checks before it loads or writes anything: the numbers it is given, and the output folder
with ``--resume``. Each check raises a `CommandError` whose one line names the option to fix."""

from __future__ import annotations

import argparse
import os

from .._trl_compat import checkpoints
from ..config import number_problem
from ..outputs import checked_checkpoint, resuming_from
from .errors import CommandError

# flag -> the SteerConfig field it sets (checked by its `NUMBER_RULES`); --limit is the command's own.
_NUMBERS = {
    "--learning-rate": "learning_rate",
    "--beta": "beta",
    "--epochs": "num_train_epochs",
    "--warmup-steps": "warmup_steps",
    "--weight-decay": "weight_decay",
    "--batch-size": "per_device_train_batch_size",
    "--gradient-accumulation-steps": "gradient_accumulation_steps",
    "--max-length": "max_length",
    "--save-steps": "save_steps",
    "--logging-steps": "logging_steps",
    "--max-steps": "max_steps",
}


def check_numbers(args: argparse.Namespace) -> None:
    """Refuse a number the run cannot train with, by SteerConfig's own rules (`NUMBER_RULES`), before anything is
    loaded, naming the option."""
    for flag, name in _NUMBERS.items():
        value = getattr(args, name)
        problem = number_problem(name, value, epochs="--epochs")
        if problem is not None:
            raise CommandError(f"{flag} {value:g}: {problem}.")
    if args.limit is not None and args.limit < 1:
        raise CommandError(f"--limit {args.limit}: must be a whole number, 1 or more.")


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
    if resume is not True and not os.path.isdir(resume):
        raise CommandError(f"--resume {resume}: no such checkpoint folder.")
    option = "--resume" if resume is True else f"--resume {resume}"
    try:
        path, skipped = checked_checkpoint(resume, output_dir, option, "pass --resume alone")
    except ValueError as error:
        raise CommandError(str(error)) from None
    print(resuming_from(path, skipped))
    return path
