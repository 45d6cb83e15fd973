"""Command-line flags from dataclasses: every field is a `--flag` of the same name, grouped by the
nested dataclass it sits in, with its help text, default and allowed range taken from the field
(`option(...)`). A value out of range or not finite is one line naming the flag, the value and what is allowed,
before any work starts."""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import typing


def option(default, help: str, *, choices=None, min=None, max=None, above=None, const=None,
           on_resume: str | None = None, factory=None):
    """A config field. `min`/`max` bound it inclusively, `above` exclusively; `const` makes the
    flag's value optional (`--resume` alone means `--resume latest`). `on_resume` says what a
    resumed run does when the value differs from the checkpoint's: "fixed" (an error: it would
    change the model or the data order), "applied" (taken and named in the log); None: not
    compared."""
    meta = dict(help=help, choices=choices, min=min, max=max, above=above, const=const,
                on_resume=on_resume)
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


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
        if dataclasses.is_dataclass(kind):
            out += [((f.name,) + path, g, t) for path, g, t in leaves(kind)]
        else:
            out.append(((f.name,), f, kind))
    return out


def _default(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def add_options(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per leaf field of `cls`, in an argument group per nested dataclass."""
    groups = {}
    for path, f, kind in leaves(cls):
        group = parser
        if len(path) > 1:
            owner = typing.get_type_hints(cls)[path[0]]
            title = (owner.__doc__ or path[0]).strip().split("\n")[0]
            group = groups.setdefault(path[0], parser.add_argument_group(title))
        meta, default = f.metadata, _default(f)
        help = meta.get("help", "") + {"fixed": "; must match the checkpoint on --resume",
                                       "applied": "; may change on --resume"}.get(meta.get("on_resume"), "")
        if kind is bool:
            group.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction,
                               default=default, help=f"{help} (default: %(default)s)")
            continue
        shown = "none" if default in ("", None, []) else "%(default)s"
        extra = dict(nargs="?", const=meta["const"]) if meta.get("const") is not None else {}
        if typing.get_origin(kind) is list:
            extra = dict(nargs="+")
        group.add_argument(f"--{f.name}", type=kind if kind in (int, float) else str,
                           default=default, choices=meta.get("choices"),
                           help=f"{help} (default: {shown})", **extra)


def _check(name: str, value, meta) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"--{name} {value}: must be a finite number ({meta['help']})")
    if isinstance(value, int) and not -2 ** 63 <= value < 2 ** 63:
        raise ValueError(f"--{name} {value}: out of range ({meta['help']})")
    bounds = [(meta.get("min"), lambda v, b: v >= b, ">="), (meta.get("max"), lambda v, b: v <= b, "<="),
              (meta.get("above"), lambda v, b: v > b, ">")]
    for bound, ok, sign in bounds:
        if bound is not None and not ok(value, bound):
            raise ValueError(f"--{name} {value}: must be {sign} {bound} ({meta['help']})")


def build(cls, values: dict):
    """An instance of `cls` (nested dataclasses included) from flat flag values, every bound
    checked (ValueError naming the flag)."""
    hints, kwargs = typing.get_type_hints(cls), {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = build(hints[f.name], values)
        elif f.name in values:
            _check(f.name, values[f.name], f.metadata)
            kwargs[f.name] = values[f.name]
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
    out = {}
    for path, f, _ in leaves(type(cfg)):
        obj = cfg
        for name in path:
            obj = getattr(obj, name)
        out[f.name] = obj
    return out
