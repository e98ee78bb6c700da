"""Command-line flags generated from settings dataclasses: one definition of a setting gives its flag.

A settings dataclass (``TrainConfig``, ``SolverConfig``, ``EvalConfig``, the experiments' ``ExperimentConfig``) is
turned into ``argparse`` flags field by field — nested dataclasses become dotted flags (``--train.solver.base-lr``)
— with the field's type deciding how the value is read (``int``, ``float``, ``str``, ``bool``, tuples as
comma-separated lists, ``X | None`` accepting ``none``). Older spellings are kept as aliases. Every flag defaults to
"not given", so a command knows exactly what the user set; the dataclass validates the values when it is built.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

__all__ = ["FlagField", "add_flags", "apply_flags", "flag_fields", "given_flags"]


@dataclasses.dataclass(frozen=True)
class FlagField:
    """One generated flag: ``dest`` in the namespace, the ``flag`` itself, the field ``path`` and its type."""

    dest: str
    flag: str
    path: tuple[str, ...]
    type: Any
    aliases: tuple[str, ...] = ()


def _tuple_item(tp):
    if typing.get_origin(tp) is tuple:
        return typing.get_args(tp)[0]
    return None


def _optional_inner(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return None


def _converter(tp, flag: str):
    inner = _optional_inner(tp)
    if inner is not None:
        conv = _converter(inner, flag)

        def optional(s):
            if s.strip().lower() == "none":
                return None
            if not s.strip():
                raise argparse.ArgumentTypeError(f"{flag} is empty (write none for no value)")
            return conv(s)
        return optional
    item = _tuple_item(tp)
    if item is not None:
        conv = _converter(item, flag)
        return lambda s: tuple(conv(x) for x in s.split(",") if x.strip())
    if tp is bool:
        def to_bool(s):
            if s.lower() in ("1", "true", "yes", "on"):
                return True
            if s.lower() in ("0", "false", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"{flag} must be true or false, got {s!r}")
        return to_bool
    if tp in (int, float, str):
        def conv_scalar(s, tp=tp):
            try:
                return tp(s.strip())
            except ValueError:
                raise argparse.ArgumentTypeError(f"{flag} must be {'an' if tp is int else 'a'} {tp.__name__}, "
                                                 f"got {s!r}") from None
        return conv_scalar
    raise TypeError(f"no command-line converter for {tp}")  # pragma: no cover - a new field type


def _help(tp) -> str:
    inner = _optional_inner(tp)
    if inner is not None:
        return _help(inner) + " or none"
    item = _tuple_item(tp)
    if item is not None:
        return f"comma-separated {item.__name__}s"
    return tp.__name__


def flag_fields(cls, prefix: str = "", *, skip=frozenset(), aliases: dict | None = None) -> list[FlagField]:
    """The flags of dataclass ``cls``: one per scalar field, nested dataclasses recursed into (``--a.b``).

    ``prefix`` is prepended (``"eval."`` gives ``--eval.attacks``); ``skip`` names fields (dotted paths) that get no
    flag; ``aliases`` maps a dotted path to extra flag spellings (``{"eval.pgd_budgets": ("--pgd-eps",)}``).
    """
    aliases = aliases or {}
    out = []
    for name, tp in typing.get_type_hints(cls).items():
        path = tuple(prefix.split(".")[:-1]) + (name,) if prefix else (name,)
        dotted = ".".join(path)
        if dotted in skip:
            continue
        inner = _optional_inner(tp)
        if dataclasses.is_dataclass(tp) or (inner is not None and dataclasses.is_dataclass(inner)):
            out += flag_fields(inner or tp, dotted + ".", skip=skip, aliases=aliases)
            continue
        flag = "--" + ".".join(p.replace("_", "-") for p in path)
        out.append(FlagField(dest="__".join(path), flag=flag, path=path, type=tp,
                             aliases=tuple(aliases.get(dotted, ()))))
    return out


def add_flags(parser: argparse.ArgumentParser, fields: list[FlagField], title: str) -> None:
    """Adds ``fields`` to ``parser`` (default: not given); an underscore spelling is accepted beside dashes."""
    group = parser.add_argument_group(title)
    for f in fields:
        spellings = [f.flag, *f.aliases]
        spellings += [s.replace("-", "_").replace("__", "--") for s in spellings if "-" in s[2:]]
        group.add_argument(*dict.fromkeys(spellings), dest=f.dest, type=_converter(f.type, f.flag), default=None,
                           metavar="V", help=_help(f.type) + (f" (also {', '.join(f.aliases)})" if f.aliases else ""))


def given_flags(args: argparse.Namespace, fields: list[FlagField]) -> dict[tuple[str, ...], Any]:
    """``{field path: value}`` of the flags given on the command line."""
    return {f.path: getattr(args, f.dest) for f in fields if getattr(args, f.dest, None) is not None}


def apply_flags(obj, values: dict[tuple[str, ...], Any], fields: list[FlagField] | None = None, *,
                error=ValueError):
    """``obj`` (a dataclass) with the ``{field path: value}`` overrides applied one by one, nested dataclasses
    rebuilt (and so validated). A rejected value raises ``error`` naming its flag (with its aliases) when
    ``fields`` are given."""
    names = {f.path: f.flag + (f" ({', '.join(f.aliases)})" if f.aliases else "") for f in fields or ()}
    for path, value in values.items():
        try:
            obj = _replace(obj, path, value)
        except (ValueError, TypeError) as err:
            raise error(f"{names.get(path, '.'.join(path))}: {err}") from None
    return obj


def _replace(obj, path: tuple[str, ...], value):
    if len(path) == 1:
        return dataclasses.replace(obj, **{path[0]: value})
    return dataclasses.replace(obj, **{path[0]: _replace(getattr(obj, path[0]), path[1:], value)})
