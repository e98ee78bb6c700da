"""One place per setting: the experiment config, its JSON form, its validation and its command line.

:class:`ExperimentConfig` holds every setting of a run. Each dataset's presets fill it
(``experiments/configs/<dataset>.py``, ``get_config(preset)``), and the command line overrides any field without a
hand-written flag: the flags are generated from the dataclass fields (``--batch-size 32``, ``--hc1-max-step 255``,
``--noise-sigmas 0,50,100``, ``--solver.base-lr 0.02``), so adding a field adds its flag. Chosen over
ml_collections because a typed, frozen-free dataclass keeps the types next to the values, validates in one
method and serialises to the run's ``config.json`` with no extra dependency.

Models are given with ``--models``: comma-separated items, each a row of the paper's table (``R0``, ``B1``), a row
with keyword overrides (``B1(epsilon=0.8)``), a new model by keyword (``X(beta=1.1, epsilon=0.8, ratio=0.5)``),
with per-layer values as a mapping (``X(epsilon={conv1: 0.8, conv2: 0.8, ip1: 0.81, ip2: 0.9})``; every layer
must be named), or the short form ``NAME:BETA:EPSILON[:RATIO]``. Seeds count up from 0 in the order given (table
rows keep theirs), plus ``--seed-offset``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from bang_jax.balance import BangConfig
from bang_jax.solvers import SolverConfig
from bang_jax.train import ModelSpec, TrainConfig

from bang_jax.evaluate import ATTACKS  # noqa: E402  (the attacks evaluate_model knows)
STAGES = ("train", "evaluate", "noise", "figures", "report")
# Settings that may differ between a run directory's config and a later command on it (resume or later stages).
MAY_CHANGE = frozenset({
    "steps", "test_limit", "attacks", "hc1_max_step", "pgd_eps", "square_queries", "curve_eps", "noise_sigmas",
    "noise_per_class", "noise_copies", "figure_images", "log_every", "checkpoint_every", "data_dir",
    "steps_per_dispatch",
})
# Settings that only the stages after training read: changing them never needs retraining.
EVALUATION_ONLY = MAY_CHANGE - {"steps", "log_every", "checkpoint_every", "steps_per_dispatch"}


class ConfigError(ValueError):
    """A setting that is invalid, or that conflicts with the run directory."""


@dataclasses.dataclass
class ExperimentConfig:
    """Everything one run needs. Presets fill it; flags override it; ``config.json`` stores it."""

    dataset: str
    model: str
    preset: str
    models: tuple[ModelSpec, ...]
    solver: SolverConfig
    steps: int
    batch_size: int
    order: str = "sequential"
    data_seed: int = 0
    method: str = "single_pass"
    model_batching: str = "loop"
    steps_per_dispatch: int = 0  # iterations per jitted call (lax.scan); 0: the backend's default (CPU 1, GPU/TPU 8)
    test_limit: int | None = None  # evaluate on the first N test images (None: all)
    log_every: int = 100
    checkpoint_every: int = 1000
    data_dir: str | None = None
    attacks: tuple[str, ...] = ("fgs", "hc1")
    hc1_max_step: int = 1020
    pgd_eps: tuple[float, ...] = (16.0, 32.0, 64.0)
    square_queries: int = 1000  # query budget of the Square attack (attacks square, and the curves)
    curve_eps: tuple[float, ...] = ()  # budgets of the robust-accuracy curves and masking report (empty: none)
    noise_every: int = 0  # snapshot interval of the noise study in iterations (0: no noise study)
    noise_sigmas: tuple[float, ...] = ()
    noise_per_class: int = 100
    noise_copies: int = 1000
    figure_images: int = 8

    def train_config(self) -> TrainConfig:
        return TrainConfig(solver=self.solver, steps=self.steps, batch_size=self.batch_size, order=self.order,
                           data_seed=self.data_seed, method=self.method, model_batching=self.model_batching)

    def validate(self) -> "ExperimentConfig":
        """Raises :class:`ConfigError` naming the first bad setting; returns ``self``."""
        def positive(name, allow_zero=False, allow_none=False):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if allow_zero else 1):
                raise ConfigError(f"--{name.replace('_', '-')} must be a {'non-negative' if allow_zero else 'positive'}"
                                  f" integer, got {v!r}")

        for name in ("steps", "batch_size", "log_every", "checkpoint_every", "hc1_max_step", "noise_per_class",
                     "noise_copies", "square_queries"):
            positive(name)
        for name in ("data_seed", "noise_every", "figure_images", "steps_per_dispatch"):
            positive(name, allow_zero=True)
        positive("test_limit", allow_none=True)
        if not self.models:
            raise ConfigError("--models: no model to train")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ConfigError(f"--models: model names must be unique, got {names}")
        unknown = [a for a in self.attacks if a not in ATTACKS]
        if unknown:
            raise ConfigError(f"--attacks: unknown attack(s) {', '.join(unknown)}; known: {', '.join(ATTACKS)}")
        for name in ("noise_sigmas", "pgd_eps", "curve_eps"):
            bad = [s for s in getattr(self, name) if not (s >= 0 and s != float("inf"))]
            if bad:
                raise ConfigError(f"--{name.replace('_', '-')} must be finite non-negative numbers, got {bad}")
        if self.noise_every and not self.noise_sigmas:
            raise ConfigError("--noise-sigmas: the noise study needs at least one σ")
        try:  # order, method and model batching are TrainConfig's to check; its messages name the field
            self.train_config()
        except ValueError as err:
            field, _, rest = str(err).partition(" ")
            raise ConfigError(f"--{field.replace('_', '-')} {rest}") from None
        if self.method == "plain" and any(m.is_bang for m in self.models):
            raise ConfigError("--method plain trains regular models only, but "
                              + ", ".join(m.name for m in self.models if m.is_bang) + " have BANG hyperparameters")
        return self

    def to_json(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["models"] = [m.to_json() for m in self.models]
        d["solver"] = dataclasses.asdict(self.solver)
        return json.loads(json.dumps(d))

    @classmethod
    def from_json(cls, d: dict) -> "ExperimentConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["models"] = tuple(
            ModelSpec(name=m["name"], seed=m["seed"],
                      bang=BangConfig(epsilon=m["epsilon"], beta=m["beta"], ratio=m["ratio"]))
            for m in d["models"]
        )
        d["solver"] = SolverConfig(**d["solver"])
        hints = typing.get_type_hints(cls)
        for k, v in d.items():
            if isinstance(v, list) and _tuple_item(hints[k]) is not None:
                d[k] = tuple(v)
        return cls(**d)


# ------------------------------------------------------------------------------------------------------------
# Models on the command line.


def _split_top(text: str, sep: str = ",") -> list[str]:
    """Splits at ``sep`` outside brackets."""
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch in "({[":
            depth += 1
        elif ch in ")}]":
            depth -= 1
        if ch == sep and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return [s.strip() for s in out if s.strip()]


def _hyper_value(name: str, text: str):
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"--models: cannot read {name}={text!r}: {err}") from None

    def check(v):
        if isinstance(v, dict):
            return {str(k): check(x) for k, x in v.items()}
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"--models: {name} must be a number or a {{layer: number}} mapping, got {text!r}")
        return float(v)

    return check(value)


def parse_models(spec: str, table: dict[str, ModelSpec], seed_offset: int = 0) -> tuple[ModelSpec, ...]:
    """Parses ``--models`` (see the module docstring)."""
    out = []
    for i, item in enumerate(_split_top(spec)):
        if "(" in item:
            if not item.endswith(")"):
                raise ConfigError(f"--models: {item!r} must end with ')'")
            name, body = item[: item.index("(")].strip(), item[item.index("(") + 1 : -1]
            values = {}
            for kv in _split_top(body):
                if "=" not in kv:
                    raise ConfigError(f"--models: {kv!r} in {item!r} is not key=value")
                key, text = (s.strip() for s in kv.split("=", 1))
                if key not in ("epsilon", "beta", "ratio", "seed"):
                    raise ConfigError(f"--models: unknown key {key!r} in {item!r} (epsilon, beta, ratio, seed)")
                values[key] = int(text) if key == "seed" else _hyper_value(key, text)
            base = table.get(name)
            bang_fields = base.bang.to_json() if base is not None else {"epsilon": 0.0, "beta": 1.0, "ratio": 1.0}
            bang_fields.update({k: v for k, v in values.items() if k != "seed"})
            seed = values.get("seed", base.seed if base is not None else i)
            out.append(_spec(name, seed + seed_offset, bang_fields, item))
        elif ":" in item:
            parts = item.split(":")
            if len(parts) not in (3, 4):
                raise ConfigError(f"--models: bad item {item!r}: use NAME:BETA:EPSILON[:RATIO], NAME(key=value, …)"
                                  " or a table row name")
            try:
                beta, eps, ratio = float(parts[1]), float(parts[2]), float(parts[3]) if len(parts) == 4 else 1.0
            except ValueError:
                raise ConfigError(f"--models: {item!r}: BETA, EPSILON and RATIO must be numbers") from None
            out.append(_spec(parts[0], i + seed_offset, {"epsilon": eps, "beta": beta, "ratio": ratio}, item))
        elif item in table:
            out.append(dataclasses.replace(table[item], seed=table[item].seed + seed_offset))
        else:
            raise ConfigError(f"--models: unknown model {item!r}; table rows: {', '.join(table)}; or write "
                              f"{item}(beta=…, epsilon=…)")
    return tuple(out)


def _spec(name, seed, bang_fields, item) -> ModelSpec:
    try:
        return ModelSpec(name=name, seed=seed, bang=BangConfig(**bang_fields))
    except (ValueError, TypeError) as err:
        raise ConfigError(f"--models: {item!r}: {err}") from None


# ------------------------------------------------------------------------------------------------------------
# Flags generated from the fields.

_SPECIAL = {"dataset", "model", "preset", "models"}


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


def _flag_fields():
    """(dest, flag, field path, type) for every overridable field, the solver's nested as ``--solver.x``."""
    out = []
    for f, tp in typing.get_type_hints(ExperimentConfig).items():
        if f in _SPECIAL:
            continue
        if f == "solver":
            for sf, stp in typing.get_type_hints(SolverConfig).items():
                out.append((f"solver__{sf}", f"--solver.{sf.replace('_', '-')}", ("solver", sf), stp))
            continue
        out.append((f, f"--{f.replace('_', '-')}", (f,), tp))
    return out


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings (each overrides the preset's value; see config.json of a run)")
    for dest, flag, _, tp in _flag_fields():
        aliases = [flag] + ([flag.replace("-", "_").replace("__", "--")] if "-" in flag[2:] else [])
        group.add_argument(*aliases, dest=dest, type=_converter(tp, flag), default=None, metavar="V",
                           help=_help(tp))


def _help(tp) -> str:
    inner = _optional_inner(tp)
    if inner is not None:
        return _help(inner) + " or none"
    item = _tuple_item(tp)
    if item is not None:
        return f"comma-separated {item.__name__}s"
    return tp.__name__


def overrides_from_args(args: argparse.Namespace) -> dict[tuple[str, ...], Any]:
    """{field path: value} of the flags given on the command line."""
    return {path: getattr(args, dest) for dest, _, path, _ in _flag_fields() if getattr(args, dest) is not None}


def apply_overrides(cfg: ExperimentConfig, overrides: dict[tuple[str, ...], Any]) -> ExperimentConfig:
    solver = {path[1]: v for path, v in overrides.items() if path[0] == "solver"}
    top = {path[0]: v for path, v in overrides.items() if path[0] != "solver"}
    if solver:
        try:
            top["solver"] = dataclasses.replace(cfg.solver, **solver)
        except ValueError as err:
            raise ConfigError(f"--solver: {err}") from None
    return dataclasses.replace(cfg, **top)


def differences(saved: dict, now: ExperimentConfig, *, allowed=frozenset()) -> list[str]:
    """Settings of ``now`` that differ from a saved ``config.json`` (keys in ``allowed`` excepted)."""
    a = {k: v for k, v in saved.items() if k in {f.name for f in dataclasses.fields(ExperimentConfig)}}
    b = now.to_json()
    return [f"{k}: {a.get(k)!r} → {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if k not in allowed and a.get(k) != b.get(k)]


def load_saved(out: Path) -> dict | None:
    path = out / "config.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise ConfigError(f"{path} is not valid JSON ({err}); this is not a run directory of ours") from None
