"""Atomic files, training checkpoints and weight snapshots: the one place run state is written and read.

Every write goes through :func:`atomic_write`: the bytes land in a fresh temporary file in the same folder
(created exclusively, never through a symlink), are fsynced, and replace the target with ``os.replace``, which
swaps the directory entry itself, so a planted symlink is replaced rather than written through, and a kill at any
moment leaves either the old file or the new one, never a torn one.

Layout inside a work directory::

    checkpoints/state.msgpack   all models' TrainState (flax msgpack), stacked on a leading model axis, and what
                                made it (iteration, the models, the train config): one file, written atomically
    checkpoints/state.json      a readable copy of that description
    snapshots/iter_NNNNNN.msgpack   all models' params at a chosen iteration (for the noise study)
    config.json                 the run's settings (experiments' ExperimentConfig.to_json, version RUN_CONFIG_VERSION)

:func:`read_run_config` reads ``config.json`` and upgrades a run directory of an earlier version;
:func:`setting_differences` is the one comparison of a saved description with a requested one (used on resume, on
later stages and for a checkpoint's ``state.json``).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import jax
from flax import serialization

from bang_jax.balance import BangConfig

__all__ = [
    "CheckpointError",
    "atomic_write",
    "atomic_write_json",
    "checkpoint_info",
    "list_snapshots",
    "load_params",
    "load_variables",
    "load_snapshot",
    "load_state",
    "RUN_CONFIG_VERSION",
    "read_run_config",
    "refuse_symlinked_dirs",
    "remove_stale_temporaries",
    "setting_differences",
    "upgrade_run_config",
    "save_snapshot",
    "save_state",
    "snapshot_path",
]

STATE = Path("checkpoints") / "state.msgpack"
STATE_INFO = Path("checkpoints") / "state.json"
SNAPSHOTS = Path("snapshots")
_SNAPSHOT_RE = re.compile(r"^iter_(\d{6,})\.msgpack$")
RUN_CONFIG = Path("config.json")
# 1: every setting at the top level (up to 2026-11); 2: training settings under "train", evaluation under "eval".
RUN_CONFIG_VERSION = 2
_V1_TRAIN = ("steps", "batch_size", "order", "data_seed", "method", "model_batching", "solver")
_V1_EVAL = {"attacks": "attacks", "hc1_max_step": "hc1_max_step", "pgd_eps": "pgd_budgets",
            "square_queries": "square_queries", "curve_eps": "curve_budgets"}


def upgrade_run_config(d: dict, where: str = "config.json") -> dict:
    """A run description of any known version, in the current layout (version :data:`RUN_CONFIG_VERSION`)."""
    d = dict(d)
    version = d.get("version", 1)
    if version == RUN_CONFIG_VERSION:
        return d
    if version != 1:
        raise CheckpointError(f"{where} is a version {version} run description; this bang-jax reads versions 1 to "
                              f"{RUN_CONFIG_VERSION} (upgrade bang-jax to use this run directory)")
    d["train"] = {k: d.pop(k) for k in _V1_TRAIN if k in d}
    d["eval"] = {new: d.pop(old) for old, new in _V1_EVAL.items() if old in d}
    d["version"] = RUN_CONFIG_VERSION
    return d


def read_run_config(workdir: str | os.PathLike) -> dict:
    """``config.json`` of a run directory, upgraded to the current layout; :class:`CheckpointError` if it is
    missing or unreadable."""
    path = Path(workdir) / RUN_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{workdir} has no config.json: not a run directory of python -m experiments.*")
    try:
        return upgrade_run_config(json.loads(path.read_text()), str(path))
    except (ValueError, OSError) as err:
        raise CheckpointError(f"{path} cannot be read as a run description ({err})") from None


def _flat_settings(d: Any, prefix: str = "") -> dict:
    """``{"train.solver.base_lr": value, …}``: nested settings as dotted keys (lists and scalars are leaves)."""
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(_flat_settings(v, key) if isinstance(v, dict) and k != "models" else {key: v})
    return out


def setting_differences(saved: dict, now: dict, *, may_change=frozenset()) -> list[str]:
    """The settings (dotted keys) whose values differ between two run descriptions, as ``"key: old → new"``.

    ``may_change`` names keys (``"train.steps"``) or whole sections (``"eval"``) that are allowed to differ. Both
    descriptions are compared in their JSON form, so tuples and lists compare equal.
    """
    a, b = _flat_settings(json.loads(json.dumps(saved))), _flat_settings(json.loads(json.dumps(now)))

    def allowed(key):
        return any(key == m or key.startswith(m + ".") for m in may_change)

    return [f"{k}: {a.get(k)!r} → {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if not allowed(k) and a.get(k) != b.get(k)]


def _bang_config_state(cfg: BangConfig) -> dict:
    return {f: serialization.to_state_dict(getattr(cfg, f)) for f in ("epsilon", "beta", "ratio")}


def _bang_config_restore(target: BangConfig, state: dict) -> BangConfig:
    fields = {
        f: serialization.from_state_dict(getattr(target, f), state[f], name=f) for f in ("epsilon", "beta", "ratio")
    }
    return BangConfig._unchecked(**fields)


# A train state carries each model's BangConfig (broadcast to its params); checkpoints store it with the weights.
serialization.register_serialization_state(BangConfig, _bang_config_state, _bang_config_restore, override=True)


_UMASK = os.umask(0)
os.umask(_UMASK)


def refuse_symlinked_dirs(workdir: str | os.PathLike) -> None:
    """Raises :class:`CheckpointError` if the run's checkpoint or snapshot folder is a symbolic link."""
    for sub in (STATE.parent, SNAPSHOTS):
        if (Path(workdir) / sub).is_symlink():
            raise CheckpointError(f"{Path(workdir) / sub} is a symbolic link; refusing to write through it")


class CheckpointError(RuntimeError):
    """A checkpoint or snapshot that cannot be read, or that does not belong to the run asked for."""


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Replaces ``path`` with ``data`` atomically (fsynced; symlinks are replaced, never followed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the mode open() would
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write(path, (json.dumps(obj, indent=2) + "\n").encode())


def save_state(workdir: str | os.PathLike, states: Any, info: dict) -> None:
    """Writes the stacked train state and its description (``info``: iteration, models, config) as **one** file.

    The description travels inside ``state.msgpack``, written atomically, so a kill at any byte leaves either the
    previous checkpoint or the new one, whole: never new weights labelled with an old iteration. ``state.json``
    is a readable copy written afterwards; the copy inside the checkpoint is the one read back.
    """
    workdir = Path(workdir)
    payload = {"state": serialization.to_state_dict(jax.device_get(states)), "info": json.dumps(info)}
    atomic_write(workdir / STATE, serialization.msgpack_serialize(payload))
    atomic_write_json(workdir / STATE_INFO, info)


def _read_checkpoint(workdir: str | os.PathLike) -> tuple[dict, dict]:
    """``(state dict, description)`` of the checkpoint (a checkpoint of an earlier release keeps its description
    in ``state.json`` only)."""
    path = Path(workdir) / STATE
    try:
        raw = serialization.msgpack_restore(path.read_bytes())
    except Exception as err:  # noqa: BLE001 - msgpack raises many kinds
        raise CheckpointError(f"cannot read checkpoint {path} (damaged or truncated?): {err}") from err
    if isinstance(raw, dict) and set(raw) == {"state", "info"}:
        try:
            return raw["state"], json.loads(raw["info"])
        except ValueError as err:
            raise CheckpointError(f"checkpoint {path} has an unreadable description: {err}") from err
    try:
        return raw, json.loads((Path(workdir) / STATE_INFO).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} has no readable {STATE_INFO.name}: {err}") from err


def checkpoint_info(workdir: str | os.PathLike) -> dict | None:
    """The description saved with the checkpoint, or ``None`` when the work directory has no checkpoint."""
    if not (Path(workdir) / STATE).exists():
        return None
    return _read_checkpoint(workdir)[1]


def load_state(workdir: str | os.PathLike, template: Any) -> Any:
    """Restores the train state saved in ``workdir`` into the structure of ``template``."""
    state, _ = _read_checkpoint(workdir)
    fields = getattr(template, "_fields", ())
    if "model_state" in fields and isinstance(state, dict) and "model_state" not in state \
            and not jax.tree.leaves(template.model_state):
        state = {**state, "model_state": {}}  # written before train states carried model state; there is none
    try:
        return serialization.from_state_dict(template, state)
    except Exception as err:  # noqa: BLE001 - flax raises many kinds
        raise CheckpointError(f"cannot restore checkpoint {Path(workdir) / STATE}: {err}") from err


def load_params(workdir: str | os.PathLike) -> tuple[list[str], dict, dict]:
    """The checkpoint's model names, its params (numpy, stacked on a leading model axis) and its description.

    Needs no template. For evaluating a run's models use :func:`load_variables`, which also returns what
    training updates besides the params (BatchNorm statistics).
    """
    names, variables, info = load_variables(workdir)
    return names, variables["params"], info


def load_variables(workdir: str | os.PathLike) -> tuple[list[str], dict, dict]:
    """Like :func:`load_params`, with the params and what training updates besides them (BatchNorm statistics)
    together as stacked Flax variables: ``(names, {'params': ..., 'batch_stats': ...}, description)``."""
    if not (Path(workdir) / STATE).exists():
        raise CheckpointError(f"{workdir} has no checkpoint ({STATE}); is it a run directory?")
    state, info = _read_checkpoint(workdir)  # one read: params, statistics and description of the same write
    try:
        params = state["params"]
        names = [m["name"] for m in info["models"]]
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint {Path(workdir) / STATE} lacks {err}") from err
    return names, {**(state.get("model_state") or {}), "params": params}, info


def remove_stale_temporaries(workdir: str | os.PathLike) -> list[Path]:
    """Deletes the temporary files an interrupted :func:`atomic_write` left in a run directory (``.NAME.*.tmp``
    in it, ``checkpoints/`` and ``snapshots/``); call it only while holding the run (nothing else writes)."""
    workdir = Path(workdir)
    removed = []
    for folder in (workdir, workdir / STATE.parent, workdir / SNAPSHOTS):
        if folder.is_dir() and not folder.is_symlink():
            for p in folder.glob(".*.tmp"):
                if p.is_file() and not p.is_symlink():
                    p.unlink()
                    removed.append(p)
    return removed


def snapshot_path(workdir: str | os.PathLike, iteration: int) -> Path:
    return Path(workdir) / SNAPSHOTS / f"iter_{iteration:06d}.msgpack"


def save_snapshot(workdir: str | os.PathLike, iteration: int, params: Any) -> None:
    atomic_write(snapshot_path(workdir, iteration), serialization.to_bytes(jax.device_get(params)))


def list_snapshots(workdir: str | os.PathLike) -> list[int]:
    """Iterations of the snapshots in ``workdir``, sorted."""
    folder = Path(workdir) / SNAPSHOTS
    if not folder.is_dir():
        return []
    found = (_SNAPSHOT_RE.match(p.name) for p in folder.iterdir())
    return sorted(int(m.group(1)) for m in found if m)


def load_snapshot(workdir: str | os.PathLike, iteration: int, template: Any) -> Any:
    path = snapshot_path(workdir, iteration)
    try:
        return serialization.from_bytes(template, path.read_bytes())
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"cannot restore snapshot {path}: {err}") from err
