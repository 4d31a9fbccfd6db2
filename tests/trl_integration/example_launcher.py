"""Run by test_accelerate_launch.py under `accelerate launch`: runs examples/train_bipo.py with this script's options,
then leaves at once. Gloo's worker threads can abort a process that has finished its work while the interpreter shuts
down (pytorch/pytorch#190489, see launch_worker.py), which would fail the launch after everything is written."""

from __future__ import annotations

import os
import runpy
import sys

EXAMPLE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples", "train_bipo.py"
)

if __name__ == "__main__":
    sys.argv[0] = EXAMPLE
    runpy.run_path(EXAMPLE, run_name="__main__")  # an error in the example still fails the process
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
