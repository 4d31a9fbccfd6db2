"""The server's middleware, as ASGI: bad steering answered with 400, the cache salt set, everything else untouched."""

import asyncio
import json

import pytest
import torch

from peft_steer_vllm.config import ServeConfig
from peft_steer_vllm.middleware import SteeringMiddleware


class Downstream:
    """vLLM's app: records what reaches it."""

    def __init__(self):
        self.body, self.headers = None, None

    async def __call__(self, scope, receive, send):
        message = await receive()
        self.body, self.headers = message["body"], dict(scope["headers"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def call(body: bytes, path="/v1/completions", method="POST", split=False):
    """Run the middleware on one request (its body in two messages if ``split``); return the app and what was sent."""
    app = Downstream()
    parts = [body[: len(body) // 2], body[len(body) // 2 :]] if split else [body]
    messages = [{"type": "http.request", "body": part, "more_body": i < len(parts) - 1} for i, part in enumerate(parts)]
    sent = []

    async def receive():
        return messages.pop(0)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": [(b"content-length", str(len(body)).encode())]}
    asyncio.run(SteeringMiddleware(app)(scope, receive, send))
    return app, sent


@pytest.fixture(autouse=True)
def adapters(monkeypatch):
    monkeypatch.setenv("PEFT_STEER_VLLM", ServeConfig({"power-seeking": "p", "honest": "h"}).to_json())


def request(steering=None, **fields) -> bytes:
    body = {"model": "m", "prompt": "Hi", **fields}
    if steering is not None:
        body["vllm_xargs"] = {"steering": steering, "other": 1}
    return json.dumps(body).encode()


def test_steered_requests_get_the_salt_of_their_steering():
    app, sent = call(request("power-seeking:2"), split=True)
    forwarded = json.loads(app.body)
    assert forwarded["cache_salt"].startswith("peft-steer:") and forwarded["vllm_xargs"]["other"] == 1
    assert int(app.headers[b"content-length"]) == len(app.body)
    assert sent[0]["status"] == 200
    again, _ = call(request("power-seeking:2.0", max_tokens=3), path="/v1/chat/completions")
    assert json.loads(again.body)["cache_salt"] == forwarded["cache_salt"]
    other, _ = call(request("power-seeking:-2"))
    assert json.loads(other.body)["cache_salt"] != forwarded["cache_salt"]
    client, _ = call(request("honest:1", cache_salt="mine"))
    assert json.loads(client.body)["cache_salt"].startswith("mine|peft-steer:")


@pytest.mark.parametrize("body", [request(), request(""), request("honest:0"), b"{not json", b"[1]"])
def test_unsteered_and_unreadable_requests_pass_through_unchanged(body):
    app, sent = call(body)
    assert app.body == body and sent[0]["status"] == 200


def test_other_paths_and_methods_are_not_read():
    app, _ = call(request("nobody:1"), path="/v1/models")
    assert app.body == request("nobody:1")
    app, _ = call(request("nobody:1"), method="GET")
    assert app.body == request("nobody:1")


@pytest.mark.parametrize("steering", ["nobody:1", "honest:nan", "honest", 7])
def test_bad_steering_is_a_400_naming_the_problem(steering):
    app, sent = call(request(steering))
    assert app.body is None  # vLLM never sees it
    assert sent[0]["status"] == 400
    error = json.loads(sent[1]["body"])["error"]
    assert error["code"] == 400 and error["param"] == "vllm_xargs.steering"
    assert "steering" in error["message"]


def test_the_default_steering_salts_nothing_and_explicit_unsteered_is_apart(monkeypatch):
    monkeypatch.setenv("PEFT_STEER_VLLM", ServeConfig({"power-seeking": "p"}, default="power-seeking:1").to_json())
    app, _ = call(request())
    assert "cache_salt" not in json.loads(app.body)
    app, _ = call(request("power-seeking:1"))
    assert "cache_salt" not in json.loads(app.body)
    app, _ = call(request(""))
    assert json.loads(app.body)["cache_salt"].startswith("peft-steer:")


def test_completion_only_adapters_salt_by_the_whole_prompt(tmp_path, monkeypatch):
    """Their answer's KV is steered but the same tokens in a longer prompt are not: no reuse across prompts."""
    from peft_steer.interop import write_adapter
    from tests.conftest import make_model

    model = make_model("llama")
    write_adapter(tmp_path / "late", {1: torch.ones(32)}, model, positions="completion")
    write_adapter(tmp_path / "all", {1: torch.ones(32)}, model)
    adapters = {"late": str(tmp_path / "late"), "all": str(tmp_path / "all")}
    monkeypatch.setenv("PEFT_STEER_VLLM", ServeConfig(adapters).to_json())

    def salt(steering, prompt):
        app, _ = call(json.dumps({"prompt": prompt, "vllm_xargs": {"steering": steering}}).encode())
        return json.loads(app.body)["cache_salt"]

    assert salt("all:1", "Hi") == salt("all:1", "Hi, and more")
    assert salt("late:1", "Hi") != salt("late:1", "Hi, and more")
    assert salt("late:1", "Hi") == salt("late:1", "Hi") != salt("all:1", "Hi")
    assert salt("all:1,late:1", "Hi") != salt("all:1,late:1", "Hi, and more")
