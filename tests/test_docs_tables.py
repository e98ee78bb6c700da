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


def _bench(tmp_path: Path, name: str, report: dict, command: str) -> Path:
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True, exist_ok=True)
    src = tmp_path / f"{name}.json"
    src.write_text(json.dumps(report))
    docs_tables.collect(src, name, command, root=root, benchmark=True, code_version="abc1234")
    return root


def test_every_benchmark_report_becomes_its_table(tmp_path):
    _bench(tmp_path, "steps", {"lenet_plain_ms": 14.3, "lenet_single_pass_over_plain": 1.1,
                               "lenet_per_example_over_plain": 1.4, "nnx_cnn_plain_ms": 90.0,
                               "nnx_cnn_single_pass_over_plain": 1.07, "repeats": 30},
           "python benchmarks/step_time.py --json s.json")
    _bench(tmp_path, "attacks", {"images": 9916, "fgs_seconds": 15.9, "hc1_seconds": 39.1, "pass_seconds": 3.8,
                                 "fgs_plus_hc1_seconds": 55.0, "foolbox_images": 300, "foolbox_fgs_seconds": 39.9,
                                 "ours_fgs_seconds_same_images": 1.42, "foolbox_over_ours": 28.2,
                                 "same_minimal_step_share": 1.0}, "python benchmarks/attack_speed.py --json a.json")
    _bench(tmp_path, "square", {"runs": [{"dataset": "mnist", "epsilon": 4.0, "queries": 1000, "chunk_queries": None,
                                          "images": 300, "seconds": 38.0, "images_per_second": 7.9,
                                          "forward_passes_per_second": 7800.0, "success_rate": 1.5,
                                          "mean_queries": 990.0}]}, "python benchmarks/square_speed.py --json q.json")
    _bench(tmp_path, "suite", {"outcome": {"passed": 289, "skipped": 2}, "seconds": 855.0, "exit_status": 0},
           "python benchmarks/suite_time.py --json t.json")
    root = _bench(tmp_path, "aa", {"dataset": "mnist", "weights": "lenet_bang.caffemodel.h5", "images": 500,
                                   "eps": 32.0, "attacks": {"autoattack": {
                                       "robust_ours": 24.8, "robust_reference": 24.6, "seconds_ours": 100.0,
                                       "seconds_reference": 150.0, "speedup_bound": 4.0,
                                       "ours_by_attack": {"seconds": {"apgd-ce": 10.0, "square": 37.5}}}}},
                  "python benchmarks/autoattack_crosscheck.py --json c.json")
    steps = docs_tables.gen_steptime(root, "steps")
    assert "| `lenet` | 14.3 ms | 1.10× | 1.40× |" in steps and "| `nnx_cnn` | 90.0 ms | 1.07× | – |" in steps
    assert "step_time.py" in steps and "abc1234" not in steps
    assert "| 15.9 s | 39.1 s | 3.8 s | **55.0 s** (target < 60 s) | 39.9 s (300 images) | 1.42 s (**28.2× faster**" \
        in docs_tables.gen_attackspeed(root, "attacks")
    assert "| mnist | 4 | one `lax.while_loop` | 300 | 38.0 s | 7.9 | 7,800 | 1.50% | 990 |" in \
        docs_tables.gen_squarespeed(root, "square")
    assert docs_tables.gen_suite(root, "suite").startswith("289 passed, 2 skipped in **855 s** (14 min)")
    aa = docs_tables.gen_aaspeed(root, "aa")
    assert "| 24.80% | 24.60% | 100 s | 150 s | **1.50×** | 4.0× | apgd-ce 10 s, square 38 s |" in aa
    with pytest.raises(docs_tables.DocsError, match="does not exist"):
        docs_tables.gen_aaspeed(root, "aa", "missing")


def test_the_masking_table_of_the_released_weights(tmp_path):
    curve = lambda ra: {"robust_accuracy": ra}  # noqa: E731
    row = {"id": "released", "accuracy": 98.8, "fgs_rate": 2.63, "pgd_min_linf_mean": 28.2, "pgd_min_linf_std": 10.1,
           "curves": {"epsilons": [0.0, 16.0, 32.0], "images": 1000,
                      "attacks": {"pgd_margin": curve([98.8, 87.0, 33.0]), "square": curve([98.8, 90.5, 45.7])},
                      "best": curve([98.8, 86.9, 32.0])},
           "masking": {"ce_loss_zero_share": 97.4, "ce_grad_zero_share": 30.4, "margin_median": 67.71,
                       "verdict": "cross-entropy masking: Square beats PGD-CE; more"}}
    src = tmp_path / "b1.json"
    src.write_text(json.dumps([row]))
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    docs_tables.collect(src, "released-lenet-b1-curves", "python -m bang_jax.evaluate --curves", root=root,
                        dataset="mnist", code_version="abc")
    text = docs_tables.gen_masking(root, "16,32", "released-lenet-b1-curves")
    assert ("| LeNet B1 (clean 98.8%) | 1.68% (2.63%) | 87.0 / 33.0 | 90.5 / 45.7 | 86.9 / 32.0 | 97.4% | 30.4% | "
            "67.7 | 28.2 ± 10.1 | cross-entropy masking |") in text
    assert "first 1,000 mnist test images" in text
    with pytest.raises(docs_tables.DocsError, match="no curve budget 64"):
        docs_tables.gen_masking(root, "32,64", "released-lenet-b1-curves")
    with pytest.raises(docs_tables.DocsError, match="is not released-<model>-curves"):
        docs_tables.gen_masking(root, "32", "modern")


def test_autoattack_on_the_released_weights_and_the_summary_rows(tmp_path):
    curve = lambda ra: {"robust_accuracy": ra}  # noqa: E731
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    for name, pgd, aa, only in (("released-lenet-r0-autoattack", 45.0, 42.4, 0),
                                ("released-lenet-b1-autoattack", 33.0, 24.8, 3)):
        row = {"id": "released", "accuracy": 99.0,
               "curves": {"epsilons": [0.0, 32.0], "images": 500,
                          "attacks": {"pgd_margin": curve([99.0, pgd]), "square": curve([99.0, 50.0]),
                                      "autoattack": {"robust_accuracy": [99.0, aa], "fooled_by": [
                                          {"epsilon": 32.0, "clean": 0, "apgd-ce": 200, "apgd-t": 60, "fab-t": 1,
                                           "square": only}]}},
                          "best": curve([99.0, aa])},
               "masking": {"verdict": "no sign of gradient masking; more",
                           "autoattack": {"square_vs_gradient": [{"epsilon": 32.0, "square_only": only}]}}}
        src = tmp_path / f"{name}.json"
        src.write_text(json.dumps([row]))
        docs_tables.collect(src, name, "python -m bang_jax.evaluate --curves", root=root, dataset="mnist",
                            code_version="abc")
    text = docs_tables.gen_autoattack(root, "released-lenet-r0-autoattack", "released-lenet-b1-autoattack")
    assert ("| LeNet B1 | 32 | 33.0% | 50.0% | **24.8%** | 200 / 60 / 1 / 3 | 3 | no sign of gradient masking |"
            in text)
    assert "| LeNet R0 | 32 |" in text and "| LeNet R0 | 0 |" not in text  # no row for the clean budget
    rows = docs_tables._autoattack_rows(root)
    assert ("not in the paper — released LeNet R0 / B1: robust accuracy under AutoAttack (standard), first 500 test "
            "images", "–", "ε 32: 42.4% / 24.8%") in rows
    with pytest.raises(docs_tables.DocsError, match="not released-<model>-autoattack"):
        docs_tables.gen_autoattack(root, "released-lenet-r0")
    src = tmp_path / "cc.json"
    src.write_text(json.dumps({"dataset": "mnist", "weights": "lenet_bang.caffemodel.h5", "images": 500, "eps": 32.0,
                               "attacks": {"autoattack": {"robust_ours": 24.8, "robust_reference": 25.0}}}))
    docs_tables.collect(src, "cc", "python benchmarks/autoattack_crosscheck.py", root=root, benchmark=True,
                        code_version="abc")
    assert docs_tables.gen_agreement(root, "cc") == "24.8% against 25.0% (lenet_bang, ε 32, 500 images)"


def test_the_suite_timer_reads_pytests_summary_line():
    import importlib.util  # noqa: PLC0415

    spec = importlib.util.spec_from_file_location("suite_time", ROOT / "benchmarks" / "suite_time.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.outcome("==== 289 passed, 2 skipped, 3 warnings in 855.12s (0:14:15) ====") == {
        "passed": 289, "skipped": 2}
    assert module.outcome("= 1 failed, 280 passed, 1 error in 12.0s =") == {"failed": 1, "passed": 280, "error": 1}
    assert module.outcome("collected 3 items") == {}


def test_investigation_reports_numbers_and_leads(tmp_path):
    ways = {"paper": {"blank": 38, "sign_agreement": 6.9, "sign_agreement_nonblank": 99.87, "rate": 2.56,
                      "linf_mean": 6.0, "pixels_differing": 28420, "images_differing": 39},
            "exact": {"blank": 0, "sign_agreement": 100.0, "sign_agreement_nonblank": 100.0, "rate": 100.0,
                      "linf_mean": 40.31, "pixels_differing": 0, "images_differing": 0}}
    _bench(tmp_path, "prec", {"weights": "lenet_bang.caffemodel.h5", "dataset": "mnist", "images": 40,
                              "attacked": 39, "margin_median": 66.88, "pixels": 30576,
                              "data_source": "files:$BANG_DATA_DIR/mnist", "margin_share_above_90": 23.08,
                              "ways": ways},
           "python benchmarks/fgs_precision.py --json p.json")
    variants = {"caffe": {"accuracy": 79.59, "attacked": 34, "fgs_rate": 91.18, "fgs_linf_mean": 2.35, "fgs_blank": 3,
                          "hc1_rate": 100.0, "hc1_linf_mean": 13.15, "hc1_blank": 0},
                "bgr_input": {"accuracy": 61.6, "attacked": 20, "fgs_rate": 100.0, "fgs_linf_mean": 2.25,
                              "fgs_blank": 0, "hc1_rate": 100.0, "hc1_linf_mean": 8.75, "hc1_blank": 0}}
    _bench(tmp_path, "var-r0", {"weights": "cifar10.caffemodel.h5", "dataset": "cifar10", "test_images": 10000,
                                "images": 40, "variants": variants},
           "python benchmarks/cifar_variants.py --json v.json")
    root = _bench(tmp_path, "var-b0", {"weights": "cifar10_bang.caffemodel.h5", "dataset": "cifar10",
                                       "test_images": 10000, "images": 0,
                                       "variants": {"caffe": {"accuracy": 79.26}}},
                  "python benchmarks/cifar_variants.py --limit 0 --json w.json")
    prec = docs_tables.gen_fgsprecision(root, "prec")
    assert "| float32 softmax, the paper's blank rule | 38 | 6.9% / 99.9% | 28,420 (39) | 2.56% | 6.00 |" in prec
    assert "39 correctly classified of the first 40 mnist test images (median logit margin 66.9" in prec
    var = docs_tables.gen_variants(root, "var-r0", "var-b0")
    assert "| input channels in BGR order | 61.60% | – | 20 | 100.00% (2.25) | 100.00% (8.75) |" in var
    assert "| 79.59% | 79.26% | 34 | 91.18% (2.35) | 100.00% (13.15) |" in var
    # the accuracy-only report first: the attacks still come from the one that attacked
    assert docs_tables.gen_variants(root, "var-b0", "var-r0").count("| 34 | 91.18% (2.35) |") == 1
    assert "(the 'attacked' column), with cifar10.caffemodel.h5" in var
    assert docs_tables.gen_number(root, "prec", "ways.exact.linf_mean", "1") == "40.3"
    assert docs_tables.gen_number(root, "prec", "margin_share_above_90", "0", "%") == "23%"
    with pytest.raises(docs_tables.DocsError, match="has no ways.float64.rate"):
        docs_tables.gen_number(root, "prec", "ways.float64.rate")
    with pytest.raises(docs_tables.DocsError, match="not a number"):
        docs_tables.gen_number(root, "prec", "weights")
    with pytest.raises(docs_tables.DocsError, match="digits must be one digit"):
        docs_tables.gen_number(root, "prec", "attacked", "x")
    assert docs_tables.gen_share(root, "prec", "attacked", "images", "1") == "97.5%"

    gap = lambda eps, g: {"epsilon": eps, "gap": g}  # noqa: E731
    src = tmp_path / "b0.json"
    src.write_text(json.dumps([{"id": "released", "masking": {"gap_vs": {
        "pgd_ce": [gap(0.0, 0.0), gap(16.0, 6.84) | {"significant": True}, gap(32.0, 1.0)],
        "pgd_margin": [gap(0.0, 0.0), gap(8.0, -3.0)], "fgs": []}},
        "attacked": 400, "hc1_rate": 90.0, "hc1_still_changing_at_cap": 35}]))
    docs_tables.collect(src, "released-cifar-b0-curves", "python -m bang_jax.evaluate --curves", root=root,
                        dataset="cifar10", code_version="abc")
    assert docs_tables.gen_lead(root, "released-cifar-b0-curves", "pgd_ce") == "6.8 points at ε = 16 (significant)"
    with pytest.raises(docs_tables.DocsError, match="at no budget"):
        docs_tables.gen_lead(root, "released-cifar-b0-curves", "fgs")
    assert docs_tables.gen_failures(root, "released-cifar-b0-curves", "hc1") == "35 of 40"
    with pytest.raises(docs_tables.DocsError, match="no fgs_still_changing_at_cap"):
        docs_tables.gen_failures(root, "released-cifar-b0-curves", "fgs")
    assert docs_tables.gen_lead(root, "released-cifar-b0-curves", "pgd_margin") == "never ahead"
    assert docs_tables.gen_number(root, "released-cifar-b0-curves", "0.masking.gap_vs.pgd_ce.1.gap", "1") == "6.8"
    with pytest.raises(docs_tables.DocsError, match="no 'square'"):
        docs_tables.gen_lead(root, "released-cifar-b0-curves", "square")


def test_a_notebooks_run_time_comes_from_its_stored_execution_times(tmp_path):
    root = tmp_path / "repo"
    (root / "notebooks").mkdir(parents=True)
    cell = lambda start, end: {"cell_type": "code", "metadata": {"execution": {  # noqa: E731
        "iopub.execute_input": start, "shell.execute_reply": end}}}
    nb = {"cells": [{"cell_type": "markdown", "metadata": {}}, cell("2026-12-02T10:00:00.5Z", "2026-12-02T10:00:40Z"),
                    cell("2026-12-02T10:00:41Z", "2026-12-02T10:07:05Z")]}
    (root / "notebooks" / "a.ipynb").write_text(json.dumps(nb))
    assert docs_tables.gen_nbtime(root, "a") == "7 min"
    nb["cells"] = nb["cells"][:2]
    (root / "notebooks" / "a.ipynb").write_text(json.dumps(nb))
    assert docs_tables.gen_nbtime(root, "a") == "40 s"
    (root / "notebooks" / "b.ipynb").write_text(json.dumps({"cells": [{"cell_type": "code", "metadata": {}}]}))
    with pytest.raises(docs_tables.DocsError, match="no execution times"):
        docs_tables.gen_nbtime(root, "b")
    with pytest.raises(docs_tables.DocsError, match="does not exist"):
        docs_tables.gen_nbtime(root, "c")
