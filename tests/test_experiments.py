"""The experiment entry points end to end: smoke presets, run-directory contents, kill and resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flax import serialization

from experiments import cifar10, mnist

RESULT_KEYS = {
    "id", "beta", "epsilon", "ratio", "seed", "accuracy", "fgs_rate", "fgs_pass_mean", "fgs_pass_std",
    "fgs_linf_mean", "fgs_linf_std", "hc1_rate", "hc1_pass_mean", "hc1_pass_std", "hc1_linf_mean", "hc1_linf_std",
    "fgs_blank", "fgs_exact_rate", "fgs_exact_linf_mean", "fgs_exact_blank",
}
ROOT = Path(__file__).resolve().parents[1]


def test_mnist_smoke_preset_end_to_end(tmp_path):
    out = tmp_path / "run"
    results = mnist.main(["--preset", "smoke", "--out", str(out), "--no-progress"])
    names = {p.name for p in out.iterdir()}
    assert names >= {"config.json", "metrics.jsonl", "results.json", "checkpoints", "snapshots", "table1.md",
                     "noise.json", "noise.png", "fig1_hc1.png", "timings.json"}
    config = json.loads((out / "config.json").read_text())
    assert config["version"] == 2 and config["data_source"]
    assert config["train"]["steps"] == 60 and config["train"]["order"] == "sequential"
    assert [m["name"] for m in config["models"]] == ["R0", "B1"] and [m["seed"] for m in config["models"]] == [0, 3]
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    for r in saved:
        assert RESULT_KEYS <= set(r)
        assert 30.0 < r["accuracy"] <= 100.0  # 60 iterations already learn a lot
        assert 0 < r["attacked"] <= 500
    metrics = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "accuracy", "lr", "grad_norm", "kappa_zero_share"} <= set(metrics[-1])
    noise = json.loads((out / "noise.json").read_text())
    assert noise["iterations"] == [30, 60] and len(noise["rates"]["R0"][0]) == 3
    table = (out / "table1.md").read_text()
    assert "| R0 | | | | paper | 99.16% | 90.33%" in table and "| B1 | 1.00 | 0.815 |" in table
    assert "| R0 | 1.00 | 0.000 | 1.00 | ours |" in table


def _tree_bytes(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def test_finished_run_is_reevaluated_by_stages_without_retraining_and_guarded(tmp_path):
    """A per-layer ε model trains and reports; later stages re-evaluate it; wrong commands change nothing."""
    out = tmp_path / "run"
    spec = "R0,L(epsilon={conv1: 0.7, conv2: 0.75, ip1: 0.815, ip2: 0.9}, beta=1.1)"
    mnist.main(["--preset", "smoke", "--out", str(out), "--no-progress", "--models", spec, "--steps", "20",
                "--checkpoint-every", "10", "--log-every", "10", "--noise-every", "0", "--attacks", "fgs",
                "--test-limit", "100"])
    config = json.loads((out / "config.json").read_text())
    assert config["models"][1] == {"name": "L", "seed": 1, "beta": 1.1, "ratio": 1.0,
                                   "epsilon": {"conv1": 0.7, "conv2": 0.75, "ip1": 0.815, "ip2": 0.9}}
    assert "| L | 1.10 | conv1:0.700 conv2:0.750 ip1:0.815 ip2:0.900 |" in (out / "table1.md").read_text()
    checkpoint = (out / "checkpoints" / "state.msgpack").read_bytes()
    results = mnist.main(["--out", str(out), "--stages", "evaluate,report", "--attacks", "hc1", "--no-progress"])
    assert (out / "checkpoints" / "state.msgpack").read_bytes() == checkpoint
    assert [r["id"] for r in results] == ["R0", "L"]
    assert all("hc1_rate" in r and "fgs_rate" not in r for r in results)
    assert json.loads((out / "config.json").read_text())["eval"]["attacks"] == ["hc1"]

    before = _tree_bytes(out)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cases = [
        ([], "already holds a run"),  # rerun without --resume
        (["--resume", "--batch-size", "32"], "train.batch_size: 64 → 32"),
        (["--resume", "--models", "R0,B1"], "models"),
        (["--stages", "evaluate", "--attacks", "fgs,cw"], "unknown attack(s) cw"),
        (["--stages", "evaluate", "--steps", "0"], "--train.steps (--steps): steps must be a positive integer"),
        (["--stages", "evaluate,bogus"], "unknown stage(s) bogus"),
        (["--stages", "evaluate", "--noise-every", "-7"], "--noise-every must be a non-negative integer"),
        (["--resume", "--models", ""], "--models is empty"),
        (["--resume", "--seed-offset", "-100"], "seed must be a non-negative integer"),
        (["--overwrite", "--models", "R0,L(epsilon={conv1: 0.7, conv9: 0.75, ip1: 0.815, ip2: 0.9})"],
         "the lenet layers are conv1, conv2, ip1, ip2"),
        (["--resume", "--batch-size", "100000", "--data-dir", str(ROOT / "nowhere")], "batch_size"),
    ]
    for extra, message in cases:
        res = subprocess.run([sys.executable, "-m", "experiments.mnist", "--out", str(out), "--no-progress", *extra],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 2, (extra, res.stderr[-1500:])
        assert message in res.stderr and "Traceback" not in res.stderr, (extra, res.stderr[-1500:])
    assert _tree_bytes(out) == before
    # A run's data is part of its identity: without its data configured, resume, later stages and the evaluate
    # command stop with one line naming the data and the knob, and never fall back to other data.
    no_data = {k: v for k, v in env.items() if k != "BANG_DATA_DIR"}
    config_bytes = (out / "config.json").read_bytes()  # the run's data folder has "moved away":
    moved = json.loads(config_bytes) | {"data_source": "files:" + str(tmp_path / "moved" / "mnist")}
    (out / "config.json").write_text(json.dumps(moved, indent=2) + "\n")
    before = _tree_bytes(out)
    for extra in (["-m", "experiments.mnist", "--out", str(out), "--resume", "--steps", "30"],
                  ["-m", "experiments.mnist", "--out", str(out), "--stages", "evaluate,report"],
                  ["-m", "bang_jax.evaluate", "--run-dir", str(out)]):
        res = subprocess.run([sys.executable, *extra, "--no-progress"], cwd=ROOT, env=no_data,
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 2, (extra, res.stderr[-1500:])
        assert "this run was made with mnist from files:" in res.stderr and "BANG_DATA_DIR" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
    assert _tree_bytes(out) == before
    (out / "config.json").write_bytes(config_bytes)
    before = _tree_bytes(out)
    # With nothing configured, the folder the run read is used while it exists (its files are checksummed).
    res = subprocess.run([sys.executable, "-m", "bang_jax.evaluate", "--run-dir", str(out), "--no-progress",
                          "--attacks", "fgs", "--limit", "50"], cwd=ROOT, env=no_data, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-1500:]
    # One command at a time in a run directory: a second one is refused while the first holds the lock.
    import fcntl

    with open(out / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        res = subprocess.run([sys.executable, "-m", "experiments.mnist", "--out", str(out), "--no-progress",
                              "--stages", "report"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "another command is working" in res.stderr, res.stderr[-1500:]
    assert _tree_bytes(out) == before


def test_cifar10_smoke_preset_end_to_end(tmp_path, data_dir):
    out = tmp_path / "cifar"
    results = cifar10.main(["--preset", "smoke", "--out", str(out), "--no-progress", "--data-dir", str(data_dir)])
    assert [r["id"] for r in results] == ["R0", "B0"] and results[1]["ratio"] == 0.5
    assert RESULT_KEYS <= set(results[1])
    assert "| B0 | | | | paper | 79.26% | 34.27%" in (out / "table2.md").read_text()


def _cmd(out, *extra):
    return [sys.executable, "-m", "experiments.mnist", "--preset", "smoke", "--out", str(out), "--steps", "120",
            "--checkpoint-every", "10", "--log-every", "10", "--attacks", "", "--noise-every", "0",
            "--no-progress", *extra]


def _final_params(out):
    """The checkpoint's train state (its description travels in the same file)."""
    raw = serialization.msgpack_restore((out / "checkpoints" / "state.msgpack").read_bytes())
    return raw["state"]


@pytest.mark.slow  # ≈1 min: three runs; test_train resumes in-process
def test_killed_run_resumes_to_the_same_final_weights(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_cmd(full), check=True, cwd=ROOT, env=env, capture_output=True, timeout=600)
    proc = subprocess.Popen(_cmd(killed), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:  # wait until training is under way and a few checkpoints exist
        if metrics.exists() and any(json.loads(s)["iteration"] >= 30 for s in metrics.read_text().splitlines()):
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step_at_kill = int(_final_params(killed)["step"][0])
    assert 10 <= step_at_kill < 120, "the run should have been killed mid-training"
    subprocess.run(_cmd(killed, "--resume"), check=True, cwd=ROOT, env=env, capture_output=True, timeout=600)
    state = Path("checkpoints") / "state.msgpack"
    assert (killed / state).read_bytes() == (full / state).read_bytes()
    a = json.loads((full / "results.json").read_text())
    b = json.loads((killed / "results.json").read_text())
    assert [r["accuracy"] for r in a] == [r["accuracy"] for r in b]


@pytest.mark.slow  # 40 s: vmapped grid; test_train checks vmap = loop
def test_grid_preset_trains_vmapped_models_and_plots(tmp_path):
    out = tmp_path / "grid"
    models = "R0,a:1.0:0.78,b:1.0:0.84,c:1.6:0.78,d:1.6:0.84,e:1.3:0.81"
    results = mnist.main(
        [
            "--preset",
            "grid",
            "--models",
            models,
            "--steps",
            "10",
            "--test-limit",
            "100",
            "--attacks",
            "fgs",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert len(results) == 6 and json.loads((out / "config.json").read_text())["train"]["model_batching"] == "vmap"
    assert (out / "grid.png").stat().st_size > 20_000


def test_old_run_directories_load_through_the_converter_and_newer_ones_are_refused(tmp_path):
    """A version-1 config.json (every setting at the top level) reads as today's layout; an unknown version is
    refused with one line naming it."""
    from bang_jax.checkpoint import CheckpointError, upgrade_run_config
    from experiments.config import ExperimentConfig
    from experiments.configs.mnist import get_config

    now = get_config("smoke").to_json()
    v1 = {k: v for k, v in now.items() if k not in ("train", "eval", "version")}
    v1 |= {k: v for k, v in now["train"].items()}
    v1 |= {"attacks": now["eval"]["attacks"], "hc1_max_step": now["eval"]["hc1_max_step"],
           "pgd_eps": now["eval"]["pgd_budgets"], "square_queries": now["eval"]["square_queries"],
           "curve_eps": now["eval"]["curve_budgets"], "data_source": "files:x", "command": "old"}
    cfg = ExperimentConfig.from_json(v1)
    assert cfg.to_json() == now
    assert upgrade_run_config(v1)["eval"]["pgd_budgets"] == now["eval"]["pgd_budgets"]
    with pytest.raises(CheckpointError, match="version 7 run description"):
        upgrade_run_config(now | {"version": 7})


def test_ctrl_c_says_where_to_continue_without_a_traceback(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "experiments.mnist", "--preset", "smoke", "--out", str(out),
                             "--steps", "5000", "--checkpoint-every", "20", "--no-progress"], cwd=ROOT, env=env,
                            stderr=subprocess.PIPE, text=True,
                            # a suite started in the background (`cmd &`) inherits SIGINT ignored, and so would the
                            # command: give it the default a user's terminal gives it
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "checkpoints" / "state.msgpack").exists():
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-1500:]
    assert "interrupted; the last checkpoint is at iteration" in err and "continue with --resume" in err, err
    assert "Traceback" not in err


def test_modern_presets_are_the_documented_recipe():
    """The modern presets: the NNX pre-activation ResNet, augmentation, shuffled batches of 128, Nesterov SGD with a
    cosine schedule over the whole run, models named apart from the paper's rows, the sweep's choice in `modern`."""
    from experiments.configs import cifar10

    for preset in ("modern", "modern-sweep", "modern-gpu"):
        cfg = cifar10.get_config(preset)
        assert cfg.model in ("preact_resnet8", "preact_resnet20")
        t = cfg.train
        assert (t.augment, t.order, t.batch_size) == ("crop_flip", "shuffled", 128)
        assert t.solver.policy == "cosine" and t.solver.decay_steps == t.steps and t.solver.nesterov
        names = [m.name for m in cfg.models]
        assert names[0] == "R" and not set(names) & set(cifar10.TABLE) and len(names) >= 2
        assert cfg.models[0].bang.is_regular and all(not m.bang.is_regular for m in cfg.models[1:])
    modern = cifar10.get_config("modern")
    assert [m.name for m in modern.models] == ["R", cifar10.MODERN_CHOICE]
    assert {"fgs", "hc1"} <= set(modern.eval.attacks) and modern.eval.curve_budgets
    assert {"fgs_exact", "pgd_margin", "pgd_ce", "square"} <= set(modern.eval.curve_attacks)
    # the estimate the run prints: R and one BANG model within the hour on a 2-core CPU
    est = len(modern.models) * modern.train.steps * cifar10.MODEL_STEP_SECONDS_CPU[modern.model] / 60
    assert est < 60


def test_the_modern_preset_uses_the_setting_the_committed_sweep_chooses():
    from experiments.configs import cifar10

    rows = [{"id": "R", "accuracy": 70.0, "fgs_rate": 90.0}, {"id": "Ba", "accuracy": 68.0, "fgs_rate": 60.0},
            {"id": "Bb", "accuracy": 66.0, "fgs_rate": 10.0}, {"id": "Bc", "accuracy": 69.0, "fgs_rate": 80.0}]
    assert cifar10.choose_modern_setting(rows) == "Ba"  # Bb is more "robust" but 4 points less accurate
    assert cifar10.choose_modern_setting([rows[0], rows[2]]) == "Bb"  # none close: the most accurate
    with pytest.raises(ValueError):
        cifar10.choose_modern_setting(rows[1:])
    committed = ROOT / "docs" / "results" / "modern-sweep" / "results.json"
    assert cifar10.choose_modern_setting(json.loads(committed.read_text())) == cifar10.MODERN_CHOICE
