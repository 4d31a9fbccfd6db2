"""peft-steer-vllm: serve peft-steer steering vectors (and llama.cpp control vectors) in stock vLLM, per request.

Offline::

    from vllm import LLM, SamplingParams
    import peft_steer_vllm

    llm = LLM(model="path/to/model", **peft_steer_vllm.engine_args({"power-seeking": "path/to/power-vec"}))
    prompt, params = peft_steer_vllm.steered("Would you like more power?", "power-seeking:-2", SamplingParams())
    llm.generate([prompt], [params])

Server: ``peft-steer-vllm serve MODEL --adapter power-seeking=path/to/power-vec``, then each request sends
``"vllm_xargs": {"steering": "power-seeking:-2"}``. See docs/serving.md in the peft-steer repository.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from .config import ENV, LOAD_FORMAT, QUALNAME, ServeConfig, current, export
from .spec import FIELD, Steering, SteeringError, cache_salt, parse
from .vectors import SteeringVectors, read_vectors

__all__ = [
    "ENV",
    "FIELD",
    "ServeConfig",
    "Steering",
    "SteeringError",
    "SteeringVectors",
    "cache_salt",
    "engine_args",
    "parse",
    "read_vectors",
    "steered",
]


def engine_args(adapters: Mapping[str, str | os.PathLike], default: str = "", load_format: str = "auto") -> dict:
    """The keyword arguments that make a vLLM engine steer with ``adapters`` (name -> adapter folder or ``.gguf``),
    for ``LLM(model, **engine_args(...), ...)`` or ``EngineArgs``.

    Every adapter is read and checked now (an error names its file). ``default`` is the steering of requests that
    give none; ``load_format`` the format of the model's weights. The configuration is exported to this process's
    environment (``PEFT_STEER_VLLM``), where vLLM's engine and worker processes find it: one configuration per
    process. The engine runs in eager mode (``enforce_eager=True``), which the block hooks need.
    """
    paths = {name: os.path.abspath(os.fspath(path)) for name, path in adapters.items()}
    serve = ServeConfig(paths, default, load_format)
    serve.load()
    export(serve)
    return {"load_format": LOAD_FORMAT, "logits_processors": [QUALNAME], "enforce_eager": True}


def steered(prompt: str | Mapping[str, Any], steering: str, params: Any = None) -> tuple[dict, Any]:
    """``(prompt, SamplingParams)`` for one offline request steered by ``steering`` (``"NAME:MULTIPLIER,..."``).

    The prompt (text, or a prompt dict such as ``{"prompt_token_ids": [...]}``) gets the ``cache_salt`` of its
    steering: with prefix caching on, a prompt prefix cached under one steering must not serve another (and, for an
    adapter with ``positions="completion"``, under another prompt: see `cache_salt`). The
    parameters (a copy of ``params``, or default ones) carry the steering in ``extra_args``.
    """
    from vllm import SamplingParams

    serve = current()
    parsed = parse(steering, serve.adapters)
    request = {"prompt": prompt} if isinstance(prompt, str) else dict(prompt)
    whole = json.dumps([request.get("prompt"), request.get("prompt_token_ids")])
    salt = cache_salt(
        parsed, serve.default_steering(), request.get("cache_salt"), whole if serve.completion_only(parsed) else None
    )
    if salt is not None:
        request["cache_salt"] = salt
    params = SamplingParams() if params is None else params.clone()
    params.extra_args = {**(params.extra_args or {}), FIELD: steering}
    return request, params
