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

from ..errors import UsageError


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
        opts = [*option_strings, *("--no-" + opt[2:] for opt in option_strings if opt.startswith("--"))]
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


class Bounded:
    """An argparse ``type`` for a number in a range, written as it reads: ``Bounded(int, ">= 1")``,
    ``Bounded(float, "> 0")``, ``Bounded(float, "[0, 1)")``. A value outside it is refused by the parser, before
    anything loads, with one line naming the flag and the range."""

    def __init__(self, kind: type, spec: str) -> None:
        self.kind, self.spec = kind, spec.strip()
        if self.spec[0] in "[(":
            low, high = self.spec[1:-1].split(",")
            self.low, self.high = float(low), float(high)
            self.low_open, self.high_open = self.spec[0] == "(", self.spec[-1] == ")"
        else:
            op, bound = self.spec.split()
            self.low, self.high, self.low_open, self.high_open = float(bound), None, op == ">", False
            if op not in (">", ">="):
                raise ValueError(f"bounds are '> x', '>= x' or an interval, got {spec!r}")
        self.__name__ = kind.__name__  # argparse names the type in its messages

    def holds(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below and value == value  # NaN is in no range

    def describe(self) -> str:
        return f"must be {self.spec}" if self.spec[0] == ">" else f"must be in {self.spec}"

    def __call__(self, text: str) -> int | float:
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if self.kind is int else 'a number'}, got "
                                             f"{text!r}") from None
        if not self.holds(value):
            raise argparse.ArgumentTypeError(f"{self.describe()}, got {text}")
        return value

    def __repr__(self) -> str:
        return f"Bounded({self.kind.__name__}, {self.spec!r})"


def option(default: Any, help: str, *, bounds: str | None = None, choices: Sequence[Any] | None = None,
           group: str = "options") -> Any:
    """A dataclass field that is also a ``--flag``; a numeric one names its ``bounds`` (see :class:`Bounded`)."""
    return dataclasses.field(default=default, metadata={"help": help, "bounds": bounds, "choices": choices,
                                                        "group": group})


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each number's range beside its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = super()._get_help_string(action)
        return f"{text} [{action.type.spec}]" if isinstance(action.type, Bounded) else text


class Parser(argparse.ArgumentParser):
    """argparse with the defaults and ranges in ``--help``, whose errors are one ``error: ...`` line and status
    2, as every other user error of a script (argparse's own prints the whole usage first)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def check_bounds(config: Any) -> None:
    """A UsageError (a ValueError) naming the first field of ``config`` outside its :func:`option` bounds (configs built in
    code meet the same ranges as flags)."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        spec, value = f.metadata.get("bounds"), getattr(config, f.name)
        if spec and value is not None and not Bounded(_flag_type(hints[f.name]), spec).holds(value):
            raise UsageError(f"--{f.name} {Bounded(float, spec).describe()}, got {value}")


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
                    exclude: Sequence[str] = (), defaults: dict[str, Any] | None = None,
                    only_groups: Sequence[str] | None = None) -> dict[str, argparse._ArgumentGroup]:
    """Add one flag per :func:`option` field of ``cls`` to its group (created on first use; pass ``groups`` to
    share groups with other configs or hand-written flags). ``defaults``: a script's own defaults for some fields
    (e.g. SFT accumulates 8 micro-batches where the library's loop takes 1); ``only_groups``: add just the fields
    of these flag groups. Returns the groups."""
    defaults = defaults or {}
    groups = {} if groups is None else groups
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        md = f.metadata
        if "help" not in md or f.name in exclude or (only_groups is not None and md["group"] not in only_groups):
            continue
        group = groups.get(md["group"])
        if group is None:
            group = groups[md["group"]] = parser.add_argument_group(md["group"])
        kind = _flag_type(hints[f.name])
        default = defaults.get(f.name, f.default)
        if typing.get_origin(kind) is tuple:  # tuple[str, ...]: any number of values after the flag
            group.add_argument(f"--{f.name}", dest=f.name, nargs="*", type=typing.get_args(kind)[0],
                               default=default, metavar="TEXT", help=md["help"])
            continue
        if kind is bool:
            group.add_argument(f"--{f.name}", dest=f.name, action=BoolFlag, default=default, help=md["help"])
            continue
        if kind in (int, float) and md["choices"] is None:
            if not md["bounds"]:
                raise TypeError(f"{cls.__name__}.{f.name}: a numeric option names its bounds")
            kind = Bounded(kind, md["bounds"])
        group.add_argument(f"--{f.name}", dest=f.name, type=kind, default=default, choices=md["choices"], help=md["help"])
    return groups


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """``cls`` filled from the parsed flags (fields without a flag keep their defaults)."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})
