"""Typed configs that are also command lines: one declaration per hyper-parameter.

A config is a dataclass whose fields are declared with :func:`option` (default, help text, choices, Coati
aliases, flag group). :func:`add_config_args` turns it into argparse flags, so the default and the help
live in one place; the trainer takes the same dataclass; README's flag tables are generated from the
parser (``coati.utils.flag_table``).
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Sequence

from .cli import BoolFlag


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
