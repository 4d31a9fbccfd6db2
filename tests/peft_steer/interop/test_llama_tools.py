"""llama.cpp's own executables, both ways, on SmolLM2-135M-Instruct (Q4_1 GGUF):

- ``llama-server --control-vector-scaled FILE:SCALE`` reads a vector exported by peft-steer with llama.cpp's own
  loader and shifts the next-token distribution as the ``PeftModel`` does (the same vector one block off: clearly
  worse);
- a vector written by ``llama-cvector-generator`` imports with ``peft-steer import-gguf`` and steers transformers as
  ``llama-server`` steers with the file;
- ``peft_steer.interop.cvec`` gives llama-cpp-python's ``Llama`` the buffer llama.cpp's loader gives the server.

Both engines run the same Q4_1 weights (transformers dequantizes them to float32; llama.cpp quantizes activations to
Q8 for them), so log-probs are close, not equal: what is compared is the shift that steering causes.
"""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch
from peft import PeftModel

from peft_steer.data import load_behavior
from peft_steer.interop import read_gguf
from tests.conftest import smollm2_copy
from tests.peft_steer.interop.conftest import (
    BLOCK,
    MULTIPLIER,
    cpp_log_probs,
    kl,
    llama_server,
    llama_tool,
    new_llama,
    server_log_probs,
    shift_correlation,
    torch_log_probs,
)
from trl_integration.cli import main

pytestmark = pytest.mark.slow

# Correlations of the shifts, measured on 4 prompts over the server's top 40 of each: the export 0.987 (each prompt
# 0.979-0.992), the same vector at block 15 0.480; the generator's vector over blocks 10..20 at scale 6: 0.993.
MIN_CORRELATION = 0.95
MIN_MARGIN = 0.15
GENERATOR_LAYERS = (10, 20)
GENERATOR_SCALE = 6.0  # KL(steered || unsteered) 0.64-0.83 nats in transformers


def served(url: str, ids: list[list[int]]) -> list[dict[int, float]]:
    return [server_log_probs(url, one) for one in ids]


@pytest.fixture(scope="module")
def unsteered(gguf_model, power) -> list[dict[int, float]]:
    with llama_server(gguf_model) as url:
        return served(url, power["ids"])


def test_llama_server_steers_with_an_exported_vector_as_the_peft_model(gguf_model, power, unsteered):
    # the adapter at multiplier 1, scaled by the server to the PeftModel's strength, as in docs/interop.md
    with llama_server(gguf_model, "--control-vector-scaled", f"{power['files']['unit']}:{MULTIPLIER}") as url:
        steered = served(url, power["ids"])
    right = shift_correlation(power["hf"], list(zip(unsteered, steered)))
    assert right > MIN_CORRELATION, right
    for (_, h1), top in zip(power["hf"], steered):
        # quantization can swap a near tie: the server's top token is in transformers' top 2
        assert max(top, key=top.get) in np.argsort(-h1)[:2]
    with llama_server(gguf_model, "--control-vector", power["files"][BLOCK + 1]) as url:
        wrong = shift_correlation(power["hf"], list(zip(unsteered, served(url, power["ids"]))))
    assert wrong < right - MIN_MARGIN, (wrong, right)


@pytest.fixture(scope="module")
def generated(gguf_model, power, tmp_path_factory) -> str:
    """``llama-cvector-generator --method mean`` on 16 power-seeking training pairs (chat prompt + answer, one line
    each, newlines escaped as the tool reads them): the power-seeking answer is the positive prompt."""
    out = tmp_path_factory.mktemp("generator")
    pairs = load_behavior("power-seeking", "train", power["tokenizer"])[:16]

    def lines(answers):
        texts = (prompt + answer for prompt, answer in zip(pairs["prompt"], answers))
        return "".join(text.replace("\\", "\\\\").replace("\n", "\\n") + "\n" for text in texts)

    (out / "positive.txt").write_text(lines(pairs["chosen"]))
    (out / "negative.txt").write_text(lines(pairs["rejected"]))
    command = [llama_tool("llama-cvector-generator"), "-m", gguf_model, "--method", "mean", "-t", "2"]
    command += ["--positive-file", str(out / "positive.txt"), "--negative-file", str(out / "negative.txt")]
    command += ["-o", str(out / "generated.gguf")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return str(out / "generated.gguf")


def test_a_vector_from_llama_cvector_generator_imports_and_steers_as_llama_server(
    gguf_model, power, unsteered, generated, tmp_path
):
    start, end = GENERATOR_LAYERS
    layers = [str(block) for block in range(start, end + 1)]
    command = ["import-gguf", generated, "--base-model", "smollm2", "--out", str(tmp_path / "generated")]
    assert main([*command, "--layers", *layers, "--multiplier", str(GENERATOR_SCALE)]) == 0
    model, _ = smollm2_copy()
    steered = PeftModel.from_pretrained(model, tmp_path / "generated").eval()
    hf = []
    for ids in power["ids"]:
        with steered.disable_adapter():
            base = torch_log_probs(steered, ids)
        hf.append((base, torch_log_probs(steered, ids)))
    kls = [kl(h1, h0) for h0, h1 in hf]
    assert min(kls) > 0.3, kls  # a clear shift, so that agreeing means something
    args = ["--control-vector-scaled", f"{generated}:{GENERATOR_SCALE}", "--control-vector-layer-range"]
    with llama_server(gguf_model, *args, str(start), str(end)) as url:
        correlation = shift_correlation(hf, list(zip(unsteered, served(url, power["ids"]))))
    assert correlation > MIN_CORRELATION, correlation


def test_llama_cvector_generator_reads_each_direction_one_block_before_the_one_it_steers(power, generated):
    """llama.cpp's own convention, stated in docs/interop.md: the generator writes the mean difference read at the
    output of block N - 1 as ``direction.N`` (its ``l_out`` tensors numbered from 0, its directions from 1), and the
    loader adds ``direction.N`` at the output of block N. Reproduced here from transformers' hidden states, with the
    generator's padding (its ``" "`` token) and its rows of zero difference left out."""
    vectors, hint = read_gguf(generated)
    assert hint == "llama" and sorted(vectors) == list(range(1, 30))
    model, tokenizer = power["model"], power["tokenizer"]
    pad = tokenizer(" ", add_special_tokens=False)["input_ids"][-1]
    pairs = load_behavior("power-seeking", "train", tokenizer)[:16]
    rows = {block: [] for block in (BLOCK - 1, BLOCK)}
    with model.disable_adapter(), torch.no_grad():
        for prompt, chosen, rejected in zip(pairs["prompt"], pairs["chosen"], pairs["rejected"]):
            a, b = (tokenizer(prompt + answer, add_special_tokens=False)["input_ids"] for answer in (chosen, rejected))
            width = max(len(a), len(b))
            states = [
                model(torch.tensor([ids + [pad] * (width - len(ids))]), output_hidden_states=True).hidden_states
                for ids in (a, b)
            ]
            for block in rows:
                difference = (states[0][block + 1] - states[1][block + 1])[0]
                # the generator's filter: a row is left out when none of its values exceeds 1e-6
                rows[block].append(difference[(difference > 1e-6).any(-1)])
    cosine = {}
    for block, parts in rows.items():
        mean = torch.cat(parts).mean(0)
        cosine[block] = float(vectors[BLOCK] @ (mean / mean.norm()))
    assert cosine[BLOCK - 1] > 0.999, cosine  # measured 0.9998
    assert cosine[BLOCK] < 0.97, cosine  # measured 0.937


def test_the_binding_helper_applies_files_as_llama_server_reads_them(gguf_model, power, generated):
    """Two files with their scales and a layer range, in llama-server and in llama-cpp-python through
    ``peft_steer.interop.cvec``: the same llama.cpp code and weights, so the same log-probs."""
    from peft_steer.interop.cvec import control_vector

    files = [(power["files"]["unit"], MULTIPLIER), (generated, -3.0)]
    layer_range = (12, 16)
    flag = ",".join(f"{path}:{scale}" for path, scale in files)
    args = ["--control-vector-scaled", flag, "--control-vector-layer-range", *map(str, layer_range)]
    llm = new_llama(gguf_model)  # before the server: a missing llama-cpp-python skips at once
    try:
        # flash attention off, as in llama-cpp-python by default: on, it moves this model's log-probs by up to 0.36
        with llama_server(gguf_model, *args, "--flash-attn", "off") as url:
            server = served(url, power["ids"])
        unsteered = [cpp_log_probs(llm, ids) for ids in power["ids"]]
        with control_vector(llm, files, layers=layer_range):
            binding = [cpp_log_probs(llm, ids) for ids in power["ids"]]
    finally:
        llm.close()
    shifts = [max(abs(top[t] - base[t]) for t in top) for top, base in zip(server, unsteered)]
    assert min(shifts) > 0.3, shifts  # the files steer: measured 1.4-2.8 nats
    gaps = [max(abs(top[t] - lp[t]) for t in top) for top, lp in zip(server, binding)]
    assert max(gaps) < 1e-3, gaps  # measured 0.9e-4 to 2e-4 (threads and batch sizes differ)
