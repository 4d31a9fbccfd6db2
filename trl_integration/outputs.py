"""What the trainer writes to ``output_dir``, written so that a failure leaves nothing that passes for complete.

- The final adapter (`SteerTrainer.save_model`) and each ``vectors/epoch-<n>`` are written to a temporary sibling
  folder and moved into place once whole (`staged_folder`): a save that fails (a full disk) leaves no folder that loads.
- Checkpoints are transformers' `Trainer`'s, written in place; resuming takes the last complete one
  (`resume_checkpoint`), so a checkpoint cut off by a kill is skipped.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager

from peft_steer.staging import written_whole

from ._trl_compat import checkpoint_problem, checkpoints, is_checkpoint_folder, is_complete_checkpoint

logger = logging.getLogger(__name__)

STAGING_SUFFIX = ".partial"
# PEFT loads a folder by its adapter_config.json: while it is absent, the folder does not pass for an adapter.
ADAPTER_CONFIG = "adapter_config.json"


@contextmanager
def staged_folder(path: str, writer: bool = True) -> Iterator[str]:
    """Yield a temporary sibling folder of ``path`` to write into; once the block ends, what it holds moves into
    ``path``; if the block raises, it is removed and ``path`` is left as it was.

    A new ``path`` appears whole, by one rename. Into an existing one (the run's output folder, which holds the
    checkpoints too) the files move one by one: its old ``adapter_config.json`` first goes, and the new one comes last,
    so that the folder never loads as a mix of two saves. Its ``README.md`` is copied in first, so that a model card is
    updated as it would be in place. ``writer``: this process writes (under data parallelism, the main one); the others
    are given the same folder and move nothing.
    """
    path = os.path.abspath(path)
    # One name every process knows; one left by a process killed while it saved is removed first.
    staging = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}{STAGING_SUFFIX}")
    if not writer:
        yield staging
        return
    with written_whole(path, folder=True, staging=staging, publish=_move_into_place):
        card = os.path.join(path, "README.md")
        if os.path.isfile(card):
            shutil.copy2(card, staging)
        yield staging


def _move_into_place(staging: str, path: str) -> None:
    if not os.path.exists(path):
        os.rename(staging, path)
        return
    files = [
        os.path.relpath(os.path.join(root, name), staging) for root, _, names in os.walk(staging) for name in names
    ]
    configs = [name for name in files if os.path.basename(name) == ADAPTER_CONFIG]
    for name in configs:
        if os.path.isfile(os.path.join(path, name)):
            os.remove(os.path.join(path, name))
    for name in [name for name in files if name not in configs] + configs:
        os.makedirs(os.path.dirname(os.path.join(path, name)), exist_ok=True)
        os.replace(os.path.join(staging, name), os.path.join(path, name))
    shutil.rmtree(staging)


# How a failed write (a full disk) surfaces from the writers of a Trainer checkpoint: torch.save's zip writer raises a
# RuntimeError ("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: file write
# failed", or "unexpected pos"), safetensors a SafetensorError ("... No space left on device").
_WRITE_FAILURES = (
    "PytorchStreamWriter",
    "file write failed",
    "unexpected pos",
    "No space left on device",
    "StorageFull",
)


def failed_write(error: BaseException) -> bool:
    """Whether ``error``, raised while the trainer ran, is a checkpoint write that failed (see `_WRITE_FAILURES`)."""
    return type(error).__name__ in ("RuntimeError", "SafetensorError") and any(
        marker in str(error) for marker in _WRITE_FAILURES
    )


def resume_checkpoint(requested: str | bool | None, output_dir: str) -> str | None:
    """The checkpoint to resume from: ``requested`` checked to be complete, or for ``True`` the last complete one in
    ``output_dir`` (logged, with the newer ones skipped because they were cut off while being written)."""
    if requested is None or requested is False:
        return None
    option = "resume_from_checkpoint=True" if requested is True else f"resume_from_checkpoint={requested!r}"
    path, skipped = checked_checkpoint(requested, output_dir, option, "pass True")
    if requested is True:
        log = logger.warning if skipped else logger.info
        log("%s", resuming_from(path, skipped))
    return path


def checked_checkpoint(requested: str | bool, output_dir: str, option: str, last: str) -> tuple[str, list[str]]:
    """``(checkpoint, skipped)``: ``requested`` if it is no incomplete checkpoint, or for ``True`` the last complete one
    of ``output_dir`` and the incomplete ones newer than it. A ValueError starts with ``option`` (the setting as the
    user gave it) and says to ``last`` for the last complete one."""
    if requested is True:
        path, skipped = last_complete_checkpoint(output_dir)
        if path is None:
            raise ValueError(
                f"{option}: no complete checkpoint in {output_dir}"
                + (f" ({'; '.join(incomplete(folder) for folder in skipped)})." if skipped else ".")
            )
        return path, skipped
    if os.path.isdir(requested) and not is_checkpoint_folder(requested):
        raise ValueError(
            f"{option}: no checkpoint there ({requested} is no checkpoint-<step> folder of a run); give one of the "
            f"run's checkpoint folders, or {last} for the last complete one."
        )
    if os.path.isdir(requested) and not is_complete_checkpoint(requested):
        raise ValueError(
            f"{option}: {incomplete(requested)}; resume from an earlier checkpoint, or {last} for the last complete "
            "one."
        )
    return requested, []


def last_complete_checkpoint(output_dir: str) -> tuple[str | None, list[str]]:
    """The newest complete ``checkpoint-<step>`` of ``output_dir`` (``None`` if none is), and the incomplete ones
    newer than it."""
    skipped: list[str] = []
    for folder in reversed(checkpoints(output_dir)):
        if is_complete_checkpoint(folder):
            return folder, skipped[::-1]
        skipped.append(folder)
    return None, skipped[::-1]


def incomplete(folder: str) -> str:
    """Why the checkpoint ``folder`` is not used."""
    return f"{os.path.basename(folder)} is incomplete ({checkpoint_problem(folder)})"


def resuming_from(path: str, skipped: list[str]) -> str:
    """The line that says which checkpoint a run resumes from, and which newer ones it skips."""
    return f"Resuming from {path}" + "".join(f"; {incomplete(folder)}" for folder in skipped)
