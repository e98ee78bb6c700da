"""Seeds as a setting: every model of a run trained once per seed, and the results summarised over seeds.

``--seeds 0,1,2,3,4`` (or ``--seeds 5``, meaning seeds 0–4) turns each model of the run into one model per seed,
named ``<row>@s<k>`` (``R0@s0`` … ``R0@s4``), all trained together in the one program that trains a run's models.
Seed ``k`` of a row starts from the row's own seed plus ``SEED_STRIDE × k``: seed 0 is the row's usual model (the
same initial weights as a run without ``--seeds``), and no two models of a run share initial weights. What a seed
changes: the initial weights (and dropout, where a model has it). What it does not: the training data order, which
is the paper's fixed sequential order by default (``--train.order shuffled`` with ``--train.data-seed`` changes it
for all models alike), and the attacks' own randomness, which has its own recorded seed (``--eval.seed``).

The report stage then writes ``seeds.json`` (per row: the number of seeds, the per-seed values and mean ± standard
deviation of every reported measure) and ``seeds.md``/``seeds.png`` (the table and the per-seed points). A BANG
row's mean is marked as different from the regular row's when Welch's two-sample t-test gives p < 0.05
(two-sided, per measure, no correction for the number of measures compared); with fewer than two seeds per row
nothing is marked.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path

import numpy as np

from bang_jax.checkpoint import atomic_write
from bang_jax.train import ModelSpec
from experiments.reports import COLUMNS

SEED_STRIDE = 1000  # seed k of a row: the row's seed + SEED_STRIDE·k (rows' own seeds stay far below it)
SEP = "@s"
ALPHA = 0.05
MEASURES = COLUMNS  # the measures summarised over seeds: the columns of the paper-style table


class SeedsError(ValueError):
    """A bad ``--seeds`` value."""


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"5"`` → (0, 1, 2, 3, 4); ``"0,2,7"`` → (0, 2, 7). Seeds are distinct non-negative integers."""
    items = [s.strip() for s in str(text).split(",")]
    if not any(items):
        raise SeedsError("--seeds is empty: give a count (--seeds 5) or a list (--seeds 0,1,2,3,4)")
    try:
        values = [int(s) for s in items if s]
    except ValueError:
        raise SeedsError(f"--seeds must be a count or comma-separated integers, got {text!r}") from None
    if len(items) == 1:  # a count
        if not 1 <= values[0] <= 1000:
            raise SeedsError(f"--seeds: the number of seeds must be between 1 and 1000, got {values[0]}")
        return tuple(range(values[0]))
    if any(v < 0 for v in values):
        raise SeedsError(f"--seeds: seeds must be non-negative, got {text!r}")
    if len(set(values)) != len(values):
        raise SeedsError(f"--seeds lists a seed twice: {text!r}")
    if max(values) * SEED_STRIDE > 2**31 - 1:
        raise SeedsError(f"--seeds: seed {max(values)} is too large")
    return tuple(values)


def seeded_name(name: str, seed: int) -> str:
    return f"{name}{SEP}{seed}"


def split_name(name: str) -> tuple[str, int | None]:
    """``"R0@s3"`` → ("R0", 3); a name without a seed suffix → (name, None)."""
    row, sep, k = name.rpartition(SEP)
    if sep and row and k.isdigit():
        return row, int(k)
    return name, None


def expand(models: tuple[ModelSpec, ...], seeds: tuple[int, ...]) -> tuple[ModelSpec, ...]:
    """One model per (row, seed), rows outer, seeds inner; no seeds: the models unchanged."""
    if not seeds:
        return models
    for m in models:
        if split_name(m.name)[1] is not None:
            raise SeedsError(f"--seeds: model name {m.name!r} already ends in a seed suffix ({SEP}N); rename it")
        if m.seed >= SEED_STRIDE:
            raise SeedsError(f"--seeds: model {m.name} has seed {m.seed}; with --seeds row seeds must be below "
                             f"{SEED_STRIDE} (seed k adds {SEED_STRIDE}·k)")
    return tuple(dataclasses.replace(m, name=seeded_name(m.name, k), seed=m.seed + SEED_STRIDE * k)
                 for m in models for k in seeds)


def rows(models: tuple[ModelSpec, ...], seeds: tuple[int, ...]) -> tuple[ModelSpec, ...]:
    """The inverse of :func:`expand`: the row models of an expanded list."""
    if not seeds:
        return models
    first = [m for m in models if split_name(m.name)[1] == seeds[0]]
    return tuple(dataclasses.replace(m, name=split_name(m.name)[0], seed=m.seed - SEED_STRIDE * seeds[0])
                 for m in first)


# ------------------------------------------------------------------------------------------------------------
# Summaries over seeds.


def _welch_p(a: np.ndarray, b: np.ndarray) -> float | None:
    """Two-sided p value of Welch's t-test; None with fewer than 2 values a side. Equal constant samples: 1.0
    (no difference) or 0.0 (different constants)."""
    if len(a) < 2 or len(b) < 2:
        return None
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    if va + vb == 0:
        return 1.0 if a.mean() == b.mean() else 0.0
    from scipy import stats  # noqa: PLC0415 - scipy comes with jax

    with warnings.catch_warnings():  # nearly equal samples: scipy warns of precision loss; the p value stands
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def _present(values) -> np.ndarray:
    return np.asarray([v for v in values if v is not None], float)


def summarize(results: list[dict]) -> list[dict]:
    """Per row (models grouped by their name without the seed suffix, in first-seen order): the seeds, the
    per-seed values and mean ± sample standard deviation of every measure, and for BANG rows the Welch p value
    against the first regular row. Models that are not healthy (``status`` ≠ ok) are listed, not averaged."""
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(split_name(r["id"])[0], []).append(r)
    present = [m for m in MEASURES if any(r.get(m[0]) is not None for r in results)]
    out = []
    for row, members in groups.items():
        ok = [r for r in members if r.get("status", "ok") == "ok"]
        entry = {
            "id": row, "beta": members[0]["beta"], "epsilon": members[0]["epsilon"], "ratio": members[0]["ratio"],
            "regular": bool(members[0].get("regular")), "models": [r["id"] for r in members],
            "seeds": [split_name(r["id"])[1] for r in members], "n_seeds": len(ok),
            "unhealthy": {r["id"]: r.get("status") for r in members if r not in ok}, "measures": {},
        }
        for key, _, _ in present:
            values = [r.get(key) for r in ok]  # aligned with the healthy models; None where a seed has no value
            arr = np.asarray([v for v in values if v is not None], float)
            entry["measures"][key] = {
                "values": values, "n": len(arr),
                "mean": float(arr.mean()) if len(arr) else None,
                "std": float(arr.std(ddof=1)) if len(arr) > 1 else None,
            }
        out.append(entry)
    regular = next((e for e in out if e["regular"]), None)
    for e in out:
        if regular is None or e["regular"]:
            continue
        e["versus"] = regular["id"]
        for key, m in e["measures"].items():
            p = _welch_p(_present(m["values"]), _present(regular["measures"][key]["values"]))
            m["p_vs_regular"] = p
            m["differs"] = p is not None and p < ALPHA
    return out


def _fmt(v, kind):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.2f}%" if kind == "pct" else (f"{v:.4f}" if kind == "pass" else f"{v:.2f}")


def _cell(m: dict, kind: str) -> str:
    if not m or m["mean"] is None:
        return "–"
    text = _fmt(m["mean"], kind) + (f" ± {_fmt(m['std'], kind).rstrip('%')}" if m["std"] is not None else "")
    return text + (" **\\***" if m.get("differs") else "")


def table(summary: list[dict], title: str, paper: dict[str, dict] | None = None, note: str = "") -> str:
    """Markdown: mean ± sd over seeds per row (the paper's single run below it), then the per-seed values."""
    present = [m for m in MEASURES if any(e["measures"].get(m[0], {}).get("n") for e in summary)]
    n = sorted({e["n_seeds"] for e in summary})
    if not present:
        status = "; ".join(f"{name}: {st}" for e in summary for name, st in e["unhealthy"].items())
        return f"# {title}\n\nNo healthy model has results, nothing to summarise ({status or 'no models'}).\n"
    n_text = str(n[0]) if len(n) == 1 else "/".join(map(str, n))
    lines = [f"# {title}: mean ± standard deviation over {n_text} seeds", "",
             "| model | β | ε | ratio | seeds | source | " + " | ".join(m[1] for m in present) + " |",
             "|" + " --- |" * (6 + len(present))]
    for e in summary:
        hyper = " | ".join(f"{e[k]:.{d}f}" if not isinstance(e[k], dict) else "per layer"
                           for k, d in (("beta", 2), ("epsilon", 3), ("ratio", 2)))
        bad = f" ({len(e['unhealthy'])} unhealthy, not averaged)" if e["unhealthy"] else ""
        lines.append(f"| {e['id']} | {hyper} | {e['n_seeds']}{bad} | ours | "
                     + " | ".join(_cell(e["measures"].get(k), kind) for k, _, kind in present) + " |")
        if paper and e["id"] in paper:
            p = paper[e["id"]]
            lines.append(f"| {e['id']} | | | | 1 | paper | "
                         + " | ".join(_fmt(p.get(k), kind) for k, _, kind in present) + " |")
    lines += ["", f"**\\*** : the BANG row's seeds differ from the regular row's (Welch's t-test, two-sided, "
              f"p < {ALPHA}). ± is the sample standard deviation over seeds.", "", "Per seed:", "",
              "| model | " + " | ".join(m[1] for m in present) + " |", "|" + " --- |" * (1 + len(present))]
    for e in summary:
        healthy = [x for x in e["models"] if x not in e["unhealthy"]]
        for name in e["models"]:
            if name in e["unhealthy"]:
                lines.append(f"| {name} | **{e['unhealthy'][name]}** |" + " – |" * (len(present) - 1))
                continue
            k = healthy.index(name)
            lines.append(f"| {name} | " + " | ".join(
                _fmt(e["measures"][key]["values"][k], kind) if k < len(e["measures"].get(key, {}).get("values", []))
                else "–" for key, _, kind in present) + " |")
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def plot(summary: list[dict], path: Path, title: str):
    """One panel per measure: each seed a dot, the mean a bar with ± sd; a star marks a difference from the
    regular row (Welch, p < 0.05)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    present = [m for m in MEASURES if any(e["measures"].get(m[0], {}).get("n") for e in summary)]
    if not present:  # no healthy model has any measure: nothing to draw
        return None
    cols = min(4, len(present))
    nrows = math.ceil(len(present) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.9 * nrows), squeeze=False)
    x = np.arange(len(summary))
    for ax, (key, label, kind) in zip(axes.ravel(), present):
        for i, e in enumerate(summary):
            m = e["measures"].get(key)
            if not m or not m["n"]:
                continue
            ax.bar(i, m["mean"], yerr=m["std"] or 0, color="C0" if e["regular"] else "C1", alpha=0.45,
                   capsize=4, width=0.6)
            jitter = np.linspace(-0.15, 0.15, m["n"]) if m["n"] > 1 else np.zeros(1)
            ax.scatter(i + jitter, _present(m["values"]), s=12, color="black", zorder=3)
            if m.get("differs"):
                ax.annotate("*", (i, m["mean"]), textcoords="offset points", xytext=(0, 8), ha="center",
                            fontsize=14)
        lo = min(_present(e["measures"][key]["values"]).min() for e in summary if e["measures"].get(key, {}).get("n"))
        hi = max(_present(e["measures"][key]["values"]).max() for e in summary if e["measures"].get(key, {}).get("n"))
        if kind == "pct" and lo > 50:  # accuracies near 100 %: zoom, and say so on the axis
            pad = max(0.2, (hi - lo) * 0.5)
            ax.set_ylim(lo - pad, min(100.0, hi + pad))
            label += " (zoomed)"
        ax.set_title(label, fontsize=9)
        ax.set_xticks(x, [e["id"] for e in summary], fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    for ax in axes.ravel()[len(present):]:
        ax.axis("off")
    n = sorted({e["n_seeds"] for e in summary})
    fig.suptitle(f"{title} — {'/'.join(map(str, n))} seeds (dots), mean ± sd (bars); * differs from the regular "
                 "row (Welch p < 0.05)", fontsize=9)
    fig.tight_layout()
    atomic = Path(path)
    fig.savefig(atomic.with_suffix(".tmp.png"), dpi=110)
    plt.close(fig)
    atomic.with_suffix(".tmp.png").replace(atomic)
    return fig


def write(out: Path, summary: list[dict], text: str) -> None:
    atomic_write(out / "seeds.json", (json.dumps(summary, indent=2) + "\n").encode())
    atomic_write(out / "seeds.md", text.encode())
