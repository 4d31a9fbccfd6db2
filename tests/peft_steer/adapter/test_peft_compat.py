"""What `_peft_compat` keeps off the user's screen: bitsandbytes' notices about its optional hub kernel, online and
offline, and nothing else."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

import peft_steer  # noqa: F401  (installs the filters)

BNB = "bitsandbytes.backends.cpu.ops"
FAILED = "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already `pip install`"
REPO = "kernels-community/quantization-bitsandbytes"
ROOT = Path(__file__).resolve().parents[3]


def passes(name: str, message: str, *args: object) -> bool:
    logger = logging.getLogger(name)
    return bool(logger.filter(logger.makeRecord(name, logging.WARNING, __file__, 0, message, args, None)))


def test_only_the_notices_about_the_optional_kernel_are_dropped():
    assert not passes(BNB, FAILED, f"Kernel repository '{REPO}' could not verify publisher trust status.")
    assert not passes(BNB, FAILED, f"Version 1 of '{REPO}' is not available in the local cache and ... offline mode.")
    skipped = f"Skipping publisher trust check for '{REPO}' because Hugging Face Hub is in offline mode."
    assert not passes("kernels._internals.hf_hub", skipped)
    assert passes(BNB, FAILED, "No module named 'kernels'")  # a real failure to load the kernel is still shown
    assert passes(BNB, f"'{REPO}' could not verify publisher trust status")  # another message that mentions it
    assert passes("kernels._internals.hf_hub", skipped.replace(REPO, "someone/else"))  # a kernel the user asked for


def test_importing_bitsandbytes_after_peft_steer_prints_none_of_them():
    pytest.importorskip("bitsandbytes")
    # The spy tells whether bitsandbytes logged a notice at all on this machine (it does on CPUs with AVX512-BF16);
    # the tests run offline (tests/conftest.py), the offline notices are checked here.
    script = (
        "import logging\n"
        "handle = logging.Logger.handle\n"
        "def spy(self, record):\n"
        "    if 'gemm_4bit_forward' in str(record.msg):\n"
        "        print('logged')\n"
        "    return handle(self, record)\n"
        "logging.Logger.handle = spy\n"
        "import peft_steer, bitsandbytes\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    if "logged" not in done.stdout:
        pytest.skip("bitsandbytes logs no kernel notice on this machine")
    assert REPO not in done.stderr
