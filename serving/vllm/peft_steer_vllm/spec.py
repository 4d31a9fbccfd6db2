"""The per-request steering field: ``"NAME:MULTIPLIER[,NAME:MULTIPLIER...]"``, parsed, checked and made canonical.

The form is llama.cpp's ``--control-vector-scaled FILE:SCALE``: each name is an adapter the server was started with,
its multiplier the strength (the sign picks the direction), and several names add their vectors, each times its own
multiplier. ``""`` asks for no steering explicitly (useful when the server has a default).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Collection
from dataclasses import dataclass

FIELD = "steering"  # the key in SamplingParams.extra_args, and in an HTTP request's vllm_xargs
# The vectors are float32: a strength beyond this makes ``m * v`` inf.
FLOAT32_MAX = 3.4028234663852886e38
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.\-]+")
_QUOTE_LIMIT = 80  # an error message quotes at most this much of what the client sent


class SteeringError(ValueError):
    """A steering field that cannot be used; the message names the part to fix. vLLM answers it with HTTP 400."""


@dataclass(frozen=True)
class Steering:
    """A parsed steering field: ``(adapter name, multiplier)`` pairs, sorted by name, zero multipliers dropped."""

    terms: tuple[tuple[str, float], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.terms)

    def canonical(self) -> str:
        """The one text of this steering: the same for ``"a:1,b:-2"``, ``"b:-2.0, a:1"`` and ``"a:1,b:-2,c:0"``."""
        return ",".join(f"{name}:{multiplier!r}" for name, multiplier in self.terms)


def _quote(text: str) -> str:
    return repr(text if len(text) <= _QUOTE_LIMIT else text[:_QUOTE_LIMIT] + "...")


def parse(value: object, adapters: Collection[str]) -> Steering:
    """Parse a steering field against the names of the adapters the server has.

    Raises `SteeringError` for a value that is not text, an item that is not ``NAME:MULTIPLIER``, a name the server
    does not have (the message lists the ones it has), a name given twice, and a multiplier that is not a finite
    number within float32's range.
    """
    if not isinstance(value, str):
        raise SteeringError(
            f"'{FIELD}' must be a string like 'NAME:MULTIPLIER[,NAME:MULTIPLIER...]', got {type(value).__name__} "
            f"{_quote(str(value))}."
        )
    if not value.strip():
        return Steering()
    terms: dict[str, float] = {}
    for item in value.split(","):
        name, sep, number = (part.strip() for part in item.partition(":"))
        if not sep or not name or not number:
            raise SteeringError(
                f"'{FIELD}' item {_quote(item.strip())} is not NAME:MULTIPLIER (for example 'power-seeking:-2')."
            )
        if name not in adapters:
            known = ", ".join(sorted(adapters)) or "none"
            raise SteeringError(
                f"'{FIELD}' names adapter {_quote(name)}, which this server does not have (it has: {known})."
            )
        if name in terms:
            raise SteeringError(f"'{FIELD}' names adapter {_quote(name)} twice: give each adapter once.")
        terms[name] = _multiplier(name, number)
    return Steering(tuple(sorted((name, m) for name, m in terms.items() if m != 0.0)))


def _multiplier(name: str, text: str) -> float:
    try:
        multiplier = float(text)
    except ValueError:
        raise SteeringError(f"'{FIELD}': the multiplier of {_quote(name)} is {_quote(text)}, not a number.") from None
    if not math.isfinite(multiplier) or abs(multiplier) > FLOAT32_MAX:
        raise SteeringError(
            f"'{FIELD}': the multiplier of {_quote(name)} is {_quote(text)}; it must be a finite number within "
            f"float32's range (the vectors' dtype)."
        )
    return multiplier + 0.0  # -0.0 -> 0.0


def cache_salt(
    steering: Steering, default: Steering, client_salt: str | None = None, prompt: str | None = None
) -> str | None:
    """The prefix-cache salt of a request steered by ``steering`` on a server whose unsalted requests get
    ``default``; ``client_salt`` is the request's own ``cache_salt``, kept as its prefix.

    vLLM reuses the KV cache of a prompt prefix only between requests of the same salt, and the KV of a steered
    prefix differs from an unsteered one: each steering gets its own salt, and the default steering none, so the
    server's ordinary requests still share their cache with each other (and with requests that name the default).
    ``prompt`` (the whole prompt, as text) is given when the steering has an adapter with ``positions="completion"``:
    the KV of such a request's answer is steered, but the same tokens in a longer prompt (the next turn of a chat)
    are not, so the request shares its cache only with requests of the same prompt.
    """
    if steering == default and prompt is None:
        return client_salt
    text = steering.canonical() if prompt is None else f"{steering.canonical()}\0{prompt}"
    own = f"peft-steer:{hashlib.sha256(text.encode()).hexdigest()[:32]}"
    return f"{client_salt}|{own}" if client_salt else own
