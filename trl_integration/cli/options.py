"""Command-line options read from the config dataclasses, so that a default, a list of choices or a help text is
written once, on the config field (TRL style: ``field(default=..., metadata={"help": ..., "choices": ...})``)."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Literal

_PLAIN_TYPES = (int, float, str)


def add_field_option(
    parser: argparse.ArgumentParser | Any, flag: str, config_class: type, field_name: str, **overrides: Any
) -> argparse.Action:
    """Add ``flag`` for the field ``field_name`` of the dataclass ``config_class``, stored under the field's name.

    Its type, default, choices and help come from the field (choices from ``metadata["choices"]`` or a `Literal`
    type); ``overrides`` are `add_argument` keywords that differ on the command line (a flag action, a narrower type).
    """
    field = {field.name: field for field in dataclasses.fields(config_class)}[field_name]
    kwargs: dict[str, Any] = {"dest": field_name, "default": field.default, "help": field.metadata.get("help")}
    if "action" not in overrides:
        hint = typing.get_type_hints(config_class)[field_name]
        choices = field.metadata.get("choices") or _literal_values(hint)
        if choices:
            kwargs["choices"] = list(choices)
        else:
            kwargs["metavar"] = flag.lstrip("-").upper().replace("-", "_")
        plain = _plain_type(hint)
        if plain is not None:
            kwargs["type"] = plain
    kwargs.update(overrides)
    return parser.add_argument(flag, **kwargs)


def field_default(config_class: type, field_name: str) -> Any:
    """The default of a field of a dataclass."""
    return {field.name: field.default for field in dataclasses.fields(config_class)}[field_name]


def _literal_values(hint: Any) -> tuple[Any, ...]:
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else ()


def _plain_type(hint: Any) -> type | None:
    """``int`` for ``int`` and ``int | None``, and so on; ``None`` for any other type."""
    if hint in _PLAIN_TYPES:
        return hint
    plain = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return plain[0] if len(plain) == 1 and plain[0] in _PLAIN_TYPES else None
