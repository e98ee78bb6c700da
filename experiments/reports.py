"""Tables and figures of an experiment run (paper-style Markdown tables, PNG figures)."""

from __future__ import annotations

import textwrap
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


def plot_hc1_examples(path: Path, originals, adversarial: dict[str, np.ndarray], title: str, *,
                      predicted: dict[str, np.ndarray] | None = None, failed: dict[str, np.ndarray] | None = None,
                      labels=None):
    """Fig. 1: originals and, per model, the minimal HC1 adversarial image and its perturbation.

    Rows: the originals, then per model its adversarial images and their perturbations (adversarial − original;
    the channel mean for colour images); one column per image, every panel the same size. All perturbation
    panels share one symmetric colour scale (the largest |perturbation| of any model) and one colour bar, in its
    own column on the right, so models can be compared.

    ``predicted`` (optional, per model): the class each adversarial image is classified as, written "→ k" under
    it. ``failed`` (optional, per model, bool per image): no adversarial was found; such images say "failed"
    instead of their L∞. Where ``failed`` does not name a model, an image counts as failed when its adversarial
    equals the original everywhere (what the line search returns when it finds nothing). ``labels`` (optional):
    the true classes, written above the originals. Writes ``path`` (PNG) and returns the figure.
    """
    plt = _plt()
    names = list(adversarial)
    originals = np.asarray(originals, np.float32)
    n = len(originals)
    rows = 1 + 2 * len(names)
    predicted, failed = predicted or {}, failed or {}
    advs = {name: np.asarray(adversarial[name], np.float32) for name in names}
    deltas = {name: advs[name] - originals for name in names}
    fails = {
        name: np.asarray(failed[name], bool).reshape(n) if name in failed
        else ~np.any(deltas[name].reshape(n, -1) != 0, axis=1)
        for name in names
    }
    lim = max([1.0] + [float(np.abs(d).max()) for d in deltas.values()])  # one colour scale for every panel

    cell, gap, bar = 1.25, 0.12, 0.14  # inches: an image panel; the space before the colour bar; its width
    width = n * cell + gap + bar + 2.1  # and room for the row labels and the colour bar's ticks and label
    height = rows * (cell + 0.3) + 0.6
    fig = plt.figure(figsize=(width, height), layout="constrained")
    # one column per image, an empty spacer and a narrow last column for the colour bar: every image cell has
    # the same size, and the colour bar never covers an image
    grid = fig.add_gridspec(rows, n + 2, width_ratios=[cell] * n + [gap, bar])
    axes = np.array([[fig.add_subplot(grid[i, j]) for j in range(n)] for i in range(rows)])

    def show(ax, img):
        """A pixel image: grayscale for one channel, RGB otherwise."""
        img = np.clip(np.asarray(img), 0, 255)
        if img.shape[-1] == 1:
            ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=255)
        else:
            ax.imshow(np.rint(img).astype(np.uint8))

    mappable = None
    for j in range(n):
        show(axes[0, j], originals[j])
        if labels is not None:
            axes[0, j].set_title(f"class {int(np.asarray(labels)[j])}", fontsize=8)
        for i, name in enumerate(names):
            ax_adv, ax_pert = axes[1 + 2 * i, j], axes[2 + 2 * i, j]
            show(ax_adv, advs[name][j])
            delta = deltas[name][j]
            mappable = ax_pert.imshow(delta.mean(axis=-1), cmap="RdBu_r", vmin=-lim, vmax=lim)
            if fails[name][j]:
                ax_adv.set_xlabel("no adversarial", fontsize=8, color="tab:red")
                ax_pert.set_xlabel("failed", fontsize=8, color="tab:red", fontweight="bold")
            else:
                if name in predicted:
                    ax_adv.set_xlabel(f"→ {int(np.asarray(predicted[name])[j])}", fontsize=8)
                ax_pert.set_xlabel(f"L∞ {np.abs(delta).max():.0f}", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])

    def row_label(name, what):
        return textwrap.fill(name, 14) + "\n" + what

    axes[0, 0].set_ylabel("original", fontsize=8)
    for i, name in enumerate(names):
        axes[1 + 2 * i, 0].set_ylabel(row_label(name, "HC1 adversarial"), fontsize=8)
        axes[2 + 2 * i, 0].set_ylabel(row_label(name, "perturbation"), fontsize=8)
    if mappable is not None:
        cax = fig.add_subplot(grid[2:, n + 1])  # beside the perturbation rows, in a column of its own
        colour_bar = fig.colorbar(mappable, cax=cax)
        colour_bar.set_label("perturbation\n(pixels; channel mean)", fontsize=8)
        colour_bar.ax.tick_params(labelsize=7)
    fig.suptitle(textwrap.fill(title, max(20, int((n * cell + 1.2) * 72 / 10 / 0.65))), fontsize=10)
    # The images keep their aspect, so a layout cell wider (or taller) than its image leaves a gap: shrink the
    # figure by what is spare until the cells fit the images (the margins are text, fixed in inches).
    aspect = originals.shape[1] / originals.shape[2]  # height / width of an image
    for _ in range(3):
        fig.draw_without_rendering()
        box = axes[0, 0].get_position(original=True)
        cw, ch = box.width * fig.get_figwidth(), box.height * fig.get_figheight()
        spare_w, spare_h = max(0.0, cw - ch / aspect), max(0.0, ch - cw * aspect)
        if spare_w < 0.02 and spare_h < 0.02:
            break
        fig.set_size_inches(fig.get_figwidth() - spare_w * (n * cell + gap + bar) / cell,
                            fig.get_figheight() - spare_h * rows)
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
