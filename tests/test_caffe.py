"""The authors' released Caffe weights load and give the paper's accuracies (docs/semantics.md, Tables 1–2)."""

import numpy as np
import pytest

from bang_jax.caffe import load_caffe_weights
from bang_jax.data import mean_image
from bang_jax.evaluate import evaluate_accuracy

PAPER = {"lenet": 99.16, "lenet_bang": 99.22, "cifar10": 79.59, "cifar10_bang": 79.26}


@pytest.mark.parametrize("name", list(PAPER))
def test_released_weights_reach_the_papers_accuracy(data_dir, request, name):
    path = data_dir / "bang_caffe" / f"{name}.caffemodel.h5"
    if not path.is_file():
        pytest.skip(f"{path} not available")
    ds = request.getfixturevalue("cifar10" if name.startswith("cifar") else "mnist")
    mean = mean_image(ds.train_images) if name.startswith("cifar") else None
    model, variables = load_caffe_weights(path, mean_image=mean)
    acc = evaluate_accuracy(model, variables, ds.test_images, ds.test_labels)
    assert abs(acc - PAPER[name]) < 0.005, f"{name}: {acc:.2f}% vs paper {PAPER[name]}%"


def test_bad_weight_files(tmp_path):
    import h5py

    with pytest.raises(FileNotFoundError):
        load_caffe_weights(tmp_path / "missing.caffemodel.h5")
    path = tmp_path / "partial.caffemodel.h5"
    with h5py.File(path, "w") as f:
        f["data/conv1/0"] = np.zeros((20, 1, 5, 5), np.float32)
        f["data/conv1/1"] = np.zeros((20,), np.float32)
    with pytest.raises(ValueError, match="conv2"):
        load_caffe_weights(path)
    bad = tmp_path / "lenet.caffemodel.h5"  # right name, wrong bytes
    bad.write_bytes(path.read_bytes())
    with pytest.raises(ValueError, match="SHA-256"):
        load_caffe_weights(bad)


def test_unreadable_wrong_model_and_nan_weights_name_the_file(tmp_path, data_dir):
    import h5py

    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not an hdf5 file at all")
    with pytest.raises(ValueError, match="junk.h5 is not a readable HDF5"):
        load_caffe_weights(junk)
    released = data_dir / "bang_caffe" / "lenet.caffemodel.h5"
    if not released.is_file():
        pytest.skip("released weights not available")
    cut = tmp_path / "cut.h5"
    cut.write_bytes(released.read_bytes()[:5000])
    with pytest.raises(ValueError, match="cut.h5 is not a readable HDF5"):
        load_caffe_weights(cut)
    with pytest.raises(ValueError, match="LeNet weights, which do not fit cifar10"):
        load_caffe_weights(released, dataset="cifar10")
    nan = tmp_path / "nan.h5"
    nan.write_bytes(released.read_bytes())
    with h5py.File(nan, "r+") as f:
        w = f["data/ip2/0"][...]
        w[0, 0] = np.nan
        f["data/ip2/0"][...] = w
    with pytest.raises(ValueError, match="NaN or infinite numbers in layer"):
        load_caffe_weights(nan)
