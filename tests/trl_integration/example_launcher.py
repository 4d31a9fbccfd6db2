"""Run by test_accelerate_launch.py under `accelerate launch`: runs examples/train_bipo.py with this script's options,
then leaves at once. Gloo's worker threads can abort a process that has finished its work while the interpreter shuts
down (pytorch/pytorch#190489, see launch_worker.py), which would fail the launch after everything is written.

Usage: example_launcher.py [--fsdp-on-cpus] EXAMPLE_OPTIONS...

--fsdp-on-cpus makes accelerate start the FSDP of its launch config on these CPU processes, as in launch_worker.py.
"""

from __future__ import annotations

import os
import runpy
import sys

from accelerate import PartialState
from accelerate.utils import DistributedType

from trl_integration import config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "examples", "train_bipo.py")


def _take_cpus_for_gpus() -> None:
    """After each SteerConfig has set up the processes' state, mark them MULTI_GPU: accelerate then turns the
    launch's FSDP config into FSDP (the processes, their CPU device and gloo stay as they are)."""
    set_up = config.SteerConfig.__post_init__

    def __post_init__(self) -> None:
        set_up(self)
        PartialState().distributed_type = DistributedType.MULTI_GPU

    config.SteerConfig.__post_init__ = __post_init__


if __name__ == "__main__":
    if sys.argv[1:2] == ["--fsdp-on-cpus"]:
        del sys.argv[1]
        _take_cpus_for_gpus()
    sys.argv[0] = EXAMPLE
    runpy.run_path(EXAMPLE, run_name="__main__")  # an error in the example still fails the process
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
