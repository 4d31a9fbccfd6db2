"""Another architecture than SmolLM2's Llama: a tiny random GPT-2 (blocks in ``transformer.h``, each returning a
tensor rather than vLLM's ``(hidden, residual)`` pair), steered per request in vLLM as by the `PeftModel`."""

from __future__ import annotations

import pytest
import torch

from peft_steer.interop import write_adapter
from tests.conftest import make_model, make_tokenizer

from .conftest import Reference, ask, run_engine

pytestmark = pytest.mark.slow

STEERINGS = ["", "all:1", "all:-1", "late:1", "all:0.5,late:-1"]
PROMPTS = [[5, 17, 33, 60, 101, 7], [9, 250, 3, 44]]


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2")
    model = make_model("gpt2", hidden=128, layers=4)  # head size 32, which vLLM's CPU attention supports
    model.save_pretrained(folder / "model")
    make_tokenizer().save_pretrained(folder / "model")
    generator = torch.Generator().manual_seed(1)
    vectors = {block: 3 * torch.randn(128, generator=generator) for block in (1, 2, 3)}
    write_adapter(folder / "all", {1: vectors[1], 3: vectors[3]}, model)
    write_adapter(folder / "late", {2: vectors[2]}, model, positions="completion")
    return folder, model


def test_gpt2_matches_peft_model(gpt2, tmp_path):
    folder, model = gpt2
    job = {
        "engine": {"model": str(folder / "model"), "dtype": "float32", "max_model_len": 256},
        "engine_options": {},
        "extra_adapters": {"all": str(folder / "all"), "late": str(folder / "late")},
        "batches": [[ask(prompt, steering, 6) for prompt in PROMPTS for steering in STEERINGS]],
    }
    runs = run_engine(job, folder, tmp_path)["batches"][0]
    reference = Reference(model, None, {"all": folder / "all", "late": folder / "late"})
    requests = [(prompt, steering) for prompt in PROMPTS for steering in STEERINGS]
    for (prompt, steering), run in zip(requests, runs):
        greedy, log_probs = reference.score(prompt, steering, run["tokens"])
        assert run["tokens"] == greedy, steering
        assert max(abs(a - b) for a, b in zip(run["logprobs"], log_probs)) < 1e-4, steering
    moved = {steering: run["logprobs"] for (_, steering), run in zip(requests[: len(STEERINGS)], runs)}
    assert all(moved[s] != moved[""] for s in STEERINGS[1:])  # every steering moves the log-probs
