"""The documentation works: code blocks run, links resolve, notebooks execute, docs/api.md lists every public name.

The ```python blocks of README.md and of every docs/*.md page run as written, except that loop counts and
``steps=`` are capped at 20 so they finish in seconds. A block that is not meant to run here (it needs files a
fresh clone does not have, such as the authors' weights) carries the marker comment
``<!-- docs-test: skip (reason) -->`` on the line right above its opening fence; the reason is for the reader.
Every relative link in those pages must resolve, ``#anchors`` into .md files included (GitHub's rule: the heading in
lowercase, punctuation other than ``-`` and ``_`` removed, spaces turned into ``-``).
Notebooks run in a Jupyter kernel with ``BANG_NOTEBOOK_SIZE=ci``, which each notebook reads to shrink itself;
``reproduce_paper`` reads a tiny experiment run this module makes first. Without nbclient/ipykernel (the
``test`` extra installs them) the notebook tests skip.
"""

import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import jax
import pytest

import bang_jax

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
NOTEBOOKS = ROOT / "notebooks"
NOTEBOOK_NAMES = ("quickstart", "your_own_model", "reproduce_paper", "robustness", "modern_network")
USER_DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
SKIP_MARKER = re.compile(r"<!--\s*docs-test:\s*skip\b[^>]*-->\s*\Z")


# ------------------------------------------------------------------------------------------------------------
# Text checks (fast).


def _python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, dedented source) of every fenced ```python block, also inside list items, except those whose
    opening fence follows the skip marker."""
    blocks = []
    for m in re.finditer(r"^(?P<indent>[ \t]*)```python[ \t]*\n(?P<body>.*?)^(?P=indent)```", text, re.M | re.S):
        if SKIP_MARKER.search(text[: m.start()].rstrip()):
            continue
        blocks.append((text[: m.start()].count("\n") + 1, textwrap.dedent(m.group("body"))))
    return blocks


def _without_code(text: str) -> str:
    """The text with fenced code blocks and inline code blanked out (their ``#`` lines are not headings, their
    brackets not links); line numbers are kept."""
    text = re.sub(r"^([ \t]*)(```|~~~).*?^\1\2", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "``", text)


def _without_code_keep_inline(text: str) -> str:
    """The text with fenced code blocks removed and inline code reduced to its content (headings keep it)."""
    text = re.sub(r"^([ \t]*)(```|~~~).*?^\1\2", "", text, flags=re.M | re.S)
    return re.sub(r"`([^`\n]*)`", r"\1", text)


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a Markdown file (a repeated heading gets -1, -2, …)."""
    anchors, seen = set(), {}
    for heading in re.findall(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", _without_code_keep_inline(path.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _relative_links(path: Path) -> list[str]:
    """The link and image targets of a Markdown file that are not URLs (``#anchor`` alone included)."""
    targets = re.findall(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", _without_code(path.read_text()))
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t, re.I)]


def _public_modules() -> dict[str, object]:
    modules = {"bang_jax": bang_jax}
    for info in pkgutil.iter_modules(bang_jax.__path__):
        if not info.name.startswith("_"):
            modules[f"bang_jax.{info.name}"] = importlib.import_module(f"bang_jax.{info.name}")
    return modules


def _api_sections() -> dict[str, set[str]]:
    """``{module: names}`` listed in docs/api.md: a ``## `module` `` heading, then items ``- `name(…)` — …``.

    An item may name several objects before its dash (``- `a(…)`, `b(…)` — …``) and run over several lines.
    """
    sections, current, items = {}, None, []
    for line in (ROOT / "docs" / "api.md").read_text().splitlines() + [""]:
        heading = re.match(r"^## `([\w.]+)`", line)
        if heading:
            current = sections.setdefault(heading.group(1), set())
        elif current is not None and line.startswith("- "):
            items.append([current, line])
        elif items and line.startswith("  "):
            items[-1][1] += " " + line.strip()
    for section, item in items:
        section.update(re.findall(r"`(\w+)[(`]", item.split(" — ")[0]))
    return sections


def test_api_reference_lists_every_public_name():
    sections = _api_sections()
    problems = []
    for name, module in _public_modules().items():
        public = set(getattr(module, "__all__", ()))
        if not public:
            problems.append(f"{name} has no __all__")
            continue
        listed = sections.get(name)
        if listed is None:
            problems.append(f"docs/api.md has no section for {name}")
            continue
        if public - listed:
            problems.append(f"{name}: not in docs/api.md: {sorted(public - listed)}")
        if listed - public:
            problems.append(f"{name}: docs/api.md lists names not in __all__: {sorted(listed - public)}")
    assert not problems, "\n".join(problems)


def test_user_docs_stand_alone():
    """What users read never points at files outside the repository or at internal documents."""
    texts = {p.name: p.read_text() for p in USER_DOCS}
    for name in NOTEBOOK_NAMES:
        nb = json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())
        texts[f"{name}.ipynb"] = "\n".join("".join(c["source"]) for c in nb["cells"])
    for name, text in texts.items():
        for needle in ("SPEC §", "SPEC.md", "../shared", "shared/data", "SOURCES.md"):
            assert needle not in text, f"{name} mentions {needle!r}"
    for path in USER_DOCS:
        text = path.read_text()
        assert not re.search(r"\bSPEC\b", text), f"{path.name} mentions SPEC"
        hits = re.findall(r"(?:/work/|/tmp/|/root/|/home/|/Users/)[^\s\"'`)]*", text)
        assert not hits, f"{path.name} holds machine paths: {sorted(set(hits))[:5]}"


def test_user_docs_links_resolve():
    """Every relative link of README.md and docs/*.md points at a file of the repository, and every #anchor into a
    Markdown file at one of its headings."""
    problems = []
    for path in USER_DOCS:
        for target in _relative_links(path):
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            name = f"{path.relative_to(ROOT)} -> {target}"
            if not dest.exists():
                problems.append(f"{name}: no such file")
            elif ROOT not in dest.parents and dest != ROOT:
                problems.append(f"{name}: outside the repository")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                problems.append(f"{name}: no heading with that anchor")
    assert not problems, "\n".join(problems)


def test_anchor_rule():
    assert _anchors(README) >= {"what-bang-is", "quickstart", "train-a-model-with-bang", "citation-and-license"}
    assert "what-bang-does-and-does-not-buy--read-before-citing-robustness-numbers" in _anchors(
        ROOT / "docs" / "robustness.md")


def test_committed_notebook_outputs_hold_no_machine_paths():
    """Outputs speak of the user's machine only: no absolute path of the machine that ran them."""
    for name in NOTEBOOK_NAMES:
        nb = json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())
        outputs = "\n".join("".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", ""))
                            + "".join(o.get("data", {}).get("text/markdown", ""))
                            for c in nb["cells"] for o in c.get("outputs", []))  # text, not image bytes
        hits = re.findall(r"(?:/work/|/tmp/|/root/|/home/|/Users/)[^\s\"']*", outputs)
        assert not hits, f"{name}.ipynb outputs hold machine paths: {sorted(set(hits))[:5]}"


def test_readme_top_has_what_users_need_first():
    """The README is the front door: what BANG is, the quickstart, one training example, the findings, the map of
    the docs, then how to cite; everything else lives in docs/."""
    text = README.read_text()
    order = ["# bang-jax\n", "## Quickstart", "## What BANG is", "## Train a model with BANG", "## What we found",
             "## Documentation", "## Citation and license"]
    positions = [text.index(h) for h in order]
    assert positions == sorted(positions)
    assert [h for h in re.findall(r"^#{1,2} .+$", _without_code(text), re.M)] == [h.strip() for h in order]
    before, block = re.search(r"## Quickstart\n(.*?)```bash\n(.*?)```", text, re.S).groups()
    assert "python -m bang_jax.data download mnist" in before and "BANG_DATA_DIR" in before
    assert block.strip().splitlines() == ['pip install -e . && python -m experiments.mnist',
                                          'pip install -e ".[test]" && python -m pytest']
    for symbol in ("κ_i", "n_i", "m = max", "ε_i", "ratio", "β"):
        assert symbol in text[: positions[3]], f"{symbol} is not defined before 'Train a model with BANG'"
    documentation = text[positions[5]: positions[6]]
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"(docs/{page.name})" in documentation, f"the README's Documentation table misses docs/{page.name}"
    assert "@inproceedings{" in text and "(LICENSE)" in text and (ROOT / "LICENSE").exists()
    assert "BSD 2-Clause" in (ROOT / "LICENSE").read_text()
    assert "(CITATION.cff)" in text and "cff-version: 1.2.0" in (ROOT / "CITATION.cff").read_text()
    assert len(text.splitlines()) <= 175, "the README is a front door: move details into docs/"


def test_committed_notebooks_hold_outputs_and_pictures():
    for name in NOTEBOOK_NAMES:
        nb = json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())
        cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
        outputs = [o for c in cells for o in c.get("outputs", [])]
        assert all(c.get("execution_count") for c in cells), f"{name}: not every cell was executed"
        assert not [o for o in outputs if o["output_type"] == "error"], f"{name}: stored with an error"
        images = [o for o in outputs if "image/png" in o.get("data", {})]
        assert images, f"{name}: no figure"
        assert "notebook run time" in json.dumps(outputs), f"{name}: does not report its run time"


# ------------------------------------------------------------------------------------------------------------
# Code blocks of README.md and docs/*.md.


def _shrink(source: str) -> str:
    source = re.sub(r"\brange\((\d[\d_]*)\)", r"range(min(\1, 20))", source)
    return re.sub(r"\bsteps=(\d[\d_]*)", r"steps=min(\1, 20)", source)


DOC_BLOCKS = [(path.relative_to(ROOT).as_posix(), line, source)
              for path in USER_DOCS for line, source in _python_blocks(path.read_text())]


@pytest.mark.parametrize("doc,line,source", DOC_BLOCKS, ids=[f"{d}-line-{n}" for d, n, _ in DOC_BLOCKS])
def test_docs_python_block_runs(doc, line, source, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # blocks may write run directories
    namespace = {"__name__": "__docs__"}
    with jax.numpy_rank_promotion("allow"), warnings.catch_warnings():
        warnings.simplefilter("ignore", bang_jax.data.DataFallbackWarning)  # no data: the announced subset
        exec(compile(_shrink(source), f"{doc}:{line}", "exec"), namespace)  # noqa: S102
    capsys.readouterr()


def test_docs_have_python_examples():
    assert [d for d, _, _ in DOC_BLOCKS].count("README.md") >= 1
    assert len(DOC_BLOCKS) >= 5
    skipped = sum(len(re.findall(r"```python", p.read_text())) for p in USER_DOCS) - len(DOC_BLOCKS)
    assert skipped <= 2, "more than two code blocks are marked not to run: make them runnable"


# ------------------------------------------------------------------------------------------------------------
# Notebooks at CI size.


def _weights_dir() -> Path | None:
    from conftest import real_data_dir  # noqa: PLC0415

    d = real_data_dir()
    return d if d is not None and (d / "bang_caffe" / "lenet_bang.caffemodel.h5").is_file() else None


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A very small MNIST experiment run for reproduce_paper (about 40 s)."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    cmd = [sys.executable, "-m", "experiments.mnist", "--preset", "smoke", "--out", str(out), "--no-progress",
           "--steps", "20", "--log-every", "10", "--checkpoint-every", "10", "--noise-every", "10",
           "--noise-sigmas", "0,100", "--noise-per-class", "1", "--noise-copies", "4", "--test-limit", "100",
           "--hc1-max-step", "64", "--figure-images", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _execute(name: str, env: dict) -> dict:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb


@pytest.mark.parametrize("name", NOTEBOOK_NAMES)
def test_notebook_executes_at_ci_size(name, request):
    env = {"BANG_NOTEBOOK_SIZE": "ci", "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
    if name == "reproduce_paper":
        env["BANG_RUN_DIR"] = str(request.getfixturevalue("tiny_run"))
    if name == "robustness":
        weights = _weights_dir()
        if weights is None:
            pytest.skip("the authors' weights are not available (BANG_DATA_DIR/bang_caffe)")
        env["BANG_DATA_DIR"] = str(weights)
    if name == "modern_network":
        from conftest import real_data_dir  # noqa: PLC0415

        data = real_data_dir()
        if data is None or not (data / "cifar10").is_dir():
            pytest.skip("the CIFAR-10 files are not available (BANG_DATA_DIR/cifar10)")
        env["BANG_DATA_DIR"] = str(data)
    nb = _execute(name, env)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{name} drew no figure"
    stderr = "".join(o.get("text", "") for o in outputs if o.get("name") == "stderr")
    # Only the loaders' announced fallback (no data directory) may speak up; no library noise.
    noise = set(re.findall(r"\b\w*Warning\b|WARNING:\w+", stderr)) - {"DataFallbackWarning"}
    assert not noise, f"{name} printed {sorted(noise)}:\n{stderr[-2000:]}"
