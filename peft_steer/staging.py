"""Writing a file or folder whole or not at all: written under a temporary name beside its destination, then renamed
into place, so that a failure (a full disk, a kill) never leaves something that passes for complete."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["check_destination", "publish_new", "staging_path", "usual_permissions", "written_whole"]


def staging_path(destination: str) -> str:
    """A fresh hidden name beside ``destination`` (same folder, so the final rename cannot cross file systems).

    Not ``tempfile``: its private permissions (0600 / 0700) would stay on the renamed output; a plain ``open`` or
    ``mkdir`` of this name gets the user's usual ones.
    """
    parent = os.path.dirname(os.path.abspath(destination))
    os.makedirs(parent, exist_ok=True)
    return os.path.join(parent, f".peft-steer-{secrets.token_hex(8)}-{os.path.basename(destination)}")


def check_destination(destination: str, *, new: bool = False) -> None:
    """Raise an OSError whose one line starts with ``destination`` when a file could not be written there, so that a
    command finds out before its work, not after it.

    Refused: a folder at ``destination``; a symbolic link to nothing (writing through it would create a file
    elsewhere); with ``new``, anything already there; a read-only file; a parent folder that does not exist (it is not
    created: a typo would otherwise scatter folders) or that refuses a new file, tried by creating and removing a
    fresh staging name beside it (never a name of the user's).
    """
    parent = os.path.dirname(os.path.abspath(destination))
    if os.path.islink(destination) and not os.path.exists(destination):
        raise FileExistsError(
            f"{destination} is a symbolic link to {os.readlink(destination)}, which does not exist: remove the link "
            "or choose another file."
        )
    if os.path.isdir(destination):
        raise IsADirectoryError(f"{destination} is a folder: name a file.")
    if new and os.path.lexists(destination):
        raise FileExistsError(f"{destination} exists: remove it or choose another file (nothing is overwritten).")
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"{destination}: the folder {parent} does not exist; create it first.")
    probe = staging_path(destination)
    try:
        with open(probe, "x"):
            pass
    except OSError as error:
        raise PermissionError(f"{destination}: cannot write a file in {parent} ({error.strerror or error}).") from None
    os.remove(probe)
    if os.path.exists(destination) and not os.access(destination, os.W_OK):
        raise PermissionError(f"{destination} is read-only: make it writable or choose another file.")


def usual_permissions(path: str) -> None:
    """Give ``path`` the mode a plain ``open`` gives a new file (0666 less the umask): safetensors' ``save_file``
    creates its files 0600, which a shared folder or a pushed repository should not get for one file alone."""
    mask = os.umask(0)
    os.umask(mask)  # the only way to read it
    os.chmod(path, 0o666 & ~mask)


def publish_new(staging: str, destination: str) -> None:
    """Give the file ``staging`` the name ``destination``, failing (FileExistsError) rather than replacing a file
    that appeared meanwhile."""
    os.link(staging, destination)
    os.unlink(staging)


def _replace(staging: str, destination: str) -> None:
    if os.path.isdir(staging) and os.path.isdir(destination):
        os.rmdir(destination)  # only an empty folder is replaced; a full one is an error
    os.replace(staging, destination)


@contextmanager
def written_whole(
    destination: str,
    *,
    folder: bool = False,
    staging: str | None = None,
    publish: Callable[[str, str], None] | None = None,
) -> Iterator[str]:
    """Yield the path to write ``destination``'s content to (a folder, created, with ``folder``; else a file name);
    once the block ends it becomes ``destination``; if the block raises, it is removed and ``destination`` is left
    as it was.

    ``staging``: a fixed staging path (one left by a killed run is removed first) instead of a fresh `staging_path`.
    ``publish(staging, destination)``: how it takes its place; the default renames it, replacing a file or an empty
    folder. An OSError of the write or of the default rename names ``destination``, not the temporary path (gone by
    then); ``publish_new`` never replaces anything.
    """
    staging = staging or staging_path(destination)
    _remove(staging)
    if folder:
        os.makedirs(staging)
    try:
        yield staging
    except BaseException as error:
        _remove(staging)
        if isinstance(error, OSError):
            raise _naming(error, destination) from error
        raise
    try:
        (publish or _replace)(staging, destination)
    except OSError as error:
        if publish not in (None, publish_new):
            raise  # a publish of the caller's own may have moved part of it: what is left stays to be looked at
        _remove(staging)
        raise _naming(error, destination) from error
    _remove(staging)  # what a publish of the caller's own left behind


def _naming(error: OSError, destination: str) -> OSError:
    # The error names the temporary path, which is gone: name the output instead (the errno keeps its subclass, e.g.
    # FileExistsError).
    text = f"writing {destination} failed, nothing was written: {error.strerror or error}"
    return OSError(error.errno, text) if error.errno is not None else OSError(text)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)
