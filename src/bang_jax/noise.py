"""Robustness to random Gaussian noise over training (paper Figs. 3 and 5, docs/semantics.md).

Protocol: pick ``per_class`` test images per class that **every** compared model classifies correctly at every
tested checkpoint (first ones in test-set order); add Gaussian noise of standard deviation σ (pixel units) to
each image ``copies`` times per σ; report the percentage of noisy copies whose predicted label differs from the
clean prediction, for every model, checkpoint and σ. Noisy images are clipped to 0..255 (not rounded).
The paper uses 100 images per class and 1,000 copies, σ up to 100 (MNIST) or 40 (CIFAR), checkpoints every 500
iterations (LeNet) or every 2nd epoch (CIFAR).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["NoiseStudy", "flip_rates", "noise_study", "plot_noise_study", "select_noise_images"]


def select_noise_images(predictions: Sequence[np.ndarray], labels, *, per_class: int = 100) -> np.ndarray:
    """Indices of the first ``per_class`` images per class that all ``predictions`` (``[N]`` labels) get right.

    Raises ValueError if some class has fewer such images.
    """
    labels = np.asarray(labels)
    ok = np.ones(labels.shape, bool)
    for p in predictions:
        ok &= np.asarray(p) == labels
    chosen = []
    for c in np.unique(labels):
        idx = np.flatnonzero(ok & (labels == c))[:per_class]
        if len(idx) < per_class:
            raise ValueError(f"class {c}: only {len(idx)} images are correct for every model and checkpoint")
        chosen.append(idx)
    return np.sort(np.concatenate(chosen))


def _make_counter(apply_fn):
    @jax.jit
    def count(variables, images, key, sigma):
        """images [B, ...], key → number of flips per image [B] for one batch of copies [K, B, ...] (K from key
        shape)."""
        clean = jnp.argmax(apply_fn(variables, images), axis=-1)
        k = key.shape[0]
        noise = jax.vmap(lambda kk: jax.random.normal(kk, images.shape, jnp.float32))(key)
        noisy = jnp.clip(images[None] + sigma * noise, 0.0, 255.0).reshape((-1,) + images.shape[1:])
        pred = jnp.argmax(apply_fn(variables, noisy), axis=-1).reshape(k, images.shape[0])
        return jnp.sum(pred != clean[None], axis=0)

    return count


def flip_rates(
    apply_fn: Callable,
    variables,
    images,
    sigmas: Sequence[float],
    *,
    copies: int = 1000,
    seed: int = 0,
    copies_per_call: int = 50,
    _counter=None,
) -> np.ndarray:
    """Percentage of noisy copies whose label differs from the clean prediction, one value per σ.

    ``apply_fn(variables, images) -> logits`` (test mode). The noise for σ index s and image batch comes from
    ``fold_in(PRNGKey(seed), s)``, so every model and checkpoint sees the same noise draws.
    """
    count = _counter or _make_counter(apply_fn)
    x = jnp.asarray(images, jnp.float32)
    out = []
    for s, sigma in enumerate(sigmas):
        base = jax.random.fold_in(jax.random.PRNGKey(seed), s)
        flips = 0
        for start in range(0, copies, copies_per_call):
            k = min(copies_per_call, copies - start)
            keys = jax.random.split(jax.random.fold_in(base, start), k)
            flips += int(jnp.sum(count(variables, x, keys, jnp.float32(sigma))))
        out.append(100.0 * flips / (copies * len(images)))
    return np.asarray(out)


@dataclasses.dataclass
class NoiseStudy:
    """Flip rates (percent) ``rates[name]`` of shape ``[len(iterations), len(sigmas)]``."""

    iterations: list[int]
    sigmas: list[float]
    rates: dict[str, np.ndarray]
    image_indices: np.ndarray
    copies: int

    def to_json(self) -> dict:
        return {
            "iterations": list(self.iterations),
            "sigmas": list(self.sigmas),
            "rates": {k: v.tolist() for k, v in self.rates.items()},
            "image_indices": self.image_indices.tolist(),
            "copies": self.copies,
        }


def noise_study(
    apply_fn: Callable,
    checkpoints: Mapping[str, Sequence[tuple[int, dict]]],
    images,
    labels,
    sigmas: Sequence[float],
    *,
    per_class: int = 100,
    copies: int = 1000,
    seed: int = 0,
    progress: bool = True,
) -> NoiseStudy:
    """Runs the protocol for every model (``name → [(iteration, variables), …]``, the same iterations each)."""
    names = list(checkpoints)
    iterations = [it for it, _ in checkpoints[names[0]]]
    for name in names:
        if [it for it, _ in checkpoints[name]] != iterations:
            raise ValueError("every model needs checkpoints at the same iterations")
    predict = jax.jit(lambda v, x: jnp.argmax(apply_fn(v, x), axis=-1))
    x_all = np.asarray(images, np.float32)
    preds = []
    for name in names:
        for _, variables in checkpoints[name]:
            preds.append(
                np.concatenate(
                    [np.asarray(predict(variables, x_all[i : i + 2000])) for i in range(0, len(x_all), 2000)]
                )
            )
    idx = select_noise_images(preds, labels, per_class=per_class)
    x = x_all[idx]
    counter = _make_counter(apply_fn)
    rates = {}
    total = len(names) * len(iterations)
    bar = None
    if progress:
        from tqdm.auto import tqdm  # noqa: PLC0415

        bar = tqdm(total=total, desc="noise study", unit="ckpt")
    for name in names:
        rows = []
        for _, variables in checkpoints[name]:
            rows.append(flip_rates(apply_fn, variables, x, sigmas, copies=copies, seed=seed, _counter=counter))
            if bar is not None:
                bar.update(1)
        rates[name] = np.stack(rows)
    if bar is not None:
        bar.close()
    return NoiseStudy(iterations, list(map(float, sigmas)), rates, idx, copies)


def _cell_edges(centres: Sequence[float]) -> np.ndarray:
    """Edges of cells centred on the (sorted) measured values: midpoints inside, half a step beyond the ends."""
    c = np.asarray(centres, float)
    if len(c) == 1:
        return np.array([c[0] - 0.5, c[0] + 0.5])
    mid = (c[1:] + c[:-1]) / 2
    return np.concatenate([[c[0] - (mid[0] - c[0])], mid, [c[-1] + (c[-1] - mid[-1])]])


def plot_noise_study(study: NoiseStudy, path, *, names: Sequence[str] | None = None, title: str = ""):
    """Heat maps (iteration × σ) of two models and their difference; returns the matplotlib figure.

    Each measured (iteration, σ) is one cell centred on its values, so nothing is drawn where nothing was
    measured. The third panel is the difference ``rate(first) − rate(second)`` in percentage points (positive:
    the second model flips fewer noisy copies).
    """
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    names = list(names or study.rates)[:2]
    panels = [(n, study.rates[n], "viridis", "% noisy copies misclassified") for n in names]
    if len(names) == 2:
        panels.append(
            (
                f"{names[0]} − {names[1]}",
                study.rates[names[0]] - study.rates[names[1]],
                "RdBu_r",
                "difference (percentage points)",
            )
        )
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 4), squeeze=False)
    x_edges, y_edges = _cell_edges(study.sigmas), _cell_edges(study.iterations)
    vmax = max(float(np.max(study.rates[n])) for n in names) or 1.0
    for ax, (label, values, cmap, bar_label) in zip(axes[0], panels):
        if cmap == "viridis":
            kw = dict(vmin=0, vmax=vmax)
        else:
            lim = float(np.abs(values).max()) or 1.0
            kw = dict(vmin=-lim, vmax=lim)
        mesh = ax.pcolormesh(x_edges, y_edges, values, cmap=cmap, shading="flat", **kw)
        ax.set_xticks(study.sigmas if len(study.sigmas) <= 12 else study.sigmas[:: len(study.sigmas) // 10 + 1])
        ax.set_yticks(
            study.iterations if len(study.iterations) <= 12 else study.iterations[:: len(study.iterations) // 10 + 1]
        )
        ax.set_xlabel("noise σ (pixels)")
        ax.set_ylabel("training iteration")
        ax.set_title(label)
        fig.colorbar(mesh, ax=ax, label=bar_label)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig
