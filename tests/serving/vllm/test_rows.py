"""`SteeringRows` follows vLLM's batch updates (removed, then added, then moved: swaps and one-way moves) as vLLM's
own logits processors do, run in vLLM's environment on updates built by hand."""

import json
import subprocess

import pytest

from .conftest import vllm_python

pytestmark = pytest.mark.slow

SCRIPT = r"""
import json, os
from types import SimpleNamespace
os.environ["PEFT_STEER_VLLM"] = json.dumps({"adapters": {"a": "/a", "b": "/b"}, "default": "", "load_format": "auto"})
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality
from peft_steer_vllm.rows import SteeringRows

def params(steering):
    return SamplingParams(extra_args={"steering": steering}) if steering is not None else SamplingParams()

def snapshot(table):
    return {index: [row.steering.canonical(), row.prompt_len] for index, row in sorted(table.rows.items())}

table = SteeringRows(SimpleNamespace(load_config=SimpleNamespace(load_format="peft_steer")), None, False)
steps = []
added = [(0, params("a:1"), [1, 2, 3], []), (1, params(None), [1], []), (2, params("b:-2"), [1, 2], [])]
table.update_state(BatchUpdate(batch_size=3, removed=[], added=added, moved=[]))
steps.append(snapshot(table))
swap = [(0, 2, MoveDirectionality.SWAP)]
table.update_state(BatchUpdate(batch_size=3, removed=[0], added=[(0, params("b:1,a:0"), [5] * 4, [])], moved=swap))
steps.append(snapshot(table))
one_way = [(2, 1, MoveDirectionality.UNIDIRECTIONAL)]
table.update_state(BatchUpdate(batch_size=2, removed=[1], added=[], moved=one_way))
steps.append(snapshot(table))
version = table.version
table.update_state(None)
steps.append(table.version == version)
errors = []
for bad in ("c:1", "a:x", 5):
    try:
        SteeringRows.validate_params(params(bad))
    except ValueError as error:
        errors.append(str(error))
print("RESULT " + json.dumps({"steps": steps, "errors": errors}))
"""


def test_rows_follow_removed_added_and_moved_requests():
    done = subprocess.run([str(vllm_python()), "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    result = json.loads(line.removeprefix("RESULT "))
    first, swapped, moved, unchanged = result["steps"]
    assert first == {"0": ["a:1.0", 3], "2": ["b:-2.0", 2]}  # the unsteered request has no row
    assert swapped == {"0": ["b:-2.0", 2], "2": ["b:1.0", 4]}  # row 0 replaced, then swapped with row 2
    assert moved == {"0": ["b:-2.0", 2], "1": ["b:1.0", 4]}  # row 2 moved into the removed row 1
    assert unchanged is True
    assert len(result["errors"]) == 3 and "does not have" in result["errors"][0]
