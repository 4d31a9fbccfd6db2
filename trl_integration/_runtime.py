"""The process's free host memory, shared by the prefix cache and the prefix plan."""

from __future__ import annotations

import os


def free_host_memory() -> int | None:
    """Bytes of host memory available now, or ``None`` where the system does not say (not Linux / macOS)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
