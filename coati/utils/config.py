"""Typed configs that are also command lines: one declaration per hyper-parameter.

A config is a dataclass whose fields are declared with :func:`option` (default, help text, choices, Coati
aliases, flag group). :func:`add_config_args` turns it into argparse flags, so the default and the help
live in one place; the trainer takes the same dataclass; README's flag tables are generated from the
parser (``tools/flag_table.py``).
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Sequence


_TRUE = {"1", "true", "yes", "y", "on"}
_FALSE = {"0", "false", "no", "n", "off"}


def str2bool(value: str) -> bool:
    v = str(value).strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


class BoolFlag(argparse.Action):
    """``--x`` / ``--x true`` / ``--x false`` / ``--no-x``."""

    def __init__(self, option_strings, dest, default=False, help=None, **kwargs):
        opts = list(option_strings)
        for opt in option_strings:
            if opt.startswith("--"):
                opts.append("--no-" + opt[2:])
        super().__init__(opts, dest, nargs="?", const=None, default=default, help=help, metavar="BOOL")

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string.startswith("--no-"):
            if values is not None:
                parser.error(f"{option_string} takes no value")
            setattr(namespace, self.dest, False)
        else:
            try:
                setattr(namespace, self.dest, True if values is None else str2bool(values))
            except argparse.ArgumentTypeError as e:
                parser.error(f"{option_string}: {e}")


def option(default: Any, help: str, *, choices: Sequence[Any] | None = None, aliases: Sequence[str] = (),
           group: str = "options") -> Any:
    """A dataclass field that is also a ``--flag``."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "aliases": tuple(aliases),
                                                        "group": group})


def _flag_type(annotation: Any) -> type:
    """``float | None`` -> float; plain types as they are."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"config fields take one type or that type | None, got {annotation}")
        return args[0]
    return annotation


def add_config_args(parser: argparse.ArgumentParser, cls: type,
                    groups: dict[str, argparse._ArgumentGroup] | None = None,
                    exclude: Sequence[str] = ()) -> dict[str, argparse._ArgumentGroup]:
    """Add one flag per :func:`option` field of ``cls`` to its group (created on first use; pass ``groups`` to
    share groups with other configs or hand-written flags). Returns the groups."""
    groups = {} if groups is None else groups
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        md = f.metadata
        if "help" not in md or f.name in exclude:
            continue
        group = groups.get(md["group"])
        if group is None:
            group = groups[md["group"]] = parser.add_argument_group(md["group"])
        names = [f"--{f.name}", *md["aliases"]]
        kind = _flag_type(hints[f.name])
        if kind is bool:
            group.add_argument(*names, dest=f.name, action=BoolFlag, default=f.default, help=md["help"])
        else:
            group.add_argument(*names, dest=f.name, type=kind, default=f.default, choices=md["choices"],
                               help=md["help"])
    return groups


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """``cls`` filled from the parsed flags (fields without a flag keep their defaults)."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})
