"""The experiment entry points end to end (smoke preset)."""

import json

from experiments import mnist


def test_mnist_smoke_preset_end_to_end(tmp_path):
    out = tmp_path / "run"
    results = mnist.main(["--preset", "smoke", "--out", str(out), "--no-progress"])
    assert {p.name for p in out.iterdir()} >= {"config.json", "metrics.jsonl", "results.json", "checkpoints"}
    config = json.loads((out / "config.json").read_text())
    assert config["num_steps"] == 60 and config["order"] == "sequential" and config["data_source"]
    assert [m["name"] for m in config["models"]] == ["R0", "B1"]
    saved = json.loads((out / "results.json").read_text())
    assert saved == results
    for r in saved:
        assert {"id", "beta", "epsilon", "ratio", "seed", "accuracy"} <= set(r)
        assert 30.0 < r["accuracy"] <= 100.0  # 60 iterations already learn a lot
    assert (out / "checkpoints" / "state.msgpack").stat().st_size > 1_000_000
