"""--seeds: every model once per seed, summarised as mean ± sd with a stated significance rule."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bang_jax.balance import BangConfig
from bang_jax.train import ModelSpec
from experiments import seeds

ROOT = Path(__file__).resolve().parents[1]


def test_parse_seeds():
    assert seeds.parse_seeds("5") == (0, 1, 2, 3, 4)
    assert seeds.parse_seeds("0,2, 7") == (0, 2, 7)
    assert seeds.parse_seeds("3,") == (3,)
    for bad, match in (("", "empty"), ("0", "between 1 and 1000"), ("5000000", "between 1 and 1000"),
                       ("a,b", "integers"), ("1,1", "twice"),
                       ("-1,2", "non-negative")):
        with pytest.raises(seeds.SeedsError, match=match):
            seeds.parse_seeds(bad)


def test_expand_and_rows_are_inverse_and_seed_zero_is_the_row_itself():
    rows = (ModelSpec(name="R0", seed=0), ModelSpec(name="B1", seed=3, bang=BangConfig(epsilon=0.815)))
    expanded = seeds.expand(rows, (0, 1, 4))
    assert [m.name for m in expanded] == ["R0@s0", "R0@s1", "R0@s4", "B1@s0", "B1@s1", "B1@s4"]
    assert [m.seed for m in expanded] == [0, 1000, 4000, 3, 1003, 4003]
    assert len({m.seed for m in expanded}) == len(expanded)
    assert seeds.rows(expanded, (0, 1, 4)) == rows
    assert seeds.expand(rows, ()) == rows
    with pytest.raises(seeds.SeedsError, match="below 1000"):
        seeds.expand((ModelSpec(name="X", seed=1000),), (0, 1))


def _row(name, acc, fgs, status="ok", regular=None):
    return {"id": name, "beta": 1.0, "epsilon": 0.0 if name.startswith("R") else 0.8, "ratio": 1.0,
            "regular": name.startswith("R") if regular is None else regular, "accuracy": acc, "fgs_rate": fgs,
            "status": status}


def test_summary_means_spread_and_welch_marks():
    results = [_row("R0@s0", 99.0, 93.0), _row("R0@s1", 99.2, 94.0), _row("R0@s2", 99.1, 93.5),
               _row("B1@s0", 99.1, 2.0), _row("B1@s1", 99.0, 2.5), _row("B1@s2", 99.2, 2.2),
               _row("B1@s3", 10.0, None, status="diverged")]
    summary = seeds.summarize(results)
    r0, b1 = summary
    assert r0["id"] == "R0" and r0["n_seeds"] == 3 and r0["seeds"] == [0, 1, 2]
    acc = b1["measures"]["accuracy"]
    assert acc["values"] == [99.1, 99.0, 99.2] and acc["mean"] == pytest.approx(99.1)
    assert acc["std"] == pytest.approx(np.std([99.1, 99.0, 99.2], ddof=1))
    assert b1["unhealthy"] == {"B1@s3": "diverged"} and b1["n_seeds"] == 3
    assert b1["measures"]["fgs_rate"]["differs"] is True  # 93 % vs 2 %: far beyond the spread
    assert b1["measures"]["accuracy"]["differs"] is False  # the same accuracies in another order
    from scipy import stats

    expected = stats.ttest_ind([2.0, 2.5, 2.2], [93.0, 94.0, 93.5], equal_var=False).pvalue
    assert b1["measures"]["fgs_rate"]["p_vs_regular"] == pytest.approx(expected)
    text = seeds.table(summary, "T")
    assert "over 3 seeds" in text and "**\\***" in text and "| B1@s3 | **diverged** |" in text
    # One seed per row: no spread, nothing marked.
    one = seeds.summarize([_row("R0@s0", 99.0, 93.0), _row("B1@s0", 99.1, 2.0)])
    assert one[1]["measures"]["fgs_rate"]["std"] is None and not one[1]["measures"]["fgs_rate"]["differs"]


def _mnist(out, *extra):
    cmd = [sys.executable, "-m", "experiments.mnist", "--preset", "smoke", "--out", str(out), "--no-progress",
           "--steps", "20", "--attacks", "fgs", "--test-limit", "100", "--noise-every", "0", "--figure-images", "0",
           *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # ≈1.5 min: four CLI runs; the seed logic is tested above
def test_seeded_run_end_to_end_resume_and_evaluate(tmp_path):
    out = tmp_path / "seeded"
    res = _mnist(out, "--seeds", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    results = {r["id"]: r for r in json.loads((out / "results.json").read_text())}
    assert sorted(results) == ["B1@s0", "B1@s1", "R0@s0", "R0@s1"]
    summary = json.loads((out / "seeds.json").read_text())
    assert [e["id"] for e in summary] == ["R0", "B1"] and all(e["n_seeds"] == 2 for e in summary)
    assert "mean ± standard deviation over 2 seeds" in (out / "seeds.md").read_text()
    assert (out / "seeds.png").stat().st_size > 10_000
    assert json.loads((out / "config.json").read_text())["seeds"] == [0, 1]
    # Seed 0 is the model a run without --seeds trains (bit-identical).
    plain = tmp_path / "plain"
    res = _mnist(plain)
    assert res.returncode == 0, res.stderr[-3000:]
    for r in json.loads((plain / "results.json").read_text()):
        assert r["final_train_loss"] == results[r["id"] + "@s0"]["final_train_loss"]
    # The seeds are part of the run's identity; later stages and the evaluate command work on it.
    res = _mnist(out, "--resume", "--seeds", "3")
    assert res.returncode == 2 and "seeds" in res.stderr, res.stderr[-2000:]
    res = subprocess.run([sys.executable, "-m", "bang_jax.evaluate", "--run-dir", str(out), "--models", "B1@s1",
                          "--attacks", "fgs", "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "B1@s1" in res.stdout, res.stderr[-2000:]


def test_missing_values_stay_with_their_seed_and_nothing_healthy_is_no_crash(tmp_path):
    results = [_row("R0@s0", 99.0, 93.0), _row("R0@s1", 99.2, 94.0), _row("R0@s2", 99.1, 93.5)]
    for r, v in zip(results, (None, 0.3, 0.5)):
        r["fgs_pass_mean"] = v
    summary = seeds.summarize(results)
    assert summary[0]["measures"]["fgs_pass_mean"]["values"] == [None, 0.3, 0.5]
    assert summary[0]["measures"]["fgs_pass_mean"]["n"] == 2
    per_seed = seeds.table(summary, "T").split("Per seed:")[1]
    assert "| R0@s0 | 99.00% | 93.00% | – |" in per_seed and "| R0@s1 | 99.20% | 94.00% | 0.3000 |" in per_seed
    dead = seeds.summarize([_row("R0@s0", None, None, status="diverged"), _row("B1@s0", None, None, "non-finite")])
    assert "No healthy model" in seeds.table(dead, "T")
    assert seeds.plot(dead, tmp_path / "x.png", "T") is None
    # Regular rows are never marked against each other.
    two_regular = seeds.summarize([_row("R0@s0", 99.0, 93.0), _row("R0@s1", 99.1, 93.2),
                                   _row("R1@s0", 90.0, 50.0), _row("R1@s1", 90.1, 50.2)])
    assert "versus" not in two_regular[1]
