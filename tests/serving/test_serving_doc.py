"""docs/serving.md's transformers example runs here (its vLLM examples run in tests/serving/vllm)."""

import torch

import peft_steer
from tests.serving.vllm.conftest import doc_block


def test_transformers_per_row_example_runs_and_steers():
    namespace: dict = {}
    exec(compile(doc_block("# In peft-steer's environment: a tiny"), "docs/serving.md", "exec"), namespace)
    model, inputs, rows = namespace["model"], namespace["inputs"], namespace["rows"]
    with peft_steer.steering(model, multiplier=0.0):
        unsteered = model.generate(input_ids=inputs[2:], max_new_tokens=4, do_sample=False)
    assert not torch.equal(rows[2:], unsteered)  # the example's equality is not that of an unsteered model
