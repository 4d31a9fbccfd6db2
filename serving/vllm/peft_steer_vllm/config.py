"""What a server steers with: the adapters it may use (by name) and the steering of requests that name none.

vLLM runs a front end, an engine core and one worker per GPU, each a process of its own, and reads its plugins in
each. The one setting they all need is passed the way vLLM passes its own (``VLLM_*``): an environment variable that
child processes inherit, here ``PEFT_STEER_VLLM`` holding this configuration as JSON. `engine_args` and
``peft-steer-vllm serve`` set it; a process reads it once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache

from .spec import NAME_PATTERN, Steering, parse
from .vectors import CONFIG_NAME, SteeringVectors, read_vectors

ENV = "PEFT_STEER_VLLM"
LOAD_FORMAT = "peft_steer"  # the load format of `loader.SteeringModelLoader`, which installs the hooks
QUALNAME = "peft_steer_vllm.rows:SteeringRows"  # how vLLM's logits_processors option names the row table
MIDDLEWARE = "peft_steer_vllm.middleware.SteeringMiddleware"  # how vLLM's --middleware option names it


@dataclass(frozen=True)
class ServeConfig:
    """The steering a vLLM engine serves.

    Attributes:
        adapters: Name -> path of a peft-steer adapter folder or a llama.cpp ``.gguf`` control vector; a request
            steers with ``"NAME:MULTIPLIER"``. Names are letters, digits, ``_``, ``.`` and ``-``.
        default: The steering of requests that give none (``""``: unsteered), in the same form.
        load_format: vLLM's load format for the model's weights (``"auto"``, ``"safetensors"``, ...); the engine's
            own ``load_format`` is ``peft_steer``, the loader that adds the steering hooks.
    """

    adapters: Mapping[str, str] = field(default_factory=dict)
    default: str = ""
    load_format: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.adapters, Mapping):
            raise ValueError(f"{ENV}: 'adapters' must map names to paths, got {type(self.adapters).__name__}.")
        for name, path in self.adapters.items():
            if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
                raise ValueError(
                    f"adapter name {name!r}: use letters, digits, '_', '.' and '-' only (it appears in "
                    "'NAME:MULTIPLIER')."
                )
            if not isinstance(path, str) or not path:
                raise ValueError(f"adapter {name!r}: its path must be a non-empty string, got {path!r}.")
        if self.load_format == LOAD_FORMAT:
            raise ValueError(
                f"load_format {LOAD_FORMAT!r} is the plugin's own: name the format of the model's weights."
            )
        self.default_steering()  # a default naming an unknown adapter is refused at start, not per request

    def default_steering(self) -> Steering:
        try:
            return parse(self.default, self.adapters)
        except ValueError as error:
            raise ValueError(f"the default steering {self.default!r}: {error}") from None

    def to_json(self) -> str:
        return json.dumps({"adapters": dict(self.adapters), "default": self.default, "load_format": self.load_format})

    @classmethod
    def from_json(cls, text: str) -> ServeConfig:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{ENV} is not valid JSON ({error.msg}).") from None
        if not isinstance(raw, dict) or set(raw) - {"adapters", "default", "load_format"}:
            raise ValueError(
                f"{ENV} must be a JSON object with 'adapters', 'default' and 'load_format', got {text[:80]!r}."
            )
        return cls(raw.get("adapters", {}), raw.get("default", ""), raw.get("load_format", "auto"))

    def completion_only(self, steering: Steering) -> bool:
        """Whether ``steering`` names an adapter with ``positions="completion"``."""
        return any(_positions(self.adapters[name]) == "completion" for name, _ in steering.terms)

    def load(self) -> dict[str, SteeringVectors]:
        """Every adapter's vectors, read and checked (each problem names its file)."""
        return {name: read_vectors(path) for name, path in self.adapters.items()}


@lru_cache(maxsize=256)
def _positions(path: str) -> str:
    """An adapter's ``positions`` (``"all"`` for a ``.gguf`` file); the server checked the file at start."""
    try:
        with open(os.path.join(path, CONFIG_NAME), encoding="utf-8") as file:
            return json.load(file).get("positions", "all")
    except (OSError, ValueError, AttributeError):
        return "all"


@lru_cache(maxsize=1)
def _from_env(text: str) -> ServeConfig:
    return ServeConfig.from_json(text)


def current() -> ServeConfig:
    """This process's configuration (empty, so nothing is steered, when ``PEFT_STEER_VLLM`` is unset)."""
    text = os.environ.get(ENV)
    return _from_env(text) if text else ServeConfig()


def export(config: ServeConfig) -> None:
    """Make ``config`` this process's and its future children's (vLLM's engine and worker processes), and pick
    vLLM's V1 model runner unless the user chose one: the V2 runner (the default on some CUDA builds) runs no V1
    logits processor."""
    os.environ[ENV] = config.to_json()
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
