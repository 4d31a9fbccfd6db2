"""`SteeringMiddleware`: the OpenAI-compatible server's side of per-request steering (``--middleware``).

For ``/v1/completions`` and ``/v1/chat/completions`` it reads ``vllm_xargs.steering`` (vLLM's per-request extension
field, which reaches the workers as ``SamplingParams.extra_args``), answers a bad value with HTTP 400 naming the
problem, and sets the request's ``cache_salt`` from its steering, so that a prompt prefix cached under one steering
never serves a request with another (a client's own ``cache_salt`` is kept as its prefix). Everything else passes
through untouched; vLLM reports malformed JSON itself.
"""

from __future__ import annotations

import json
from typing import Any

from . import config
from .spec import FIELD, SteeringError, cache_salt, parse

PATHS = ("/v1/completions", "/v1/chat/completions")


def rewrite(body: bytes, serve: config.ServeConfig) -> bytes:
    """The request body to forward: unchanged, or with the ``cache_salt`` of its steering. Raises `SteeringError`."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return body
    if not isinstance(data, dict):
        return body
    extra = data.get("vllm_xargs")
    value = extra.get(FIELD) if isinstance(extra, dict) else None
    default = serve.default_steering()
    steering = default if value is None else parse(value, serve.adapters)
    client_salt = data.get("cache_salt")
    prompt = json.dumps([data.get("prompt"), data.get("messages")]) if serve.completion_only(steering) else None
    salt = cache_salt(steering, default, client_salt if isinstance(client_salt, str) else None, prompt)
    if salt is None or salt == client_salt:
        return body
    data["cache_salt"] = salt
    return json.dumps(data).encode()


class SteeringMiddleware:
    """ASGI middleware; vLLM's server adds it with ``--middleware peft_steer_vllm.middleware.SteeringMiddleware``."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in PATHS:
            await self.app(scope, receive, send)
            return
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        try:
            body = rewrite(b"".join(chunks), config.current())
        except SteeringError as error:
            await _bad_request(send, str(error))
            return
        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
        scope = {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


async def _bad_request(send: Any, message: str) -> None:
    # The shape of vLLM's own ErrorResponse, so OpenAI clients raise BadRequestError with this message.
    payload = {"error": {"message": message, "type": "BadRequestError", "param": f"vllm_xargs.{FIELD}", "code": 400}}
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 400, "headers": headers})
    await send({"type": "http.response.body", "body": body})
