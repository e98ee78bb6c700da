"""One place per setting: the experiment config, its JSON form, its validation and its command line.

:class:`ExperimentConfig` holds every setting of a run by composition: the run's own fields, a
:class:`bang_jax.train.TrainConfig` (``train``, with its solver) and a :class:`bang_jax.evaluate.EvalConfig`
(``eval``), each defined and validated once, in the library. Each dataset's presets fill it
(``experiments/configs/<dataset>.py``, ``get_config(preset)``), and the command line overrides any field without a
hand-written flag: the flags are generated from the dataclass fields (``--train.batch-size 32``,
``--train.solver.base-lr 0.02``, ``--eval.hc1-max-step 255``, ``--eval.pgd-steps 100``, ``--noise-sigmas 0,50,100``),
so adding a field adds its flag; the short flags of earlier releases (``--steps``, ``--batch-size``,
``--solver.base-lr``, ``--attacks``, ``--pgd-eps``, ``--curve-eps`` …) stay as aliases. Chosen over ml_collections
because typed dataclasses keep the types next to the values, validate themselves and serialise to the run's
``config.json`` (``version`` 2; version-1 directories are read through a converter) with no extra dependency.

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
import typing
from pathlib import Path
from typing import Any

import yaml

from bang_jax import checkpoint as ckpt_lib, settings
from bang_jax.balance import BangConfig
from bang_jax.evaluate import EvalConfig
from bang_jax.solvers import SolverConfig
from bang_jax.train import ModelSpec, TrainConfig, check_models

STAGES = ("train", "evaluate", "noise", "figures", "report")
# Settings (dotted keys of config.json, or whole sections) that may differ between a run directory's config and a
# later command on it (resume or later stages).
MAY_CHANGE = frozenset({
    "train.steps", "test_limit", "eval", "noise_sigmas", "noise_per_class", "noise_copies", "figure_images",
    "log_every", "checkpoint_every", "data_dir", "steps_per_dispatch",
})
# Settings that only the stages after training read: changing them never needs retraining.
EVALUATION_ONLY = MAY_CHANGE - {"train.steps", "log_every", "checkpoint_every", "steps_per_dispatch"}
# The flags of earlier releases, kept as aliases of the generated ones.
FLAG_ALIASES = {
    "train.steps": ("--steps",), "train.batch_size": ("--batch-size",), "train.order": ("--order",),
    "train.data_seed": ("--data-seed",), "train.method": ("--method",), "train.model_batching": ("--model-batching",),
    "eval.attacks": ("--attacks",), "eval.hc1_max_step": ("--hc1-max-step",), "eval.pgd_budgets": ("--pgd-eps",),
    "eval.square_queries": ("--square-queries",), "eval.curve_budgets": ("--curve-eps",),
}
FLAG_ALIASES |= {f"train.solver.{f.name}": (f"--solver.{f.name.replace('_', '-')}",)
                 for f in dataclasses.fields(SolverConfig)}


class ConfigError(ValueError):
    """A setting that is invalid, or that conflicts with the run directory."""


@dataclasses.dataclass
class ExperimentConfig:
    """Everything one run needs. Presets fill it; flags override it; ``config.json`` stores it.

    Training settings live in ``train`` (a :class:`bang_jax.train.TrainConfig`, with its solver) and evaluation
    settings in ``eval`` (a :class:`bang_jax.evaluate.EvalConfig`); each validates itself. The fields here are
    the run's own: what to train, how often to log and checkpoint, the test subset, the noise study, the figures.
    """

    dataset: str
    model: str
    preset: str
    models: tuple[ModelSpec, ...]
    train: TrainConfig
    eval: EvalConfig = EvalConfig()
    steps_per_dispatch: int = 0  # iterations per jitted call (lax.scan); 0: the backend's default (CPU 1, GPU/TPU 8)
    test_limit: int | None = None  # evaluate on the first N test images (None: all)
    log_every: int = 100
    checkpoint_every: int = 1000
    data_dir: str | None = None
    noise_every: int = 0  # snapshot interval of the noise study in iterations (0: no noise study)
    noise_sigmas: tuple[float, ...] = ()
    noise_per_class: int = 100
    noise_copies: int = 1000
    figure_images: int = 8
    seeds: tuple[int, ...] = ()  # --seeds: each model once per seed (experiments/seeds.py); () = one run, no suffix

    def validate(self) -> ExperimentConfig:
        """Raises :class:`ConfigError` naming the first bad setting; returns ``self``. (``train`` and ``eval``
        validated themselves when they were built.)"""
        def positive(name, allow_zero=False, allow_none=False):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if allow_zero else 1):
                raise ConfigError(f"--{name.replace('_', '-')} must be a {'non-negative' if allow_zero else 'positive'}"
                                  f" integer, got {v!r}")

        for name in ("log_every", "checkpoint_every", "noise_per_class", "noise_copies"):
            positive(name)
        for name in ("noise_every", "figure_images", "steps_per_dispatch"):
            positive(name, allow_zero=True)
        positive("test_limit", allow_none=True)
        if not self.models:
            raise ConfigError("--models: no model to train")
        bad = [s for s in self.noise_sigmas if not (s >= 0 and s != float("inf"))]
        if bad:
            raise ConfigError(f"--noise-sigmas must be finite non-negative numbers, got {bad}")
        if self.noise_every and not self.noise_sigmas:
            raise ConfigError("--noise-sigmas: the noise study needs at least one σ")
        try:
            check_models(self.train, self.models)  # train()'s own rule, checked before any work
        except ValueError as err:
            raise ConfigError(f"--models: {err}") from None
        return self

    def to_json(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["models"] = [m.to_json() for m in self.models]
        d["train"] = self.train.to_json()
        d["eval"] = self.eval.to_json()
        return {"version": ckpt_lib.RUN_CONFIG_VERSION} | json.loads(json.dumps(d))

    @classmethod
    def from_json(cls, d: dict) -> ExperimentConfig:
        """From a ``config.json`` of any known version (older ones are upgraded)."""
        d = ckpt_lib.upgrade_run_config(d)
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["models"] = tuple(
            ModelSpec(name=m["name"], seed=m["seed"],
                      bang=BangConfig(epsilon=m["epsilon"], beta=m["beta"], ratio=m["ratio"]))
            for m in d["models"]
        )
        train = dict(d["train"])
        train["solver"] = SolverConfig(**train["solver"])
        try:
            d["train"] = TrainConfig(**train)
            d["eval"] = EvalConfig.from_json(d.get("eval", {}))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"config.json: {err}") from None
        hints = typing.get_type_hints(cls)
        for k, v in d.items():
            if isinstance(v, list) and typing.get_origin(hints[k]) is tuple:
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

_SPECIAL = frozenset({"dataset", "model", "preset", "models", "seeds"})


def flag_fields() -> list[settings.FlagField]:
    """Every overridable setting's flag: ``--train.*`` (with ``--train.solver.*``), ``--eval.*``, the run's own."""
    return settings.flag_fields(ExperimentConfig, skip=_SPECIAL, aliases=FLAG_ALIASES)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    settings.add_flags(parser, flag_fields(), "settings (each overrides the preset's value; see config.json of a run)")


def overrides_from_args(args: argparse.Namespace) -> dict[tuple[str, ...], Any]:
    """{field path: value} of the flags given on the command line."""
    return settings.given_flags(args, flag_fields())


def apply_overrides(cfg: ExperimentConfig, overrides: dict[tuple[str, ...], Any]) -> ExperimentConfig:
    return settings.apply_flags(cfg, overrides, flag_fields(), error=ConfigError)


def differences(saved: dict, now: ExperimentConfig, *, allowed=frozenset()) -> list[str]:
    """Settings of ``now`` that differ from a saved ``config.json`` (keys in ``allowed`` excepted)."""
    return ckpt_lib.setting_differences(ExperimentConfig.from_json(saved).to_json(), now.to_json(), may_change=allowed)


def load_saved(out: Path) -> dict | None:
    """The run directory's ``config.json`` in the current layout, or None if there is none."""
    path = out / "config.json"
    if not path.exists():
        return None
    try:
        return ckpt_lib.read_run_config(out)
    except ckpt_lib.CheckpointError as err:
        raise ConfigError(str(err)) from None
