"""The docs' measured numbers are generated from committed results files (experiments/docs_tables.py)."""

import json
import shutil
from pathlib import Path

import pytest

from experiments import docs_tables

ROOT = Path(__file__).resolve().parents[1]


def test_committed_docs_equal_what_the_results_files_give():
    """A hand-edited number in a marked block, or a results file changed without regenerating, fails here."""
    problems = docs_tables.stale(ROOT)
    assert not problems, "stale blocks (run python -m experiments.docs_tables): " + "; ".join(problems)


def test_every_results_folder_says_how_it_was_made():
    for folder in sorted((ROOT / "docs" / "results").glob("*/")):
        meta = json.loads((folder / "meta.json").read_text())
        assert meta["command"].startswith(("python -m ", "python benchmarks/")), folder
        assert meta["code_version"] and meta["machine"] and meta["date"], folder
        text = "".join(p.read_text() for p in folder.glob("*.json"))
        for needle in ("/work/", "/tmp/", "/home/", "/root/", "/Users/"):
            assert needle not in text, f"{folder.name} holds a machine path ({needle})"


def _fake_tree(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    rows = [{"id": "R0", "beta": 1.0, "epsilon": 0.0, "ratio": 1.0, "accuracy": 99.21, "fgs_rate": 93.6,
             "data_source": "files:/data/somewhere/mnist"},
            {"id": "B1", "beta": 1.0, "epsilon": 0.815, "ratio": 1.0, "accuracy": 99.2, "fgs_rate": 2.11}]
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps(rows))
    (run / "config.json").write_text(json.dumps({"dataset": "mnist", "command": "/abs/path/mnist.py"}))
    (run / "timings.json").write_text(json.dumps({"train_seconds": 600.0, "last_command_seconds": 900.0}))
    return root, run


def test_a_changed_number_is_caught_and_regenerated(tmp_path, monkeypatch):
    root, run = _fake_tree(tmp_path)
    monkeypatch.setenv("BANG_DATA_DIR", "/data/somewhere")
    docs_tables.collect(run, "demo", "python -m experiments.mnist", code_version="abc1234", root=root)
    saved = json.loads((root / "docs" / "results" / "demo" / "results.json").read_text())
    assert saved[0]["data_source"] == "files:$BANG_DATA_DIR/mnist"
    meta = json.loads((root / "docs" / "results" / "demo" / "meta.json").read_text())
    assert meta["seconds"] == {"train_seconds": 600.0, "total": 900.0} and meta["code_version"] == "abc1234"
    doc = root / "docs" / "page.md"
    doc.write_text("text\n<!-- results: table demo -->\nold\n<!-- /results -->\nand <!-- results: runtime demo -->"
                   "\n<!-- /results -->\nB1 is <!-- results: value demo B1 accuracy 1 -->?<!-- /results -->"
                   " accurate.\n")
    assert len(docs_tables.stale(root)) == 3
    for path, text in docs_tables.render(root).items():
        path.write_text(text)
    assert docs_tables.stale(root) == []
    text = doc.read_text()
    assert "| R0 | 1.00 | 0.000 | 1.00 | ours | 99.21% | 93.60% |" in text and "| R0 | | | | paper | 99.16%" in text
    assert "900 s (15 min)" in text
    assert "B1 is <!-- results: value demo B1 accuracy 1 -->99.2%<!-- /results --> accurate." in text
    # A hand-edited number is caught...
    doc.write_text(text.replace("99.21%", "99.31%"))
    assert docs_tables.stale(root) == ["docs/page.md: <!-- results: table demo -->"]
    # ... and so is a results file changed without regenerating the docs.
    doc.write_text(text)
    saved[0]["accuracy"] = 98.0
    (root / "docs" / "results" / "demo" / "results.json").write_text(json.dumps(saved))
    assert docs_tables.stale(root) == ["docs/page.md: <!-- results: table demo -->"]


def test_unknown_generator_or_missing_results_is_an_error(tmp_path):
    root, _ = _fake_tree(tmp_path)
    (root / "README.md").write_text("<!-- results: nosuch x -->\n<!-- /results -->\n")
    with pytest.raises(docs_tables.DocsError, match="unknown generator"):
        docs_tables.render(root)
    (root / "README.md").write_text("<!-- results: table missing -->\n<!-- /results -->\n")
    with pytest.raises(docs_tables.DocsError, match="does not exist"):
        docs_tables.render(root)
    shutil.rmtree(root)


def test_scrub_takes_out_machine_paths_only():
    scrub = docs_tables._scrub
    assert scrub("files:/data/x/mnist", "/data/x") == "files:$BANG_DATA_DIR/mnist"
    assert scrub("files:/data/xy/mnist", "/data/x") == "files:…/mnist"  # not the data folder: only its last part
    for kept in ("https://github.com/a/b/raw/x.h5", "ratio 1/2 on 2026-12-02", "~/tensorflow_datasets/mnist/3.0.1"):
        assert scrub(kept, "/data/x") == kept
    assert scrub({"a": ["/home/me/run/results.json"]}, None) == {"a": ["…/results.json"]}


def test_collect_refuses_bad_names_and_sources_before_touching_anything(tmp_path):
    root, run = _fake_tree(tmp_path)
    keep = root / "docs" / "results" / "old"
    keep.mkdir(parents=True)
    (keep / "meta.json").write_text("{}")
    for name in ("", "..", "../x", "a/b", "."):
        with pytest.raises(docs_tables.DocsError, match="results name"):
            docs_tables.collect(run, name, "python -m x", root=root)
    with pytest.raises(docs_tables.DocsError, match="not a run directory"):
        docs_tables.collect(tmp_path / "repo", "old", "python -m x", root=root)
    assert (keep / "meta.json").exists() and (root / "docs").is_dir()


def test_an_unclosed_block_is_an_error_not_a_swallowed_neighbour(tmp_path):
    root, _ = _fake_tree(tmp_path)
    (root / "README.md").write_text("<!-- results: runtimes -->\nopen\n<!-- results: runtimes -->\n<!-- /results -->\n")
    with pytest.raises(docs_tables.DocsError, match="not closed"):
        docs_tables.render(root)


def test_a_benchmark_report_becomes_its_table(tmp_path):
    report = {"backend": "cpu", "devices": 1, "throughput": {
        "lenet/b64/one": {"plain": {"step_ms": 16.2, "images_per_s": 3946.0},
                          "single_pass": {"step_ms": 16.7, "images_per_s": 3835.0, "ratio_to_plain": 1.03},
                          "per_example": {"step_ms": 32.1, "images_per_s": 1995.0, "ratio_to_plain": 1.98}},
        "lenet/b64/all": {"plain": {"step_ms": 1.0, "images_per_s": 1.0}}},
        "grid": {"models": 169, "vmapped_step_s": 11.0, "sequential_step_s": 2.5, "speedup": 0.23,
                 "one_model_step_ms": 14.6}}
    src = tmp_path / "tp.json"
    src.write_text(json.dumps(report))
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    docs_tables.collect(src, "bench-tp", "python benchmarks/throughput.py --json tp.json", root=root, benchmark=True,
                        code_version="abc1234")
    text = docs_tables.gen_throughput(root, "bench-tp")
    assert "| LeNet (64) | 3,946 img/s (16.2 ms) | 3,835 img/s (1.03×) | 1,995 img/s (1.98×) |" in text
    assert "/all" not in text and "169-model" in text and "0.23×" in text
    with pytest.raises(docs_tables.DocsError, match="not a benchmark report"):
        (tmp_path / "list.json").write_text("[]")
        docs_tables.collect(tmp_path / "list.json", "x", "python benchmarks/throughput.py", root=root, benchmark=True)


def _collected(tmp_path: Path, rows: list[dict], name: str, preset: str) -> Path:
    """A repository whose docs/results/NAME holds ``rows`` of a ResNet-8 CIFAR-10 run; returns its root."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps(rows))
    (run / "config.json").write_text(json.dumps({"dataset": "cifar10", "model": "preact_resnet8"}))
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    docs_tables.collect(run, name, f"python -m experiments.cifar10 --preset {preset}", code_version="abc", root=root)
    return root


def test_curves_and_a_non_paper_network_table(tmp_path):
    curve = lambda ra: {"robust_accuracy": ra, "success_rate": ra}  # noqa: E731
    rows = [{"id": name, "beta": 1.0, "epsilon": e, "ratio": 1.0, "accuracy": acc, "test_images": 100,
             "attacked": 90, "autoattack_robust_accuracy_eps4": aa,
             "curves": {"epsilons": [0.0, 4.0], "images": 100,
                        "attacks": {"pgd_margin": curve([acc, pgd]), "autoattack": curve([acc, aa])},
                        "best": curve([acc, aa])},
             "masking": {"verdict": verdict}}
            for name, e, acc, pgd, aa, verdict in (("R", 0.0, 90.0, 20.0, 12.5, "no sign of gradient masking"),
                                                   ("Be8", 0.8, 88.0, 30.0, 25.0, "gradient masking: x"))]
    root = _collected(tmp_path, rows, "modern", "modern")
    text = docs_tables.gen_curves(root, "modern")
    assert "| model | attack | ε 0 | ε 4 |" in text
    assert "| R | PGD logit margin | 90.0% | 20.0% |" in text
    assert "| Be8 | AutoAttack (standard) | 88.0% | 25.0% |" in text
    assert "| R | **best of all** | **90.0%** | **12.5%** |" in text
    assert "- R, AutoAttack (standard): robust accuracy 12.5% at ε 4." in text
    assert "- Be8: gradient masking: x." in text
    assert "| Be8 |" not in docs_tables.gen_curves(root, "modern", "R")
    table = docs_tables.gen_table(root, "modern")
    assert "| R |" in table and "paper" not in table  # the paper's rows belong to its networks
    with pytest.raises(docs_tables.DocsError, match="no model nosuch"):
        docs_tables.gen_curves(root, "modern", "R", "nosuch")  # a typo is named, not dropped


def test_robust_lists_every_attack_the_results_hold(tmp_path):
    rows = [{"id": "R", "epsilon": 0.0, "beta": 1.0, "ratio": 1.0, "accuracy": 80.0, "test_images": 500,
             "fgs_rate": 90.0, "fgs_exact_rate": 91.0, "pgd_margin_rate_eps2": 50.0, "pgd_margin_rate_eps4": 80.0,
             "pgd_ce_rate_eps2": 49.0},
            {"id": "Be8", "epsilon": 0.8, "beta": 0.4, "ratio": 0.5, "accuracy": 78.5, "test_images": 500,
             "fgs_rate": 20.0, "fgs_exact_rate": 92.0, "pgd_margin_rate_eps2": 55.0, "pgd_margin_rate_eps4": 85.0}]
    root = _collected(tmp_path, rows, "sweep", "modern-sweep")
    text = docs_tables.gen_robust(root, "sweep")
    assert ("| model | setting | accuracy | FGS | FGS-exact | PGD-margin 2 px | PGD-margin 4 px | PGD-CE 2 px |"
            in text)
    assert "| Be8 | ε 0.800, β 0.40, ratio 0.50 | 78.50% | 20.00% | 92.00% | 55.00% | 85.00% | – |" in text
    assert "| R | regular |" in text and "Square" not in text
    with pytest.raises(docs_tables.DocsError, match="no model Bx"):
        docs_tables.gen_curves(root, "sweep", "R", "Bx")
    with pytest.raises(docs_tables.DocsError, match="no curves"):
        docs_tables.gen_curves(root, "sweep")
