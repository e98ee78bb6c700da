"""Tables and figures of an experiment run (paper-style Markdown tables, PNG figures)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bang_jax.checkpoint import atomic_write

COLUMNS = [
    ("accuracy", "Accuracy", "pct"),
    ("fgs_rate", "FGS rate", "pct"),
    ("fgs_pass_mean", "FGS PASS", "pass"),
    ("fgs_linf_mean", "FGS L∞", "linf"),
    ("fgs_exact_rate", "FGS-exact rate", "pct"),
    ("hc1_rate", "HC1 rate", "pct"),
    ("hc1_pass_mean", "HC1 PASS", "pass"),
    ("hc1_linf_mean", "HC1 L∞", "linf"),
]


def _cell(row: dict, key: str, kind: str) -> str:
    v = row.get(key)
    if v is None:
        return "–"
    if kind == "pct":
        return f"{v:.2f}%"
    std = row.get(key.replace("_mean", "_std"))
    fmt = "{:.4f}" if kind == "pass" else "{:.2f}"
    return fmt.format(v) + (f" ± {fmt.format(std)}" if std is not None and key.endswith("_mean") else "")


def _hyper(value, digits: int) -> str:
    """A hyperparameter for a table cell: a number, or a per-layer mapping written out."""
    if isinstance(value, dict):
        return " ".join(f"{k}:{_hyper(v, digits)}" for k, v in value.items())
    return f"{value:.{digits}f}"


def table_lines(results: list[dict], paper: dict[str, dict]) -> list[str]:
    """The Markdown table of the paper's Table 1/2 layout, our row above the paper's for each model."""
    head = "| model | β | ε | ratio | source | " + " | ".join(c[1] for c in COLUMNS) + " |"
    lines = [head, "|" + " --- |" * (5 + len(COLUMNS))]
    for r in results:
        beta, eps, ratio = (_hyper(r[k], digits) for k, digits in (("beta", 2), ("epsilon", 3), ("ratio", 2)))
        if r.get("status", "ok") != "ok":  # a diverged model: its status instead of numbers
            lines.append(f"| {r['id']} | {beta} | {eps} | {ratio} | ours | **{r['status']}** ("
                         f"{r.get('status_detail', '')}) |" + " – |" * (len(COLUMNS) - 1))
        else:
            lines.append(f"| {r['id']} | {beta} | {eps} | {ratio} | ours | "
                         + " | ".join(_cell(r, k, kind) for k, _, kind in COLUMNS) + " |")
        if r["id"] in paper:
            lines.append(
                f"| {r['id']} | | | | paper | "
                + " | ".join(_cell(paper[r["id"]], k, kind) for k, _, kind in COLUMNS)
                + " |"
            )
    return lines


def write_table(path: Path, title: str, results: list[dict], paper: dict[str, dict], note: str = "") -> str:
    """``# title``, :func:`table_lines` and the note, written to ``path``; returns the text."""
    lines = [f"# {title}", "", *table_lines(results, paper)]
    if note:
        lines += ["", note]
    text = "\n".join(lines) + "\n"
    atomic_write(path, text.encode())
    return text


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_hc1_examples(path: Path, originals, adversarial: dict[str, np.ndarray], title: str):
    """Fig. 1: originals and, per model, the minimal HC1 adversarial image and its perturbation.

    All perturbation panels share one symmetric colour scale (the largest |perturbation| of any model) and one
    colour bar, so models can be compared. Returns the figure.
    """
    plt = _plt()
    names = list(adversarial)
    n = len(originals)
    rows = 1 + 2 * len(names)
    fig, axes = plt.subplots(rows, n, figsize=(1.4 * n, 1.5 * rows), squeeze=False)

    def show(ax, img):
        """A pixel image: grayscale for one channel, RGB otherwise."""
        img = np.clip(np.asarray(img), 0, 255)
        if img.shape[-1] == 1:
            ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=255)
        else:
            ax.imshow(img.astype(np.uint8))

    deltas = {name: np.asarray(adversarial[name], np.float32) - np.asarray(originals, np.float32) for name in names}
    lim = max([1.0] + [float(np.abs(d).max()) for d in deltas.values()])  # one colour scale for every panel
    mappable = None
    for j in range(n):
        show(axes[0, j], originals[j])
        for i, name in enumerate(names):
            show(axes[1 + 2 * i, j], adversarial[name][j])
            delta = deltas[name][j]
            mappable = axes[2 + 2 * i, j].imshow(delta.mean(axis=-1), cmap="RdBu_r", vmin=-lim, vmax=lim)
            axes[2 + 2 * i, j].set_xlabel(f"L∞ {np.abs(delta).max():.0f}", fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_ylabel("original", fontsize=8)
    for i, name in enumerate(names):
        axes[1 + 2 * i, 0].set_ylabel(f"{name} HC1", fontsize=8)
        axes[2 + 2 * i, 0].set_ylabel(f"{name} pert.", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if mappable is not None:
        fig.colorbar(
            mappable, ax=axes[2::2, :].ravel().tolist(), shrink=0.8, label="perturbation (pixels; channel mean)"
        )
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


def plot_grid(path: Path, results: list[dict], title: str):
    """Figs. 2/4: accuracy, FGS rate and HC1 PASS over the β×ε grid (bilinear interpolation)."""
    plt = _plt()
    bang = [r for r in results if not r.get("regular")]
    panels = [("accuracy", "accuracy (%)"), ("fgs_rate", "FGS success (%)"), ("hc1_pass_mean", "HC1 PASS")]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (key, label) in zip(axes, panels):
        pts = [(r["epsilon"], r["beta"], r.get(key)) for r in bang if r.get(key) is not None]
        e, b, v = (np.asarray(c, float) for c in zip(*pts)) if pts else (np.zeros(0),) * 3
        if len(pts) >= 3 and len(set(e)) > 1 and len(set(b)) > 1:
            # linear interpolation over the triangulated (ε, β) points, as the paper's interpolated maps
            cs = ax.tricontourf(e, b, v, levels=20, cmap="viridis")
            fig.colorbar(cs, ax=ax)
        ax.scatter(e, b, c="white", edgecolors="black", s=12)
        ax.set_xlabel("ε")
        ax.set_ylabel("β")
        ax.set_title(label)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig
