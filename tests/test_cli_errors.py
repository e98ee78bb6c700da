"""Bad input stops before any work with one line naming the problem, exit status 2, and no traceback."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import mnist

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, env_extra=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env_extra or {}))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    mnist.main(["--preset", "smoke", "--out", str(out), "--steps", "6", "--log-every", "3", "--checkpoint-every",
                "3", "--noise-every", "0", "--attacks", "", "--test-limit", "50", "--no-progress"])
    return out


def test_evaluate_cli_rejects_bad_arguments_before_any_work(tmp_path, data_dir, tiny_run):
    weights = data_dir / "bang_caffe" / "lenet.caffemodel.h5"
    if not weights.is_file():
        pytest.skip("released weights not available")
    base = ["-m", "bang_jax.evaluate", "--no-progress"]
    lenet = [*base, "--caffe-weights", str(weights), "--dataset", "mnist"]
    cases = [
        ([*lenet, "--attacks", "fgs,cw"], "--attacks: attacks: unknown attack(s) cw"),
        ([*lenet, "--limit", "-5"], "--limit must be a positive integer, got -5"),
        ([*lenet, "--limit", "0"], "--limit must be a positive integer, got 0"),
        ([*lenet, "--hc1-max-step", "-3"], "--hc1-max-step: hc1_max_step must be a positive integer"),
        ([*lenet, "--json", str(tmp_path / "missing" / "out.json")], "does not exist"),
        ([*lenet, "--json", str(tmp_path)], "is a directory"),
        ([*lenet, "--pgd-eps", "16,x", "--attacks", "pgd"], "--pgd-budgets must be a float, got 'x'"),
        ([*lenet, "--pgd-eps", "", "--attacks", "pgd"], "pgd_budgets is empty"),
        ([*lenet, "--curve-eps", "0,8"], "needs --curves"),
        ([*lenet, "--plot", str(tmp_path / "p.png")], "--plot needs --curves"),
        ([*base, "--caffe-weights", str(tmp_path / "none.h5"), "--dataset", "mnist"], "does not exist"),
        ([*base, "--caffe-weights", str(weights)], "needs --dataset"),
        ([*base, "--caffe-weights", str(weights), "--dataset", "cifar10"], "do not fit cifar10"),
        ([*lenet, "--data-dir", str(tmp_path / "nowhere")], "does not exist"),
        ([*base, "--run-dir", str(tmp_path)], "no config.json"),
        ([*base, "--run-dir", str(tiny_run), "--models", "B7"], "B7 not in"),
    ]
    for args, message in cases:
        res = _cli(*args)
        assert res.returncode == 2, (args, res.stderr[-1500:])
        assert message in res.stderr, (args, res.stderr[-1500:])
        assert "Traceback" not in res.stderr, (args, res.stderr[-1500:])
    assert not any(tmp_path.iterdir())  # nothing was written
    res = _cli(*lenet, "--attacks", "fgs,cw", "--debug")
    assert "Traceback" in res.stderr


def test_evaluate_cli_evaluates_a_run_trained_here(tmp_path, tiny_run):
    out = tmp_path / "eval.json"
    res = _cli("-m", "bang_jax.evaluate", "--run-dir", str(tiny_run), "--models", "B1", "--attacks", "fgs",
               "--limit", "60", "--no-progress", "--json", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads(out.read_text())  # the layout of the run's results.json: a list of rows
    assert [r["id"] for r in rows] == ["B1"] and rows[0]["iteration"] == 6 and rows[0]["test_images"] == 60
    assert rows[0]["data_source"] and "data:" in res.stderr and "fgs_rate" in rows[0]


def test_a_model_with_nan_weights_gets_a_status_not_numbers_through_both_doors(tmp_path, tiny_run):
    """Health before numbers: a checkpoint whose B1 weights hold a NaN is reported as such (terminal, results.json,
    table), with no attack rates, and the evaluate stage and evaluate --run-dir agree byte for byte."""
    import shutil

    from flax import serialization

    from bang_jax import checkpoint as ckpt

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    state, info = ckpt._read_checkpoint(run)
    bias = state["params"]["ip2"]["bias"].copy()
    bias[1, 0] = float("nan")  # model 1 (B1)
    state["params"]["ip2"]["bias"] = bias
    payload = {"state": state, "info": json.dumps(info)}
    ckpt.atomic_write(run / ckpt.STATE, serialization.msgpack_serialize(payload))
    res = _cli("-m", "experiments.mnist", "--out", str(run), "--stages", "evaluate,report", "--attacks", "fgs",
               "--no-progress")
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads((run / "results.json").read_text())
    r0, b1 = rows
    assert r0["status"] == "ok" and "fgs_rate" in r0
    assert b1["status"] == "non-finite weights" and "ip2" in b1["status_detail"]
    assert not any(k.startswith(("fgs", "hc1", "pgd", "square")) for k in b1)
    assert "| B1 |" in (run / "table1.md").read_text() and "**non-finite weights**" in (run / "table1.md").read_text()
    out = tmp_path / "cli.json"
    res = _cli("-m", "bang_jax.evaluate", "--run-dir", str(run), "--no-progress", "--json", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "NON-FINITE WEIGHTS" in res.stdout
    assert out.read_bytes() == (run / "results.json").read_bytes()
