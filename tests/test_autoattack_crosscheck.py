"""Our AutoAttack against the reference implementation (torchattacks 3.5.1) on the authors' released LeNet B1:
same weights (a PyTorch port), same 200 test images, each attack alone and the whole ensemble. Several minutes on
a 2-core CPU, so marked slow; needs the crosscheck extra (PyTorch) and the weights, else skipped."""

import pytest

pytest.importorskip("torch")
pytest.importorskip("torchattacks")

pytestmark = pytest.mark.slow


def test_robust_accuracy_agrees_with_torchattacks_within_one_point(data_dir):
    import sys
    from pathlib import Path

    weights = data_dir / "bang_caffe" / "lenet_bang.caffemodel.h5"
    if not weights.is_file():
        pytest.skip("the authors' weights are not in BANG_DATA_DIR/bang_caffe")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from autoattack_crosscheck import main

    report = main(["--weights", str(weights), "--dataset", "mnist", "--data-dir", str(data_dir), "--limit", "200",
                   "--eps", "32"])
    assert report["same_predictions"] and report["max_abs_logit_difference"] < 1e-3
    for name, row in report["attacks"].items():
        assert abs(row["robust_ours"] - row["robust_reference"]) <= 1.0, (name, row)
