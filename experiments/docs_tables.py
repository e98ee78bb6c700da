"""Every measured number in the docs comes from a committed results file: this script writes those tables.

Results live under ``docs/results/<name>/``: the run's ``results.json`` (and ``seeds.json``, ``noise.json``,
``timings.json`` where the run made them) plus ``meta.json`` — the exact command, the code version (git commit),
the machine and the date. Markdown files hold marked blocks::

    <!-- results: table mnist-default -->
    (generated; do not edit)
    <!-- /results -->

and ``python -m experiments.docs_tables`` rewrites every block from the results files (``--check``: only say
which blocks differ, exit 1 if any; the test suite runs that check, so a hand-edited number or a changed results
file without regenerated docs fails CI). ``python -m experiments.docs_tables collect RUN NAME --command "…"``
copies a finished run directory (or an ``evaluate --json`` file) into ``docs/results/NAME`` with its metadata,
with machine paths taken out.

Generators (the first word of a block's spec): ``table NAME`` (Table-1/2 style, ours above the paper's),
``seeds NAME`` (mean ± sd over seeds and the per-seed values), ``released`` (the authors' four released models),
``summary`` (the README's findings table), ``runtime NAME`` (the run's measured time and machine), ``runtimes``
(every results file's run time: the docs' one table of run times), ``meta NAME`` (the command, code version and
machine of a results file), ``value NAME ROW KEY [DIGITS]`` (one number inside a sentence:
``<!-- results: value mnist-seeds B1 hc1_pass_mean 3 -->…<!-- /results -->``), ``pgd NAME…`` (PGD success per budget
and loss), ``hc1cap NAME`` (HC1 at several search caps), ``curves NAME [MODEL…]`` (robust accuracy per attack and
budget, AutoAttack, and the masking verdicts), ``robust NAME`` (per model: accuracy, FGS and every fixed-budget
attack's success), ``masking BUDGETS NAME…`` (the released weights' masking table from their ``evaluate
--curves`` files); benchmarks, from their scripts' ``--json`` reports: ``throughput NAME``, ``steptime NAME``,
``attackspeed NAME``, ``squarespeed NAME…``, ``suite NAME`` (the test suite), ``crosscheck NAME`` and
``aaspeed NAME…`` (AutoAttack against torchattacks); ``agreement NAME…`` (inline: our AutoAttack's robust
accuracy against torchattacks'); ``autoattack NAME…`` (AutoAttack on the released weights, per budget).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path("docs") / "results"
BLOCK = re.compile(r"(<!-- results: (?P<spec>[^>]*?) -->\n?)(?P<body>(?:(?!<!-- results:).)*?)(<!-- /results -->)",
                   re.S)
OPENER = re.compile(r"<!-- results: ")
RELEASED = {  # results folder: (row label, paper table, paper row)
    # (also: released-lenet-r0-pgd / -b1-pgd, PGD on the first 1,000 images; released-lenet-b1-hc1cap)
    "released-lenet-r0": ("LeNet R0", "mnist", "R0"),
    "released-lenet-b1": ("LeNet B1", "mnist", "B1"),
    "released-cifar-r0": ("CIFAR R0", "cifar10", "R0"),
    "released-cifar-b0": ("CIFAR B0", "cifar10", "B0"),
}


STAGE_NAMES = ("train", "evaluate", "noise", "figures", "report")


class DocsError(ValueError):
    """A block that cannot be generated (unknown generator, missing results file)."""


def _paper(dataset: str) -> dict:
    from experiments.paper_tables import TABLE1, TABLE2  # noqa: PLC0415

    return {"mnist": TABLE1, "cifar10": TABLE2}[dataset]


def _load(root: Path, name: str, file: str, required: bool = True):
    path = root / RESULTS / name / file
    if not path.exists():
        if required:
            raise DocsError(f"{RESULTS / name / file} does not exist (collect the run first)")
        return None
    return json.loads(path.read_text())


def _pct(v, digits=2):
    return "–" if v is None else f"{v:.{digits}f}%"


def _num(v, digits=2):
    return "–" if v is None else f"{v:,.{digits}f}"


def _mean_std(row, key, digits=2):
    m, s = row.get(f"{key}_mean"), row.get(f"{key}_std")
    if m is None:
        return "–"
    return f"{m:.{digits}f}" + (f" ± {s:.{digits}f}" if s is not None else "")


# ------------------------------------------------------------------------------------------------------------
# Generators: each returns the Markdown between the markers.


def gen_meta(root: Path, name: str) -> str:
    meta = _load(root, name, "meta.json")
    return (f"Made by `{meta['command']}` (code {meta['code_version']}, {meta['date']}) on {meta['machine']}; "
            f"results in [`{RESULTS / name}`]({_rel(root, name)}).\n")


def _secs(seconds: float, bold: bool = False) -> str:
    """``'711 s (12 min)'``; under a minute just ``'26 s'``."""
    text = f"**{seconds:,.0f} s**" if bold else f"{seconds:,.0f} s"
    return text + (f" ({seconds / 60:.0f} min)" if seconds >= 60 else "")


def _rel(root: Path, name: str) -> str:
    return f"results/{name}/"


def gen_runtime(root: Path, name: str) -> str:
    meta = _load(root, name, "meta.json")
    t = meta.get("seconds") or {}
    total = t.get("total")
    parts = ", ".join(f"{k.removesuffix('_seconds')} {v:,.0f} s" for k, v in t.items()
                      if k.removesuffix("_seconds") in STAGE_NAMES and v >= 1)
    return (f"{_secs(total)} on {meta['machine']}" + (f" — {parts}" if parts else "")
            + f"; `{meta['command']}`\n")


def gen_runtimes(root: Path) -> str:
    """Every results file's measured run time, command, machine and code version: the one table of run times."""
    lines = ["| command | time | stages | machine, conditions | code |", "| --- | --- | --- | --- | --- |"]
    for meta_path in sorted((root / RESULTS).glob("*/meta.json")):
        meta = json.loads(meta_path.read_text())
        t = meta.get("seconds") or {}
        stages = ", ".join(f"{k.removesuffix('_seconds')} {v:,.0f} s" for k, v in t.items()
                           if k.removesuffix("_seconds") in STAGE_NAMES and v >= 1) or "–"
        if t.get("total") is None and stages == "–":
            continue
        total = "–" if t.get("total") is None else _secs(t["total"], bold=True)
        lines.append(f"| `{meta['command']}` | {total} | {stages} | "
                     f"{meta['machine']}{'; ' + meta['note'] if meta.get('note') else ''} | "
                     f"{meta['code_version']}, {meta['date']} |")
    return "\n".join(lines) + "\n"


def gen_value(root: Path, name: str, row: str, key: str, digits: str = "2") -> str:
    """One number for running text: ``mean ± sd (n seeds)`` of a row of a seeded run, or a row's value (``row``
    ``-`` = the first row; keys ending in ``_rate`` or ``accuracy`` get a %)."""
    pct = "%" if key.endswith("_rate") or key == "accuracy" else ""
    d = int(digits)
    summary = _load(root, name, "seeds.json", required=False)
    if summary is not None:
        entry = next((e for e in summary if e["id"] == row), None)
        if entry is None:
            raise DocsError(f"{RESULTS / name}/seeds.json has no row {row}")
        m = entry["measures"].get(key)
        if m is None or m["mean"] is None:
            raise DocsError(f"{RESULTS / name}/seeds.json: row {row} has no {key}")
        sd = f" ± {m['std']:.{d}f}" if m["std"] is not None else ""
        return f"{m['mean']:.{d}f}{sd}{pct} ({m['n']} seeds)"
    results = _load(root, name, "results.json")
    r = results[0] if row == "-" else next((x for x in results if x["id"] == row), None)
    if r is None or r.get(key) is None:
        raise DocsError(f"{RESULTS / name}/results.json: no {key} for row {row}")
    return f"{r[key]:.{d}f}{pct}"


def gen_pgd(root: Path, *names: str) -> str:
    """PGD success rate per budget, margin and cross-entropy loss, for each named results file (one column pair
    per model); the higher of a model's two rates in bold where the margin loss wins."""
    rows = {n: _load(root, n, "results.json")[0] for n in names}
    budgets = sorted({float(k.rsplit("_eps", 1)[1]) for r in rows.values() for k in r
                      if k.startswith("pgd_margin_rate_eps")})
    labels = {n: RELEASED.get(n.removesuffix("-pgd"), (n,))[0] for n in names}
    head = "| ε (pixels) | " + " | ".join(f"{labels[n]} margin | {labels[n]} CE" for n in names) + " |"
    lines = [head, "|" + " --- |" * (1 + 2 * len(names))]
    for eps in budgets:
        cells = []
        for n in names:
            margin, ce = rows[n].get(f"pgd_margin_rate_eps{eps:g}"), rows[n].get(f"pgd_ce_rate_eps{eps:g}")
            cells += [_pct(margin), _pct(ce)]
        lines.append(f"| {eps:g} | " + " | ".join(cells) + " |")
    attacked = ", ".join(f"{labels[n]} {rows[n]['attacked']:,}" for n in names)
    files = ", ".join(f"[`{n}`](results/{n}/)" for n in names)
    return "\n".join(lines) + f"\n\nRates are of the correctly classified images attacked ({attacked} of the " \
        f"first {rows[names[0]]['test_images']:,}); files: {files}.\n"


def gen_hc1cap(root: Path, name: str) -> str:
    """HC1 at several search caps (one row per cap), as running text."""
    rows = sorted(_load(root, name, "results.json"), key=lambda r: r["hc1_max_step"])
    return "; ".join(f"t ≤ {r['hc1_max_step']:,}: HC1 fools {_pct(r['hc1_rate'])} of {r['attacked']:,} images, "
                     f"PASS {_mean_std(r, 'hc1_pass', 4)}, L∞ {_num(r['hc1_linf_mean'])}" for r in rows) + "."


def gen_table(root: Path, name: str) -> str:
    from experiments.reports import table_lines  # noqa: PLC0415

    results = _load(root, name, "results.json")
    meta = _load(root, name, "meta.json")
    config = _load(root, name, "config.json", required=False) or {}
    paper_model = {"mnist": "lenet", "cifar10": "cifar_quick"}.get(meta["dataset"])
    paper_network = config.get("model", paper_model) == paper_model  # the paper's rows are its networks'
    return "\n".join(table_lines(results, _paper(meta["dataset"]) if paper_network else {})) + "\n"


def gen_robust(root: Path, name: str) -> str:
    """One row per model of a results file: its BANG setting, accuracy, the paper-rule and exact FGS success, and
    the success of every fixed-budget attack it was evaluated with (PGD-margin, PGD-CE, Square, AutoAttack) per
    budget — the columns are whatever the file holds."""
    results = _load(root, name, "results.json")
    prefixes = (("pgd_margin_rate_eps", "PGD-margin"), ("pgd_ce_rate_eps", "PGD-CE"), ("square_rate_eps", "Square"),
                ("autoattack_rate_eps", "AutoAttack"))
    columns = [("accuracy", "accuracy"), ("fgs_rate", "FGS"), ("fgs_exact_rate", "FGS-exact")]
    for prefix, label in prefixes:
        budgets = sorted({float(k.removeprefix(prefix)) for r in results for k in r if k.startswith(prefix)})
        columns += [(f"{prefix}{b:g}", f"{label} {b:g} px") for b in budgets]
    columns = [(k, label) for k, label in columns if any(r.get(k) is not None for r in results)]

    from experiments.reports import _hyper  # noqa: PLC0415

    def setting(r):
        if r.get("regular") or r.get("epsilon") in (0, 0.0, None):
            return "regular"
        return f"ε {_hyper(r['epsilon'], 3)}, β {_hyper(r['beta'], 2)}, ratio {_hyper(r['ratio'], 2)}"

    lines = ["| model | setting | " + " | ".join(label for _, label in columns) + " |",
             "|" + " --- |" * (2 + len(columns))]
    for r in results:
        status = r.get("status", "ok")
        cells = [_pct(r.get(k)) for k, _ in columns] if status == "ok" else (
            [_pct(r.get("accuracy"))] + [status.upper()] + ["–"] * (len(columns) - 2))[: len(columns)]
        lines.append(f"| {r.get('id', r.get('model'))} | {setting(r)} | " + " | ".join(cells) + " |")
    r0 = results[0]
    return "\n".join(lines) + (f"\n\nAccuracy on the first {r0['test_images']:,} test images; attack success in % of "
                               "the correctly classified images attacked; budgets in pixels of 255.\n")


def gen_curves(root: Path, name: str, *models: str) -> str:
    """Robust accuracy (% of all evaluated images) per attack and L∞ budget for each model of a results file (all,
    or the named ``models``), side by side, then each model's AutoAttack numbers (if evaluated) and its
    gradient-masking verdict."""
    from bang_jax.robustness import ATTACK_LABELS  # noqa: PLC0415

    results = _load(root, name, "results.json")
    unknown = sorted(set(models) - {r.get("id", r.get("model")) for r in results})
    if unknown:
        raise DocsError(f"{RESULTS / name}/results.json has no model {', '.join(unknown)}")
    rows = [r for r in results if r.get("curves") and (not models or r.get("id", r.get("model")) in models)]
    if not rows:
        raise DocsError(f"{RESULTS / name}/results.json holds no curves" + (f" for {', '.join(models)}" if models
                                                                            else ""))
    eps = rows[0]["curves"]["epsilons"]
    if any(r["curves"]["epsilons"] != eps for r in rows):
        raise DocsError(f"{RESULTS / name}: the models' curves have different budgets")
    ident = lambda r: r.get("id", r.get("model"))  # noqa: E731
    lines = ["| model | attack | " + " | ".join(f"ε {e:g}" for e in eps) + " |", "|" + " --- |" * (2 + len(eps))]
    for r in rows:
        c = r["curves"]
        for attack, data in [*c["attacks"].items(), ("best", c["best"])]:
            label = ATTACK_LABELS.get(attack, attack)
            cells = [_pct(v, 1) for v in data["robust_accuracy"]]
            if attack == "best":
                label, cells = f"**{label}**", [f"**{v}**" for v in cells]
            lines.append(f"| {ident(r)} | {label} | " + " | ".join(cells) + " |")
    notes = []
    for r in rows:
        aa = sorted((float(k.removeprefix("autoattack_robust_accuracy_eps")), v) for k, v in r.items()
                    if k.startswith("autoattack_robust_accuracy_eps"))
        if aa:
            notes.append(f"- {ident(r)}, AutoAttack (standard): robust accuracy "
                         + ", ".join(f"{_pct(v, 1)} at ε {e:g}" for e, v in aa) + ".")
        if r.get("masking"):
            notes.append(f"- {ident(r)}: {r['masking']['verdict']}.")
    n = rows[0]["curves"]["images"]
    text = "\n".join(lines) + (f"\n\nRobust accuracy in % of all {n:,} evaluated images (clean errors count as not "
                               "robust); ε in pixels of 255.")
    if notes:
        text += " Computed by the masking report:\n\n" + "\n".join(notes)
    return text + "\n"


def _released(name: str, kind: str, generator: str) -> tuple[str, str, str]:
    """``(label, dataset, paper row)`` of a ``released-<model>-<kind>`` results folder (the model as in
    :data:`RELEASED`); anything else is a :class:`DocsError` naming the generator."""
    base = name.removesuffix(f"-{kind}")
    if base not in RELEASED or base == name:
        raise DocsError(f"{generator}: {name} is not released-<model>-{kind} (models: {', '.join(RELEASED)})")
    return RELEASED[base]


def _verdict(masking: dict) -> str:
    """The masking report's verdict without its details: 'no sign of gradient masking', 'cross-entropy masking'…"""
    return masking["verdict"].split(";")[0].split(":")[0]


def gen_masking(root: Path, budgets: str, *names: str) -> str:
    """The masking table of the released weights: one row per ``evaluate --curves`` results file named
    ``released-<model>-curves`` (the model as in :data:`RELEASED`): clean accuracy, the paper's FGS rate with ours
    on the subset, robust accuracy under PGD-margin, Square and the best attack at the comma-separated
    ``budgets``, the masking report's shares and median logit margin, PGD-margin's minimal L∞ (where evaluated)
    and the verdict's first clause."""
    eps = [float(b) for b in budgets.split(",")]
    head = " / ".join(f"{e:g}" for e in eps)
    lines = [f"| model | paper FGS (ours on the subset) | PGD-margin, ε = {head} | Square, ε = {head} | "
             f"best attack, ε = {head} | CE loss = 0 | input gradient = 0 | median logit margin | "
             "PGD-margin minimal L∞ | verdict |", "|" + " --- |" * 10]
    counts = set()
    for name in names:
        label, dataset, row = _released(name, "curves", "masking")
        r = _load(root, name, "results.json")[0]
        c, m = r.get("curves"), r.get("masking")
        if not c or not m:
            raise DocsError(f"{RESULTS / name}/results.json has no curves and masking report (evaluate --curves)")
        missing = [e for e in eps if e not in c["epsilons"]]
        if missing:
            raise DocsError(f"{RESULTS / name}: no curve budget {', '.join(f'{e:g}' for e in missing)} "
                            f"(has {', '.join(f'{e:g}' for e in c['epsilons'])})")

        def at(curve):
            return " / ".join(_num(curve["robust_accuracy"][c["epsilons"].index(e)], 1) for e in eps)

        counts.add((dataset, c["images"]))
        lines.append(
            f"| {label} (clean {_pct(r['accuracy'], 1)}) | {_pct(_paper(dataset)[row]['fgs_rate'])} "
            f"({_pct(r.get('fgs_rate'))}) | {at(c['attacks']['pgd_margin'])} | {at(c['attacks']['square'])} | "
            f"{at(c['best'])} | {_pct(m['ce_loss_zero_share'], 1)} | {_pct(m['ce_grad_zero_share'], 1)} | "
            f"{_num(m['margin_median'], 1)} | {_mean_std(r, 'pgd_min_linf', 1)} | {_verdict(m)} |")
    images = ", ".join(f"the first {n:,} {d} test images" for d, n in sorted(counts))
    return "\n".join(lines) + (
        f"\n\nOn {images}. Robust accuracy in % of all evaluated images; the paper's FGS is the success rate over "
        "attacked images, as in Tables 1–2; shares in % of the attacked images; ε and L∞ in pixels of 255.\n")


def gen_seeds(root: Path, name: str) -> str:
    from experiments import seeds as seeds_lib  # noqa: PLC0415

    summary = _load(root, name, "seeds.json")
    meta = _load(root, name, "meta.json")
    text = seeds_lib.table(summary, "", _paper(meta["dataset"]))
    return text.split("\n", 2)[2]  # without the title line


def gen_released(root: Path) -> str:
    lines = ["| weights | accuracy | FGS rate | FGS PASS | FGS L∞ | FGS blank | FGS-exact rate (L∞) | HC1 rate | "
             "HC1 PASS | HC1 L∞ |", "|" + " --- |" * 10]
    for name, (label, dataset, row) in RELEASED.items():
        results = _load(root, name, "results.json", required=False)
        if results is None:
            continue
        r = results[0]
        lines.append(f"| {label} ours ({r['attacked']:,} attacked) | {_pct(r['accuracy'])} | {_pct(r.get('fgs_rate'))}"
                     f" | {_num(r.get('fgs_pass_mean'), 4)} | {_mean_std(r, 'fgs_linf')} | "
                     f"{r.get('fgs_blank', 0):,} | {_pct(r.get('fgs_exact_rate'))} "
                     f"({_num(r.get('fgs_exact_linf_mean'))}) | {_pct(r.get('hc1_rate'))} | "
                     f"{_num(r.get('hc1_pass_mean'), 4)} | {_mean_std(r, 'hc1_linf')} |")
        p = _paper(dataset)[row]
        lines.append(f"| {label} paper | {_pct(p.get('accuracy'))} | {_pct(p.get('fgs_rate'))} | "
                     f"{_num(p.get('fgs_pass_mean'), 4)} | {_mean_std(p, 'fgs_linf')} | — | — | "
                     f"{_pct(p.get('hc1_rate'))} | {_num(p.get('hc1_pass_mean'), 4)} | {_mean_std(p, 'hc1_linf')} |")
    machines = sorted({_load(root, n, "meta.json")["machine"] for n in RELEASED
                       if (root / RESULTS / n / "meta.json").exists()})
    return "\n".join(lines) + f"\n\nMeasured on {', '.join(machines)}; commands and results in " \
        f"[`docs/results/released-*`](results/).\n"


ONE_RUN_KEYS = (("accuracy", "accuracy", True), ("fgs_rate", "FGS success", True),
                ("fgs_exact_rate", "FGS-exact success (not in the paper)", True),
                ("hc1_linf_mean", "HC1 mean L∞", False))


def _one_run(results: list[dict], dataset: str, ids: tuple[str, str], title: str, keys) -> list[tuple]:
    """Summary rows (label, paper, ours) of one run's two models."""
    by = {r["id"]: r for r in results}
    missing = [r for r in ids if r not in by]
    if missing:
        raise DocsError(f"the results of '{title}' have no row {', '.join(missing)} (rows: {', '.join(by)})")
    pt = _paper(dataset)
    rows = []
    for key, label, pct in keys:
        unit = "%" if pct else ""
        ref = " / ".join(_num(pt[r].get(key)) + unit if pt[r].get(key) is not None else "–" for r in ids)
        ours = " / ".join(_num(by[r].get(key)) + unit if by[r].get(key) is not None else "–" for r in ids)
        rows.append((f"{title}: {label} {' / '.join(ids)}", ref, ours))
    return rows


def _curve_at(row: dict, attack: str, eps: float) -> float:
    """Robust accuracy (% of all images) of a curve attack (or ``'best'``) at budget ``eps``."""
    c = row["curves"]
    data = c["best"] if attack == "best" else c["attacks"][attack]
    return data["robust_accuracy"][c["epsilons"].index(eps)]


# The AutoAttack evaluations of the released weights (evaluate --curves with the autoattack curve attack), with
# the budgets the summary reports: the README's robustness verdicts rest on them.
AUTOATTACK_RUNS = ((("released-lenet-r0-autoattack", "released-lenet-b1-autoattack"), (32.0,)),
                   (("released-cifar-r0-autoattack", "released-cifar-b0-autoattack"), (2.0, 4.0)))


def _autoattack_rows(root: Path) -> list[tuple]:
    rows = []
    for names, budgets in AUTOATTACK_RUNS:
        runs = [(_load(root, n, "results.json", required=False) or [None])[0] for n in names]
        if not all(runs):
            continue
        for n, r in zip(names, runs):
            c = r.get("curves") or {}
            if "autoattack" not in c.get("attacks", {}) or any(e not in c.get("epsilons", []) for e in budgets):
                at = ", ".join(f"{e:g}" for e in budgets)
                raise DocsError(f"{RESULTS / n}/results.json: no AutoAttack curve at ε {at} (evaluate --curves "
                                "--curve-attacks …,autoattack)")
        if len({r["curves"]["images"] for r in runs}) != 1:
            raise DocsError(f"{' and '.join(names)} were evaluated on different numbers of images")
        labels = [_released(n, "autoattack", "summary")[0].split() for n in names]  # ["LeNet", "R0"], …
        images = runs[0]["curves"]["images"]
        ours = "; ".join(f"ε {e:g}: " + " / ".join(_pct(_curve_at(r, "autoattack", e), 1) for r in runs)
                         for e in budgets)
        models = f"{labels[0][0]} {' / '.join(w[1] for w in labels)}"
        rows.append((f"not in the paper — released {models}: robust accuracy under AutoAttack (standard), first "
                     f"{images:,} test images", "–", ours))
    return rows


def gen_autoattack(root: Path, *names: str) -> str:
    """AutoAttack on the released weights: one row per model and budget of each ``released-<model>-autoattack``
    file (``evaluate --curves`` with the ``autoattack`` curve attack): robust accuracy under PGD-margin, Square and
    AutoAttack, which of AutoAttack's attacks fooled the images first, the images only its Square fooled (no
    gradient attack could), and the masking verdict."""
    lines = ["| model | ε | PGD-margin | Square (1,000 queries) | AutoAttack | fooled first by APGD-CE / APGD-T / "
             "FAB-T / Square | only Square | masking verdict |", "|" + " --- |" * 8]
    counts = set()
    for name in names:
        label, dataset, _ = _released(name, "autoattack", "autoattack")
        r = _load(root, name, "results.json")[0]
        c, m = r.get("curves") or {}, r.get("masking") or {}
        if "autoattack" not in c.get("attacks", {}) or "autoattack" not in m:
            raise DocsError(f"{RESULTS / name}/results.json has no AutoAttack curve (evaluate --curves "
                            "--curve-attacks …,autoattack)")
        counts.add((dataset, c["images"]))
        winners = {w["epsilon"]: w for w in c["attacks"]["autoattack"].get("fooled_by", [])}
        only = {row["epsilon"]: row["square_only"] for row in m["autoattack"]["square_vs_gradient"]}
        for e in c["epsilons"]:
            if e == 0:
                continue
            w = winners.get(e, {})
            fooled = " / ".join(str(w.get(a, 0)) for a in ("apgd-ce", "apgd-t", "fab-t", "square"))
            lines.append(f"| {label} | {e:g} | {_pct(_curve_at(r, 'pgd_margin', e), 1)} | "
                         f"{_pct(_curve_at(r, 'square', e), 1)} | **{_pct(_curve_at(r, 'autoattack', e), 1)}** | "
                         f"{fooled} | {only.get(e, 0)} | {_verdict(m)} |")
    images = ", ".join(f"the first {n:,} {d} test images" for d, n in sorted(counts))
    return "\n".join(lines) + (
        f"\n\nOn {images}; robust accuracy in % of all of them (clean errors count as not robust); ε in pixels of "
        "255. The AutoAttack columns count images per attack on those still robust at the smaller budget.\n")


def gen_agreement(root: Path, *names: str) -> str:
    """Inline: our AutoAttack's robust accuracy against torchattacks' for each ``autoattack_crosscheck.py`` file."""
    parts = []
    for name in names:
        r = _load(root, name, "benchmark.json")
        row = r["attacks"]["autoattack"]
        parts.append(f"{_pct(row['robust_ours'], 1)} against {_pct(row['robust_reference'], 1)} "
                     f"({r['weights'].split('.')[0]}, ε {r['eps']:g}, {r['images']:,} images)")
    return "; ".join(parts)


def gen_summary(root: Path) -> str:
    """The README's findings: the released weights and the seeded default MNIST run, where their files exist."""
    rows = []
    rel = {n: (_load(root, n, "results.json", required=False) or [None])[0] for n in RELEASED}
    paper = {n: _paper(d)[r] for n, (_, d, r) in RELEASED.items()}
    if all(rel.values()):
        rows.append(("accuracy of the authors' released weights: LeNet R0 / B1, CIFAR R0 / B0",
                     " / ".join(_pct(paper[n]["accuracy"]).rstrip("%") for n in RELEASED) + "%",
                     " / ".join(_pct(rel[n]["accuracy"]).rstrip("%") for n in RELEASED) + "%"))
    for n, label in (("released-lenet-r0", "released LeNet R0"), ("released-lenet-b1", "released LeNet B1"),
                     ("released-cifar-b0", "released CIFAR B0")):
        if rel[n]:
            rows.append((f"{label}: FGS success (mean L∞)",
                         f"{_pct(paper[n]['fgs_rate'])} ({_num(paper[n]['fgs_linf_mean'])})",
                         f"{_pct(rel[n]['fgs_rate'])} ({_num(rel[n]['fgs_linf_mean'])})"))
    if rel["released-lenet-b1"]:
        r, p = rel["released-lenet-b1"], paper["released-lenet-b1"]
        rows.append(("released LeNet B1: HC1 success (mean L∞)",
                     f"{_pct(p['hc1_rate'])} ({_num(p['hc1_linf_mean'])})",
                     f"{_pct(r['hc1_rate'])} ({_num(r['hc1_linf_mean'])}), searched to t ≤ {r['hc1_max_step']:,}"))
        rows.append(("not in the paper — released LeNet B1: FGS with the exact gradient (mean L∞)", "–",
                     f"{_pct(r['fgs_exact_rate'])} ({_num(r['fgs_exact_linf_mean'])})"))
    seeds = _load(root, "mnist-seeds", "seeds.json", required=False)
    if seeds:
        by = {e["id"]: e for e in seeds}
        n = min(e["n_seeds"] for e in seeds)
        pt = _paper("mnist")

        def ms(row, key, pct):
            m = by[row]["measures"][key]
            text = f"{m['mean']:.2f} ± {m['std']:.2f}" if m["std"] is not None else f"{m['mean']:.2f}"
            return text + ("%" if pct else "") + (" \\*" if m.get("differs") else "")

        for key, label, pct in (("accuracy", "accuracy", True), ("fgs_rate", "FGS success", True),
                                ("fgs_exact_rate", "FGS-exact success (not in the paper)", True),
                                ("hc1_linf_mean", "HC1 mean L∞", False)):
            ref = " / ".join(_num(pt[r].get(key)) + ("%" if pct else "") if pt[r].get(key) is not None else "–"
                             for r in ("R0", "B1"))
            rows.append((f"LeNets trained here (default preset, {n} seeds, mean ± sd): {label} R0 / B1", ref,
                         f"{ms('R0', key, pct)} / {ms('B1', key, pct)}"))
    default = _load(root, "mnist-default", "results.json", required=False)
    if default and not seeds:  # one run of the default preset
        rows += _one_run(default, "mnist", ("R0", "B1"), "LeNets trained here (default preset, one run)",
                         ONE_RUN_KEYS)
    cifar = _load(root, "cifar-full", "results.json", required=False)
    if cifar:
        rows += _one_run(cifar, "cifar10", ("R0", "B0"), "CIFAR-quick trained here (paper length, one run)",
                         ONE_RUN_KEYS[:2] + (("fgs_linf_mean", "FGS mean L∞", False),) + ONE_RUN_KEYS[2:])
    rows += _autoattack_rows(root)
    lines = ["| | paper | ours |", "| --- | --- | --- |"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    if seeds:
        lines += ["", "\\* B1 differs from R0 beyond the seed spread (Welch's t-test, p < 0.05). Files: "
                  "[`docs/results/`](docs/results/)."]
    return "\n".join(lines) + "\n"


def gen_throughput(root: Path, name: str) -> str:
    """The training-throughput table of ``benchmarks/throughput.py --json`` (one device), and its grid line."""
    report = _load(root, name, "benchmark.json")
    labels = {"lenet": "LeNet", "cifar_quick": "CIFAR-quick"}
    lines = ["| model (batch) | plain | single-pass BANG | per-example BANG |", "| --- | --- | --- | --- |"]
    for key, row in report["throughput"].items():
        model, batch, devices = key.split("/")
        if devices != "one":
            continue
        cells = [f"{row['plain']['images_per_s']:,.0f} img/s ({row['plain']['step_ms']:,.1f} ms)"]
        cells += [f"{row[m]['images_per_s']:,.0f} img/s ({row[m]['ratio_to_plain']:.2f}×)"
                  for m in ("single_pass", "per_example")]
        lines.append(f"| {labels.get(model, model)} ({batch.removeprefix('b')}) | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    grid = report.get("grid")
    if grid:
        text += (f"\nThe {grid['models']}-model LeNet grid vmapped into one program: "
                 f"{grid['vmapped_step_s']:.2f} s per step, against {grid['sequential_step_s']:.2f} s for the same "
                 f"models one after another ({grid['one_model_step_ms']:.1f} ms each): vmapped runs at "
                 f"{grid['speedup']:.2f}× their speed.\n")
    return text


def gen_crosscheck(root: Path, name: str) -> str:
    """Our AutoAttack against torchattacks (``benchmarks/autoattack_crosscheck.py --json``): robust accuracy and
    time of each attack alone and of the ensemble, side by side."""
    r = _load(root, name, "benchmark.json")
    names = {"apgd-ce": "APGD-CE", "apgd-t": "APGD-T (9 targets)", "fab-t": "FAB-T (9 targets)",
             "square": "Square (5,000 queries)", "autoattack": "AutoAttack (standard ensemble, 100 iterations)",
             "torchattacks-autoattack": "the same against `torchattacks.AutoAttack` as shipped (10 iterations)"}
    lines = ["| attack | robust accuracy, ours | robust accuracy, torchattacks | time, ours | time, torchattacks |",
             "| --- | --- | --- | --- | --- |"]
    for key, row in r["attacks"].items():
        lines.append(f"| {names.get(key, key)} | {_pct(row['robust_ours'])} | {_pct(row['robust_reference'])} | "
                     f"{row['seconds_ours']:,.0f} s | {row['seconds_reference']:,.0f} s |")
    return "\n".join(lines) + (
        f"\n\n{r['weights']}, first {r['images']:,} {r['dataset']} test images (clean accuracy "
        f"{_pct(r['clean_accuracy'])}), ε = {r['eps']:g} pixels; clean logits of the two implementations differ by at "
        f"most {r['max_abs_logit_difference']:.1e} ({'the same' if r['same_predictions'] else 'different'} "
        "predictions).\n")


def gen_steptime(root: Path, name: str) -> str:
    """``benchmarks/step_time.py --json``: each model's plain step and the BANG steps' ratios to it."""
    r = _load(root, name, "benchmark.json")
    models = [k.removesuffix("_plain_ms") for k in r if k.endswith("_plain_ms")]
    lines = ["| model | plain step | single-pass BANG | per-example BANG |", "| --- | --- | --- | --- |"]
    for m in models:
        per = r.get(f"{m}_per_example_over_plain")
        lines.append(f"| `{m}` | {r[f'{m}_plain_ms']:,.1f} ms | {r[f'{m}_single_pass_over_plain']:.2f}× | "
                     + (f"{per:.2f}×" if per is not None else "–") + " |")
    return "\n".join(lines) + f"\n\nMedians of {r.get('repeats', 30)} interleaved rounds; {_made(root, name)}\n"


def _made(root: Path, name: str) -> str:
    meta = _load(root, name, "meta.json")
    note = f" ({meta['note']})" if meta.get("note") else ""
    return f"`{meta['command']}` on {meta['machine']}, {meta['date']}{note}."


def gen_attackspeed(root: Path, name: str) -> str:
    """``benchmarks/attack_speed.py --json``: the paper's attacks on the whole test set, and Foolbox side by side."""
    r = _load(root, name, "benchmark.json")
    lines = ["| FGS search | HC1 search (t ≤ 1020) | PASS | FGS + HC1 | Foolbox FGSM ε = 1..255 | ours, same images |",
             "| --- | --- | --- | --- | --- | --- |",
             f"| {r['fgs_seconds']:.1f} s | {r['hc1_seconds']:.1f} s | {r['pass_seconds']:.1f} s | "
             f"**{r['fgs_plus_hc1_seconds']:.1f} s** (target < 60 s) | {r['foolbox_fgs_seconds']:.1f} s "
             f"({r['foolbox_images']:,} images) | {r['ours_fgs_seconds_same_images']:.2f} s "
             f"(**{r['foolbox_over_ours']:.1f}× faster**; same minimal step on "
             f"{100 * r['same_minimal_step_share']:.1f}%) |"]
    text = "\n".join(lines) + f"\n\n{r['images']:,} attacked MNIST test images; {_made(root, name)}"
    if "pgd_seconds" in r:
        text += (f" PGD on the logit margin (40 steps, budget 32) took {r['pgd_seconds']:.1f} s on "
                 f"{r['pgd_images']:,} images.")
    return text + "\n"


def gen_squarespeed(root: Path, *names: str) -> str:
    """``benchmarks/square_speed.py --json`` runs: speed per budget and loop layout."""
    lines = ["| data | ε | loop | images | time | images / s | forward passes / s | fooled | mean queries |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    made = []
    for name in names:
        for run in _load(root, name, "benchmark.json")["runs"]:
            loop = ("one `lax.while_loop`" if run["chunk_queries"] is None
                    else f"chunks of {run['chunk_queries']}")
            lines.append(f"| {run['dataset']} | {run['epsilon']:g} | {loop} | {run['images']:,} | "
                         f"{run['seconds']:,.1f} s | {run['images_per_second']:,.1f} | "
                         f"{run['forward_passes_per_second']:,.0f} | {_pct(run['success_rate'])} | "
                         f"{run['mean_queries']:,.0f} |")
        made.append(_made(root, name))
    return "\n".join(lines) + "\n\n" + " ".join(made) + "\n"


def gen_suite(root: Path, name: str) -> str:
    """``benchmarks/suite_time.py --json``: the test suite's size, outcome and time."""
    r = _load(root, name, "benchmark.json")
    outcome = ", ".join(f"{v:,} {k}" for k, v in r["outcome"].items())
    return f"{outcome} in {_secs(r['seconds'], bold=True)}: {_made(root, name)}\n"


def gen_aaspeed(root: Path, *names: str) -> str:
    """AutoAttack (standard) ours against torchattacks, one row per ``autoattack_crosscheck.py --json`` file:
    robust accuracy, time, the ratio and its bound (the reference's time over our Square's)."""
    lines = ["| model, images, ε | robust accuracy, ours | torchattacks | time, ours | torchattacks | "
             "torchattacks ÷ ours | bound: torchattacks ÷ our Square | our time per attack |",
             "|" + " --- |" * 8]
    made = []
    for name in names:
        r = _load(root, name, "benchmark.json")
        row = r["attacks"]["autoattack"]
        per = row.get("ours_by_attack", {}).get("seconds", {})
        bound = row.get("speedup_bound")
        lines.append(
            f"| {r['weights']}, first {r['images']:,} {r['dataset']}, ε {r['eps']:g} | {_pct(row['robust_ours'])} | "
            f"{_pct(row['robust_reference'])} | {row['seconds_ours']:,.0f} s | {row['seconds_reference']:,.0f} s | "
            f"**{row['seconds_reference'] / max(row['seconds_ours'], 1e-9):.2f}×** | "
            + (f"{bound:.1f}×" if bound is not None else "–") + " | "
            + (", ".join(f"{k} {v:,.0f} s" for k, v in per.items()) or "–") + " |")
        made.append(_made(root, name))
    return "\n".join(lines) + "\n\n" + " ".join(sorted(set(made))) + "\n"


def _walk(obj, path: str, where: str):
    """``obj`` followed along dotted ``path`` (dict keys; list indices as numbers)."""
    for part in path.split("."):
        if isinstance(obj, dict) and part in obj:
            obj = obj[part]
        elif isinstance(obj, list) and re.fullmatch(r"-?\d+", part) and -len(obj) <= int(part) < len(obj):
            obj = obj[int(part)]
        else:
            raise DocsError(f"{where} has no {path} (no {part!r})")
    return obj


def gen_number(root: Path, name: str, path: str, digits: str = "2", unit: str = "") -> str:
    """One number for running text from a results folder: ``path`` is dotted keys into its ``benchmark.json`` (a
    benchmark report) or else its ``results.json`` (list indices as numbers, e.g. ``0.masking.margin_median``);
    ``unit`` (``%``, ``×``…) is appended."""
    return f"{_number_at(root, name, path):,.{_digits(digits)}f}{unit}"


def _number_at(root: Path, name: str, path: str) -> float:
    """The number at dotted ``path`` of a results folder's report (see :func:`gen_number`)."""
    file = _report_file(root, name)
    v = _walk(_load(root, name, file), path, f"{RESULTS / name}/{file}")
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise DocsError(f"{RESULTS / name}: {path} is {v!r}, not a number")
    return v


def _report_file(root: Path, name: str) -> str:
    """A results folder's one report: ``benchmark.json`` (a benchmark) or ``results.json`` (a run), not both."""
    have = [f for f in ("benchmark.json", "results.json") if (root / RESULTS / name / f).exists()]
    if len(have) == 2:
        raise DocsError(f"{RESULTS / name} holds both benchmark.json and results.json: which one is meant?")
    return have[0] if have else "results.json"


def _digits(digits: str) -> int:
    if not re.fullmatch(r"\d", digits):
        raise DocsError(f"digits must be one digit 0-9, got {digits!r}")
    return int(digits)


def gen_share(root: Path, name: str, part: str, whole: str, digits: str = "2") -> str:
    """A percentage of two numbers of one results folder (dotted paths as for ``number``): part / whole."""
    a, b = (_number_at(root, name, path) for path in (part, whole))
    if b == 0:
        raise DocsError(f"{RESULTS / name}: {whole} is 0")
    return f"{100 * a / b:.{_digits(digits)}f}%"


def gen_failures(root: Path, name: str, attack: str) -> str:
    """'N of M': how many of an attack's failures (first row of an evaluate results file) were still changing at
    the search cap, of all its failures."""
    r = _walk(_load(root, name, "results.json"), "0", f"{RESULTS / name}/results.json")
    keys = (f"{attack}_still_changing_at_cap", f"{attack}_rate", "attacked")
    if any(r.get(k) is None for k in keys):
        raise DocsError(f"{RESULTS / name}/results.json: no {', '.join(keys)}")
    failed = round(r["attacked"] * (1 - r[f"{attack}_rate"] / 100))
    return f"{r[keys[0]]:,} of {failed:,}"


def gen_nbtime(root: Path, notebook: str) -> str:
    """A stored notebook's run time, from its cells' execution timestamps (first input to last reply)."""
    path = root / "notebooks" / f"{notebook}.ipynb"
    if not path.exists():
        raise DocsError(f"{path.relative_to(root)} does not exist")
    stamps = [c.get("metadata", {}).get("execution", {}) for c in json.loads(path.read_text())["cells"]]
    starts = [s["iopub.execute_input"] for s in stamps if "iopub.execute_input" in s]
    ends = [s["shell.execute_reply"] for s in stamps if "shell.execute_reply" in s]
    if not starts or not ends:
        raise DocsError(f"{path.relative_to(root)} has no execution times (execute it with its outputs stored)")
    seconds = (datetime.datetime.fromisoformat(max(ends).replace("Z", "+00:00"))
               - datetime.datetime.fromisoformat(min(starts).replace("Z", "+00:00"))).total_seconds()
    return f"{seconds:.0f} s" if seconds < 60 else f"{seconds / 60:.0f} min"


def gen_lead(root: Path, name: str, attack: str) -> str:
    """Square's largest lead over one gradient attack in an ``evaluate --curves`` masking report, as running text:
    '21.6 points at ε = 48 (significant)' (points of % attacked; the report's paired test), or 'never ahead'."""
    rows = _walk(_load(root, name, "results.json"), f"0.masking.gap_vs.{attack}", f"{RESULTS / name}/results.json")
    if not rows:
        raise DocsError(f"{RESULTS / name}: the masking report compares Square with {attack} at no budget")
    best = max(rows, key=lambda r: r["gap"])
    if best["gap"] <= 0:
        return "never ahead"
    return (f"{best['gap']:.1f} points at ε = {best['epsilon']:g} "
            f"({'significant' if best.get('significant') else 'not significant'})")


FGS_WAYS = {"paper": "float32 softmax, the paper's blank rule",
            "float64_softmax": "softmax − onehot in float64, pulled back in float32",
            "float64": "softmax − onehot and the model in float64",
            "exact": "ours, `fgs_direction(exact=True)`: log-space cotangent",
            "exact_float64_model": "ours, with the model in float64",
            "float64_reference": "float64 gradient of softplus(logsumexp<sub>j≠y</sub> z<sub>j</sub> − z<sub>y</sub>)"}


def gen_fgsprecision(root: Path, name: str) -> str:
    """``benchmarks/fgs_precision.py --json``: the FGS direction computed each way the report holds, its agreement
    with the float64 reference and the paper's line search along each."""
    r = _load(root, name, "benchmark.json")
    lines = ["| FGS direction | blank directions | same sign as the float64 reference (all pixels / of non-blank "
             "directions) | pixels (images) of another sign | FGS success | mean L∞ |",
             "| --- | --- | --- | --- | --- | --- |"]
    for key, w in r["ways"].items():
        nonblank = "–" if w["sign_agreement_nonblank"] is None else _pct(w["sign_agreement_nonblank"], 1)
        lines.append(f"| {FGS_WAYS.get(key, key)} | {w['blank']:,} | {_pct(w['sign_agreement'], 1)} / {nonblank} | "
                     f"{w['pixels_differing']:,} ({w['images_differing']:,}) | {_pct(w['rate'])} | "
                     f"{_num(w['linf_mean'])} |")
    return "\n".join(lines) + (
        f"\n\n{r['weights']}, the {r['attacked']:,} correctly classified of the first {r['images']:,} "
        f"{r['dataset']} test images (median logit margin {r['margin_median']:.1f}; above 90 on "
        f"{_pct(r['margin_share_above_90'], 1)}), {r['pixels']:,} pixels in all; data {r['data_source']}; "
        f"line search t ≤ 255. {_made(root, name)}\n")


VARIANTS = {"caffe": "as the library evaluates (RGB, per-pixel mean image, border windows ÷ in-image size)",
            "dropout_gradients": "attack directions with dropout active", "bgr_input": "input channels in BGR order",
            "bgr_mean": "mean image in BGR order", "channel_mean": "per-channel mean instead of the mean image",
            "avg_pool_full_window": "average pooling dividing border windows by 9"}


def gen_variants(root: Path, *names: str) -> str:
    """``benchmarks/cifar_variants.py --json`` reports: each variant's accuracy per model, and the paper's FGS and
    HC1 of the first report that attacked images (``--limit`` > 0)."""
    if not names:
        raise DocsError("variants: name at least one results folder")
    reports = [_load(root, n, "benchmark.json") for n in names]
    attacked = next((r for r in reports if r["images"]), None)
    keys = list(dict.fromkeys(k for r in reports for k in r["variants"]))
    head = " | ".join(f"accuracy, {r['weights']}" for r in reports)
    lines = [f"| variant | {head} | attacked | FGS success (mean L∞) | HC1 success (mean L∞) |",
             "|" + " --- |" * (len(reports) + 4)]
    for key in keys:
        accs = " | ".join(_pct(r["variants"][key]["accuracy"]) if key in r["variants"] else "–" for r in reports)
        row = attacked["variants"].get(key, {}) if attacked else {}
        attacks = " | ".join(f"{_pct(row[f'{a}_rate'])} ({_num(row[f'{a}_linf_mean'])})" if f"{a}_rate" in row
                             else "–" for a in ("fgs", "hc1"))
        lines.append(f"| {VARIANTS.get(key, key)} | {accs} | {row.get('attacked', '–')} | {attacks} |")
    first = reports[0]
    where = (f"; FGS (paper rule, t ≤ 255) and HC1 (t ≤ 1,020) on the images each variant classifies correctly "
             f"among the first {attacked['images']:,} (the 'attacked' column), with {attacked['weights']}"
             if attacked else "")
    made = " ".join(_made(root, n) for n in names)
    sources = sorted({r.get("data_source", "unrecorded") for r in reports})
    return "\n".join(lines) + (
        f"\n\nAccuracy on all {first['test_images']:,} test images{where}; data {', '.join(sources)}. {made}\n")


GENERATORS = {"meta": gen_meta, "runtime": gen_runtime, "runtimes": gen_runtimes, "table": gen_table,
              "seeds": gen_seeds, "released": gen_released, "summary": gen_summary, "value": gen_value,
              "hc1cap": gen_hc1cap, "pgd": gen_pgd, "throughput": gen_throughput, "curves": gen_curves,
              "robust": gen_robust, "masking": gen_masking, "steptime": gen_steptime,
              "attackspeed": gen_attackspeed, "squarespeed": gen_squarespeed, "suite": gen_suite,
              "aaspeed": gen_aaspeed, "agreement": gen_agreement,
              "autoattack": gen_autoattack,
              "crosscheck": gen_crosscheck, "number": gen_number, "lead": gen_lead,
              "fgsprecision": gen_fgsprecision, "variants": gen_variants, "share": gen_share,
              "failures": gen_failures, "nbtime": gen_nbtime}


def generate(root: Path, spec: str) -> str:
    words = spec.split()
    if not words or words[0] not in GENERATORS:
        raise DocsError(f"unknown generator in <!-- results: {spec} -->; known: {', '.join(GENERATORS)}")
    try:
        return GENERATORS[words[0]](root, *words[1:])
    except (TypeError, ValueError) as err:
        raise DocsError(f"<!-- results: {spec} -->: {err}") from None


def documents(root: Path) -> list[Path]:
    return [p for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))] if p.exists()]


def render(root: Path = ROOT) -> dict[Path, str]:
    """{document: its text with every block regenerated}."""
    out = {}
    for path in documents(root):
        text = path.read_text()
        if len(OPENER.findall(text)) != len(BLOCK.findall(text)):
            raise DocsError(f"{path.relative_to(root)}: a <!-- results: … --> block is not closed by "
                            "<!-- /results --> before the next one")
        out[path] = BLOCK.sub(lambda m: m.group(1) + generate(root, m.group("spec").strip()) + m.group(4), text)
    return out


def stale(root: Path = ROOT) -> list[str]:
    """The blocks whose text differs from what the results files give ("file: spec")."""
    problems = []
    for path, new in render(root).items():
        old_blocks = {m.start(): (m.group("spec"), m.group("body")) for m in BLOCK.finditer(path.read_text())}
        new_blocks = [(m.group("spec"), m.group("body")) for m in BLOCK.finditer(new)]
        for (spec, body), (_, fresh) in zip(old_blocks.values(), new_blocks):
            if body != fresh:
                problems.append(f"{path.relative_to(root)}: <!-- results: {spec} -->")
    return problems


# ------------------------------------------------------------------------------------------------------------
# Collecting a run.


def _scrub(obj, data_dir: str | None):
    """Machine paths out: a data source under the data folder becomes $BANG_DATA_DIR/…, any other absolute path its
    last component."""
    if isinstance(obj, dict):
        return {k: _scrub(v, data_dir) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_scrub(v, data_dir) for v in obj]
    if isinstance(obj, str):
        base = (data_dir or "").rstrip("/")
        if base:  # the data folder itself or a path under it, not a longer name that starts the same
            obj = re.sub(re.escape(base) + r"(?=/|$|\s|\")", "$BANG_DATA_DIR", obj)
        # any other absolute path: its last component (URLs and ~/ paths are left alone)
        return re.sub(r"(?<![\w$/~.])/(?:[\w.+-]+/)+([\w.+-]+)", r"…/\1", obj)
    return obj


def machine() -> str:
    import jax  # noqa: PLC0415

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    devices = jax.devices()
    kind = devices[0].device_kind if devices[0].platform != "cpu" else f"{os.cpu_count()}-core CPU ({cpu})"
    return f"{kind}, jax {jax.__version__} ({jax.default_backend()})"


def collect(source: Path, name: str, command: str, *, code_version: str | None = None, dataset: str | None = None,
            root: Path = ROOT, seconds: float | None = None, note: str = "", benchmark: bool = False) -> Path:
    """Copies a run directory, an ``evaluate --json`` file or (``benchmark``) a benchmark's ``--json`` report into
    ``docs/results/NAME`` (paths scrubbed)."""
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*", name) or ".." in name:
        raise DocsError(f"results name {name!r}: use letters, digits, '.', '_' and '-' (a folder under {RESULTS})")
    if source.is_dir() and not (source / "config.json").is_file():
        raise DocsError(f"{source} is not a run directory (no config.json)")
    if not source.is_dir():
        json.loads(source.read_text())  # a readable JSON file, before anything is replaced
    dest = root / RESULTS / name
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    data_dir = os.environ.get("BANG_DATA_DIR")
    data_dir = str(Path(data_dir).resolve()) if data_dir else None
    timings = {}
    if source.is_dir():
        config = json.loads((source / "config.json").read_text())
        dataset = dataset or config["dataset"]
        for file in ("results.json", "seeds.json", "noise.json", "timings.json"):
            if (source / file).exists():
                obj = _scrub(json.loads((source / file).read_text()), data_dir)
                (dest / file).write_text(json.dumps(obj, indent=2) + "\n")
        for file in ("seeds.png", "fig1_hc1.png", "noise.png", "curves.png"):
            if (source / file).exists():
                shutil.copy(source / file, dest / file)
        if (source / "timings.json").exists():
            timings = json.loads((source / "timings.json").read_text())
        config_copy = _scrub({k: v for k, v in config.items() if k != "command"}, data_dir)
        (dest / "config.json").write_text(json.dumps(config_copy, indent=2) + "\n")
    elif benchmark:
        obj = json.loads(source.read_text())
        if not isinstance(obj, dict):
            raise DocsError(f"{source} is not a benchmark report (a JSON object)")
        (dest / "benchmark.json").write_text(json.dumps(_scrub(obj, data_dir), indent=2) + "\n")
    else:
        if dataset is None:
            raise DocsError("collect from an evaluate --json file needs --dataset")
        obj = _scrub(json.loads(source.read_text()), data_dir)
        (dest / "results.json").write_text(json.dumps(obj if isinstance(obj, list) else [obj], indent=2) + "\n")
    if code_version is None:
        code_version = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                      text=True).stdout.strip() or "unknown"
    total = seconds if seconds is not None else timings.get("last_command_seconds")
    meta = {"command": command, "code_version": code_version, "machine": machine(), "dataset": dataset,
            "date": datetime.date.today().isoformat(), "note": note,
            "seconds": ({k: v for k, v in timings.items() if k.endswith("_seconds") and k != "last_command_seconds"}
                        | ({"total": total} if total is not None else {}))}
    (dest / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return dest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.docs_tables", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd")
    p.add_argument("--check", action="store_true", help="only list the blocks that differ (exit 1 if any)")
    c = sub.add_parser("collect", help="copy a run directory or an evaluate --json file into docs/results/NAME")
    c.add_argument("source", type=Path)
    c.add_argument("name")
    c.add_argument("--command", required=True, help="the exact command that made it")
    c.add_argument("--code-version", help="git commit of the code that made it (default: this checkout's HEAD)")
    c.add_argument("--dataset", choices=("mnist", "cifar10"))
    c.add_argument("--seconds", type=float, help="the measured run time (default: the run's timings.json)")
    c.add_argument("--note", default="", help="conditions of the measurement (e.g. 'CPU shared with another run')")
    c.add_argument("--benchmark", action="store_true", help="SOURCE is a benchmark's --json report")
    args = p.parse_args(argv)
    try:
        if args.cmd == "collect":
            if not args.source.exists():
                raise DocsError(f"{args.source} does not exist")
            dest = collect(args.source, args.name, args.command, code_version=args.code_version,
                           dataset=args.dataset, seconds=args.seconds, note=args.note, benchmark=args.benchmark)
            print(f"wrote {dest.relative_to(ROOT)}; now run python -m experiments.docs_tables", file=sys.stderr)
            return 0
        if args.check:
            problems = stale()
            for line in problems:
                print(f"stale: {line}", file=sys.stderr)
            if problems:
                print("run python -m experiments.docs_tables to regenerate them", file=sys.stderr)
            return 1 if problems else 0
        changed = 0
        for path, text in render().items():
            if path.read_text() != text:
                path.write_text(text)
                changed += 1
                print(f"rewrote {path.relative_to(ROOT)}", file=sys.stderr)
        print(f"{changed} file(s) changed", file=sys.stderr)
        return 0
    except (DocsError, json.JSONDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
