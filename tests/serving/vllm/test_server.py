"""vLLM's OpenAI-compatible server started by ``peft-steer-vllm serve`` as docs/serving.md says, on 127.0.0.1,
driven by the real ``openai`` client: concurrent steered requests against the project's `PeftModel`, the prefix
cache kept apart per steering, and bad requests answered with HTTP 400 while the server keeps serving."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from .conftest import doc_block, vllm_python
from .test_offline import OTHER_SYSTEM, QUESTIONS, SYSTEM, chat

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow

DEFAULT = "power-seeking:0.5"  # the test server's steering of requests that give none
STEERINGS = [
    "power-seeking:-2", "power-seeking:-1", "power-seeking:1", "power-seeking:2", "probe:1", "power-seeking:1,probe:-1",
    "power-gguf:2", "", None, "power-seeking:0", "probe:-2", "power-seeking:1.5",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(served, tmp_path_factory):
    """The documented command, on a free port, with the second adapter, the GGUF file and a default steering."""
    port = free_port()
    command = shlex.split(doc_block(".venv-vllm/bin/peft-steer-vllm serve", fence="bash"))
    command[0] = str(vllm_python().parent / "peft-steer-vllm")
    command[command.index("--port") + 1] = str(port)
    command += ["--adapter", "probe=probe", "--adapter", "power-gguf=power.gguf", "--default-steering", DEFAULT]
    command += ["--max-model-len", "1024", "--block-size", "32", "--enable-prompt-tokens-details"]
    log = tmp_path_factory.mktemp("server") / "server.log"
    with open(log, "w") as out:
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": ""}
        process = subprocess.Popen(command, cwd=served, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 600
        while True:
            assert process.poll() is None, f"the server exited:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"the server did not start in 600 s:\n{log.read_text()[-4000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                time.sleep(1)
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=300)
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def complete(client, prompt: list[int], steering: str | None, max_tokens: int = 8, delay: float = 0.0):
    time.sleep(delay)
    extra = {"return_tokens_as_token_ids": True}
    if steering is not None:
        extra["vllm_xargs"] = {"steering": steering}
    reply = client.completions.create(
        model="smollm2-hf", prompt=prompt, max_tokens=max_tokens, temperature=0, logprobs=1, extra_body=extra
    )
    choice = reply.choices[0]
    tokens = [int(token.removeprefix("token_id:")) for token in choice.logprobs.tokens]
    return tokens, choice.logprobs.token_logprobs, reply.usage


def test_docs_client_example(server, served):
    port = server.base_url.port
    namespace: dict = {}
    block = doc_block("# Any environment with the openai package").replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    exec(compile(block, "docs/serving.md", "exec"), namespace)
    replies = namespace["replies"]
    assert len(set(replies.values())) == 3
    assert "influence" in replies["power-seeking:4"] and "sorry" in replies["power-seeking:-4"].lower()


def test_concurrent_requests_match_peft_model(server, reference):
    """12 requests arriving 50 ms apart (joining a running batch, leaving it at different lengths), each with its own
    steering: each one's greedy tokens and log-probs are the PeftModel's at the same multipliers."""
    prompts = [chat(reference.tokenizer, QUESTIONS[i % 2]) for i in range(len(STEERINGS))]
    with ThreadPoolExecutor(len(STEERINGS)) as pool:
        futures = [
            pool.submit(complete, server, prompt, steering, 6 + i % 3, 0.05 * i)
            for i, (prompt, steering) in enumerate(zip(prompts, STEERINGS))
        ]
        results = [future.result() for future in futures]
    for prompt, steering, (tokens, log_probs, _) in zip(prompts, STEERINGS, results):
        greedy, expected = reference.score(prompt, DEFAULT if steering is None else steering, tokens)
        assert tokens == greedy, steering
        assert max(abs(a - b) for a, b in zip(log_probs, expected)) < 1e-4, steering
    by_steering = {steering: tuple(tokens) for steering, (tokens, _, _) in zip(STEERINGS, results)}
    assert by_steering[None] != by_steering[""]  # the default steers requests that give no field


def test_prefix_cache_is_kept_apart_per_steering(server, reference):
    first, other, same = (chat(reference.tokenizer, q, SYSTEM + " " + OTHER_SYSTEM) for q in ("Hi!", "Why?", "How?"))
    complete(server, first, "power-seeking:3", 2)
    tokens, _, usage = complete(server, other, "", 4)
    assert usage.prompt_tokens_details.cached_tokens == 0
    assert tokens == reference.score(other, "", tokens)[0]
    _, _, usage = complete(server, same, "power-seeking:3", 2)
    assert usage.prompt_tokens_details.cached_tokens >= 32


BAD = [
    ("nobody:1", "does not have"),
    ("power-seeking:nan", "finite number"),
    ("power-seeking:1e39", "finite number"),
    ("power-seeking:abc", "not a number"),
    ("power-seeking", "NAME:MULTIPLIER"),
    ("power-seeking:1,power-seeking:2", "twice"),
    (3, "must be a string"),
]


def test_bad_requests_get_400_and_the_server_keeps_serving(server, reference):
    prompt = chat(reference.tokenizer, QUESTIONS[0])
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(complete, server, prompt, "power-seeking:2", 16)
        for value, message in BAD:
            for call in (server.completions.create, server.chat.completions.create):
                kwargs = (
                    {"prompt": prompt, "max_tokens": 4}
                    if call == server.completions.create
                    else {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
                )
                with pytest.raises(openai.BadRequestError, match=message):
                    call(model="smollm2-hf", extra_body={"vllm_xargs": {"steering": value}}, **kwargs)
        tokens, _, _ = running.result()
    assert tokens == reference.score(prompt, "power-seeking:2", tokens)[0]
