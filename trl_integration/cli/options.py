"""Command-line options read from the config dataclasses, so that a default, a list of choices or a help text is
written once, on the config field (TRL style: ``field(default=..., metadata={"help": ..., "choices": ...})``), and the
``--config`` YAML file of TRL's command lines (``trl dpo --config run.yaml``): its keys are the options' own names,
and an option given on the command line overrides the file.

`add_dataclass_options` makes an option of every field as `trl.TrlParser` does (``--field_name`` and
``--field-name``); `ConfigFile` tells the options given on the command line from those left at their defaults, and
fills the latter from the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import reprlib
import typing
from collections.abc import Hashable, Iterable
from typing import Any, Literal

import yaml

from .._trl_compat import trl_parser_options
from .errors import CommandError

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


def add_dataclass_options(
    parser: argparse.ArgumentParser | Any,
    config_class: type,
    *,
    only: Iterable[str] | None = None,
    skip: Iterable[str] = (),
    aliases: dict[str, tuple[str, ...]] | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> list[str]:
    """Add an option for each field of ``config_class`` (those in ``only``, none in ``skip``), made as `trl.TrlParser`
    makes it: ``--field_name`` and ``--field-name``, with the field's type, default, choices and help; a bool field
    takes ``--name``, ``--name true|false``, and ``--no_name`` where it defaults to True. Returns the field names.

    ``aliases``: more flags for a field (a flag claimed here is taken from the field that had it); ``overrides``:
    `add_argument` keywords that differ on this command line (a default, a help text).
    """
    aliases, overrides = aliases or {}, overrides or {}
    claimed = {flag for flags in aliases.values() for flag in flags}
    hints = typing.get_type_hints(config_class)
    wanted = set(only) if only is not None else None
    names = []
    for flags, kwargs in trl_parser_options(config_class):
        name = kwargs.get("dest") or flags[0].lstrip("-")
        if name in skip or (wanted is not None and name not in wanted):
            continue
        flags = [flag for flag in flags if flag not in claimed]
        if kwargs.get("action") != "store_false":  # not the ``--no_name`` of a bool field
            flags += aliases.get(name, ())
            if hints.get(name) in (bool, bool | None) and "nargs" not in kwargs:
                kwargs.update(nargs="?", const=True)  # ``--bf16`` alone, as for a field that defaults to a bool
            kwargs.update(overrides.get(name, {}))
            names.append(name)
        if flags:
            parser.add_argument(*flags, **kwargs)
    return names


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


# ---- the --config file -------------------------------------------------------------------------------------------


def parser_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """Every option of ``parser``, those of its groups included, in the order they were added.

    argparse publishes no list of them: its private ``_actions`` (read here only) is what its own help and usage
    formatters and `trl.TrlParser` iterate, unchanged since Python 3.2. A test watches it
    (tests/trl_integration/cli/test_options.py).
    """
    return list(parser._actions)


class _Unset:
    """The default of an option, wrapped: after parsing, an option still holding one was not on the command line."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return repr(self.value)


class ConfigFile:
    """The options of one command, from its command line and a ``--config`` YAML file, as `trl.TrlParser` reads them:
    the file's keys are the options' names (``learning_rate: 1e-4``; a flag's name with ``-`` or ``_``), an ``env:``
    mapping sets environment variables, and what the command line gives overrides the file.

    Built once every option is added to ``parser``; `apply` then resolves a parsed namespace in place. ``exclusive``:
    groups of options of which one is given (``behavior`` / ``data``): one given on the command line replaces the
    file's, and the file may set one only.
    """

    def __init__(self, parser: argparse.ArgumentParser, exclusive: Iterable[tuple[str, ...]] = ()) -> None:
        # Every option, as `trl.TrlParser.set_defaults_with_config` reads them.
        self.actions = [
            action
            for action in parser_actions(parser)
            if action.dest not in (argparse.SUPPRESS, "help", "config") and action.default is not argparse.SUPPRESS
        ]
        self.keys: dict[str, argparse.Action] = {}
        for action in self.actions:
            self.keys.setdefault(action.dest, action)
        for action in self.actions:
            for flag in action.option_strings:
                if flag.startswith("--"):
                    self.keys.setdefault(flag[2:].replace("-", "_"), action)
        for action in self.actions:
            action.default = _Unset(action.default)
        self.exclusive = [tuple(group) for group in exclusive]

    def apply(self, args: argparse.Namespace, path: str | None) -> None:
        """Fill each option of ``args`` not given on the command line from the file at ``path``, or its default."""
        given = {action.dest for action in self.actions if not isinstance(getattr(args, action.dest), _Unset)}
        values = self.read(path) if path is not None else {}
        for group in self.exclusive:
            in_file = [name for name in group if name in values]
            if any(name in given for name in group):
                for name in in_file:
                    del values[name]
            elif len(in_file) > 1:
                raise CommandError(f"--config {path}: {' and '.join(in_file)}: give one of them.")
        for action in self.actions:
            value = getattr(args, action.dest)
            if isinstance(value, _Unset):
                setattr(
                    args, action.dest, values[action.dest] if action.dest in values else _default(action, value.value)
                )

    def read(self, path: str) -> dict[str, Any]:
        """The values of the file at ``path`` by option name, checked and converted as on the command line; sets the
        environment variables of its ``env:`` mapping."""
        where = f"--config {path}"
        try:
            with open(path, encoding="utf-8") as file:
                text = file.read()
        except FileNotFoundError:
            raise CommandError(f"{where}: no such file.") from None
        except (OSError, UnicodeDecodeError) as error:
            raise CommandError(f"{where}: cannot be read ({error}).") from None
        try:
            content = yaml.safe_load(text)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            line = f", line {mark.line + 1}" if mark is not None else ""
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise CommandError(f"{where}{line}: not valid YAML ({problem}).") from None
        content = {} if content is None else content
        if not isinstance(content, dict):
            raise CommandError(
                f"{where}: expected a mapping of option names to values, got a {type(content).__name__}."
            )
        environment = content.pop("env", None) or {}
        if not isinstance(environment, dict):
            raise CommandError(f"{where}: env: expected a mapping of environment variables to values.")
        values: dict[str, Any] = {}
        keys: dict[str, str] = {}
        for key, value in content.items():
            action = self.keys.get(str(key).replace("-", "_"))
            if action is None:
                close = difflib.get_close_matches(str(key), list(self.keys), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise CommandError(
                    f"{where}: unknown key {key!r}{hint}. The keys are the names of the options that "
                    "'peft-steer train --help' lists."
                )
            if action.dest in keys:
                raise CommandError(f"{where}: {keys[action.dest]} and {key} set the same option: keep one.")
            keys[action.dest] = str(key)
            converted = _converted(action, value, f"{where}: {key}")
            if converted is not _LEFT:
                values[action.dest] = converted
        for name, value in environment.items():
            os.environ[str(name)] = str(value)
        return values


_LEFT = object()  # a flag set to false in the file: the option keeps its default


def _converted(action: argparse.Action, value: Any, where: str) -> Any:
    """``value`` of the file for ``action``, converted and checked as the same text on the command line would be."""
    if action.nargs == 0:  # a flag: --no-chat-template, --no_precompute_ref_log_probs
        if not isinstance(value, bool):
            raise CommandError(f"{where}: expected true or false, got {_quoted(value)}.")
        return action.const if value else _LEFT
    if value is None:
        return None
    if action.nargs in ("+", "*"):
        return [_one_value(action, item, where) for item in (value if isinstance(value, list) else [value])]
    return _one_value(action, value, where)


def _one_value(action: argparse.Action, value: Any, where: str) -> Any:
    convert = action.type
    if convert in (None, str) and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(
            value
        )  # a text option (output_dir: 123): the text the number was written as, as on the command line
    if isinstance(value, str) and callable(convert):
        try:
            value = convert(value)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            raise CommandError(
                f"{where}: {_quoted(value)} is not a {getattr(convert, '__name__', 'valid value')}."
            ) from None
    elif convert in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CommandError(f"{where}: {_quoted(value)} is not a {convert.__name__}.")
        if convert is int and not float(value).is_integer():
            raise CommandError(f"{where}: {_quoted(value)} is not a whole number.")
        value = convert(value)
    if action.choices is not None and isinstance(value, Hashable) and value not in action.choices:
        raise CommandError(f"{where}: {_quoted(value)} is not one of {', '.join(map(str, action.choices))}.")
    return value


def _quoted(value: Any) -> str:
    """``repr(value)`` cut short: a YAML alias bomb is a small file whose value is billions of nested items."""
    return reprlib.repr(value)


def _default(action: argparse.Action, default: Any) -> Any:
    """The default of ``action``, converted by its type where it is text, as argparse converts it."""
    if isinstance(default, str) and callable(action.type):
        return action.type(default)
    return default
