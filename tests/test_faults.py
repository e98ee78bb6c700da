"""Ordinary faults end in one line and a non-zero exit, before any long work, with nothing on disk lost."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bang_jax import checkpoint as ckpt_lib

ROOT = Path(__file__).resolve().parents[1]


def _py(*args, env=None):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def _one_error_line(res):
    errors = [line for line in res.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    return errors[0]


@pytest.fixture(scope="module")
def weights():
    from conftest import real_data_dir

    d = real_data_dir()
    path = Path(d or "") / "bang_caffe" / "lenet.caffemodel.h5"
    if d is None or not path.is_file():
        pytest.skip("the authors' LeNet weights are not available (BANG_DATA_DIR/bang_caffe)")
    return str(path)


@pytest.mark.parametrize("extra,needle", [
    (["--attacks", "pgd", "--pgd-eps", ""], "pgd_budgets is empty"),
    (["--attacks", "square", "--square-eps", ""], "--square-budgets is empty"),
    (["--curve-eps", "1,2"], "needs --curves"),
    (["--plot", "x.png"], "needs --curves"),
    (["--json", "/proc/nonexistent/out.json"], "does not exist"),
])
def test_evaluate_refuses_asked_for_work_it_would_skip_or_lose(weights, extra, needle):
    res = _py("-m", "bang_jax.evaluate", "--caffe-weights", weights, "--dataset", "mnist", "--no-progress", *extra)
    assert res.returncode == 2
    assert needle in res.stderr.strip().splitlines()[-1], res.stderr[-2000:]
    assert "Traceback" not in res.stderr


def test_experiment_outputs_that_cannot_be_written_are_found_first(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, needle in (("/proc/x", "cannot be created"), (str(afile), "is not a directory")):
        res = _py("-m", "experiments.mnist", "--preset", "smoke", "--no-progress", "--out", out)
        assert res.returncode == 2 and needle in _one_error_line(res), res.stderr[-2000:]
    assert afile.read_text() == "x"
    res = _py("-m", "experiments.mnist", "--preset", "smoke", "--no-progress", "--attacks", "pgd", "--pgd-eps", "",
              "--out", str(tmp_path / "run"))
    assert res.returncode == 2 and "pgd_budgets is empty" in _one_error_line(res)
    assert not (tmp_path / "run").exists()


def test_a_broken_config_json_is_named(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"version": 2, "dataset": ')
    res = _py("-m", "experiments.mnist", "--preset", "smoke", "--no-progress", "--out", str(run), "--resume")
    assert res.returncode == 2 and "config.json" in _one_error_line(res), res.stderr[-2000:]
    assert (run / "config.json").read_text() == '{"version": 2, "dataset": '  # left as it was


def test_disk_full_at_a_checkpoint_says_so_and_keeps_the_last_one(tmp_path, monkeypatch, capsys):
    """The second checkpoint write fails with ENOSPC: exit 1, one line naming the fault and the checkpoint to
    resume from, which is still whole; --resume then finishes the run."""
    from experiments import mnist

    out = tmp_path / "run"
    args = ["--preset", "smoke", "--no-progress", "--out", str(out), "--steps", "40", "--checkpoint-every", "20",
            "--stages", "train"]
    real = ckpt_lib.atomic_write
    calls = {"n": 0}

    def full_disk(path, data, *a, **k):
        if Path(path).name == "state.msgpack":
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, data, *a, **k)

    monkeypatch.setattr(ckpt_lib, "atomic_write", full_disk)
    with pytest.raises(SystemExit) as info:
        mnist.main(args)
    assert info.value.code == 1
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if x.startswith("error")]
    assert len(line) == 1 and "No space left on device" in line[0] and "iteration 20" in line[0], err[-2000:]
    assert ckpt_lib.checkpoint_info(out)["iteration"] == 20
    ckpt_lib.load_params(out)  # whole
    monkeypatch.setattr(ckpt_lib, "atomic_write", real)
    mnist.main(args + ["--resume"])
    assert ckpt_lib.checkpoint_info(out)["iteration"] == 40
    assert json.loads((out / "config.json").read_text())["train"]["steps"] == 40
