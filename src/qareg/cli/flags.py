"""Command-line flags generated one way from config dataclasses, and config files.

`field_flags(cls)` describes one flag per field of a frozen config dataclass (`lr` ->
`--lr`, with the field's comment as help); `add_flags` puts them on a parser and
`given_values` reads back only the flags given, so that defaults < config file < flags.
`read_config_file` loads a YAML file of sections and checks its shape; every error names
the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import yaml

from qareg.config import from_dict, load_yaml
from qareg.errors import ConfigError


@dataclass(frozen=True)
class Flag:
    """One flag: the config field it sets, the field's type, its help text."""

    field: str
    hint: Any  # the field's type; None: any YAML value (fields that differ between configs)
    help: str
    default: Any = dataclasses.MISSING

    @property
    def option(self) -> str:
        return flag_name(self.field)


def flag_name(field: str) -> str:
    """The command-line flag of a config field: `batch_size` -> `--batch-size`."""
    return "--" + field.replace("_", "-")


def field_comments(cls: type) -> dict[str, str]:
    """The comment on (or the comment lines just above) each field of `cls`'s source."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):  # defined where the source cannot be read
        return {}
    comments, above = {}, []
    for line in lines:
        match = re.match(r"\s+(\w+)\s*:[^#]*?(?:#\s*(.*))?$", line)
        if line.strip().startswith("#"):
            above.append(line.strip().lstrip("#").strip())
            continue
        if match:
            comments[match[1]] = " ".join([*above, match[2] or ""]).strip()
        above = []
    return comments


def field_flags(cls: type, skip: Iterable[str] = ()) -> list[Flag]:
    """One Flag per field of the dataclass `cls`, but those in `skip`."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    flags = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else dataclasses.MISSING
        shown = "" if default is dataclasses.MISSING else f" (default: {_show(default)})"
        flags.append(Flag(f.name, hints[f.name], comments.get(f.name, "") + shown, default))
    return flags


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return " ".join(map(str, value)) or "none"
    return repr(value) if isinstance(value, str) else str(value)


def _base(hint: Any) -> Any:
    """`X` for `X | None` and `Optional[X]`; the hint otherwise."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else None
    return hint


def yaml_value(text: str) -> Any:
    """A flag's text read as YAML (so `1e-3` is a number and `true` a bool)."""
    return yaml.safe_load(text)


def add_flags(group: argparse._ActionsContainer, flags: Iterable[Flag], dest_prefix: str = ""
              ) -> None:
    """Add each flag to `group`; its value lands in `dest_prefix + field`, None when not
    given (so that only flags given override)."""
    for flag in flags:
        hint, dest = _base(flag.hint), dest_prefix + flag.field
        common = {"dest": dest, "default": None, "help": flag.help.replace("%", "%%")}
        origin = typing.get_origin(hint)
        if hint is bool:
            group.add_argument(flag.option, action=argparse.BooleanOptionalAction, **common)
        elif origin is tuple:
            item = typing.get_args(hint)[0]
            nargs = "*" if flag.default in ((), dataclasses.MISSING) else "+"
            numbers = set(typing.get_args(item)) == {int, float}  # e.g. bits or budgets
            group.add_argument(flag.option, nargs=nargs, type=item if item in (int, float) else
                               yaml_value if numbers else str, metavar=flag.field.upper(),
                               **common)
        elif origin is dict:
            group.add_argument(flag.option, nargs="*", metavar="PATTERN=VALUE", **common)
        elif hint in (int, float, str):
            group.add_argument(flag.option, type=hint, metavar=flag.field.upper(), **common)
        else:  # a type argparse cannot parse: YAML text
            group.add_argument(flag.option, type=yaml_value, metavar=flag.field.upper(),
                               **common)


def pairs(values: list[str], option: str) -> dict[str, float]:
    """PATTERN=NUMBER items as a mapping."""
    out = {}
    for item in values:
        pattern, sep, number = item.rpartition("=")
        try:
            out[pattern] = float(number)
        except ValueError:
            sep = ""
        if not sep or not pattern:
            raise ConfigError(f"{option} takes PATTERN=WEIGHT pairs, got {item!r}")
    return out


def given_values(args: argparse.Namespace, flags: Iterable[Flag], dest_prefix: str = ""
                 ) -> dict[str, Any]:
    """{field: value} of the flags given on the command line."""
    values = {}
    for flag in flags:
        value = getattr(args, dest_prefix + flag.field, None)
        if value is None:
            continue
        if typing.get_origin(_base(flag.hint)) is dict:
            value = pairs(value, flag.option)
        values[flag.field] = value
    return values


def option_pairs(items: list[str] | None) -> dict[str, Any]:
    """`--option KEY=VALUE ...` as a mapping, each value read as YAML."""
    values = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--option takes KEY=VALUE pairs, got {item!r}")
        values[key] = yaml_value(text)
    return values


def read_config_file(path: str | None, sections: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The sections of YAML file `path` ({} without one), each a mapping; an unknown
    section, or one that is not a mapping, is an error naming the file."""
    if path is None:
        return {}
    sections = list(sections)
    values = load_yaml(path)
    unknown = sorted(set(values) - set(sections), key=str)  # YAML keys may be numbers too
    if unknown:
        raise ConfigError(f"unknown section(s) {', '.join(map(str, unknown))} in config file "
                          f"{path!r}; valid sections: {', '.join(sections)}")
    for section, body in values.items():
        if body is not None and not isinstance(body, dict):
            raise ConfigError(f"section {section!r} in config file {path!r} must be a mapping "
                              f"of keys to values, got {body!r}")
    return {section: dict(body or {}) for section, body in values.items()}


def build(cls: type, values: dict[str, Any], where: str) -> Any:
    """Config `cls` from `values`; any error says `where` the values came from."""
    try:
        return from_dict(cls, values, where)
    except ConfigError as error:
        message = str(error)
        raise ConfigError(message if where in message else f"{where}: {message}") from None
