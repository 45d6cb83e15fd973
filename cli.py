"""Flags from dataclass fields (`option(...)`): a bad value is one line naming the flag, at once."""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import operator
import sys
import typing

RESUME_NOTES = {"fixed": "; must match the checkpoint on --resume",
                "applied": "; may change on --resume"}
BOUNDS = (("min", operator.ge, ">="), ("max", operator.le, "<="), ("above", operator.gt, ">"))


def option(default, help: str, *, choices=None, min=None, max=None, above=None, const=None,
           on_resume: str | None = None, factory=None):
    """A config field: `min`/`max` bound it inclusively, `above` exclusively, `const` makes its
    value optional. On --resume a "fixed" one must match the checkpoint, an "applied" may change."""
    meta = dict(help=help, choices=choices, min=min, max=max, above=above, const=const,
                on_resume=on_resume)
    default = dict(default=default) if factory is None else dict(default_factory=factory)
    return dataclasses.field(metadata=meta, **default)


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (the usage of 60 flags would bury it)."""

    def error(self, message):
        sys.stderr.write(f"error: {message} (see --help)\n")
        raise SystemExit(2)


def leaves(cls) -> list[tuple[tuple[str, ...], dataclasses.Field, type]]:
    """(path of attribute names, field, type) of every non-dataclass field, nested ones included."""
    hints, out = typing.get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        nested = leaves(kind) if dataclasses.is_dataclass(kind) else [((), f, kind)]
        out += [((f.name,) + path, g, t) for path, g, t in nested]
    return out


def add_options(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per leaf field of `cls`, in an argument group per nested dataclass."""
    hints, groups = typing.get_type_hints(cls), {}
    for path, f, kind in leaves(cls):
        if len(path) > 1 and path[0] not in groups:
            title = (hints[path[0]].__doc__ or path[0]).strip().split("\n")[0]
            groups[path[0]] = parser.add_argument_group(title)
        meta = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = "none" if default in ("", None, []) else "%(default)s"
        help = meta.get("help", "") + RESUME_NOTES.get(meta.get("on_resume"), "")
        kw = dict(type=kind if kind in (int, float) else str, choices=meta.get("choices"))
        if kind is bool:
            kw = dict(action=argparse.BooleanOptionalAction)
        elif typing.get_origin(kind) is list:
            kw["nargs"] = "+"
        elif meta.get("const") is not None:
            kw.update(nargs="?", const=meta["const"])
        groups.get(path[0], parser).add_argument(f"--{f.name}", default=default,
                                                 help=f"{help} (default: {shown})", **kw)


def _checked(name: str, value, meta):
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"--{name} {value}: must be a finite number ({meta['help']})")
    if isinstance(value, int) and not -2 ** 63 <= value < 2 ** 63:
        raise ValueError(f"--{name} {value}: out of range ({meta['help']})")
    for key, ok, sign in BOUNDS:
        if meta.get(key) is not None and not ok(value, meta[key]):
            raise ValueError(f"--{name} {value}: must be {sign} {meta[key]} ({meta['help']})")
    return value


def build(cls, values: dict):
    """An instance of `cls`, nested dataclasses included, from flat flag values, bounds checked."""
    hints, kwargs = typing.get_type_hints(cls), {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = build(hints[f.name], values)
        elif f.name in values:
            kwargs[f.name] = _checked(f.name, values[f.name], f.metadata)
    return cls(**kwargs)


def parse(cls, argv=None, description: str = ""):
    """Parse the command line into `cls`."""
    p = Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(p, cls)
    try:
        return build(cls, vars(p.parse_args(argv)))
    except ValueError as e:
        p.error(str(e))


def flat(cfg) -> dict:
    """{flag name: value} of a (nested) config, the form config.json stores."""
    return {f.name: functools.reduce(getattr, path, cfg) for path, f, _ in leaves(type(cfg))}
