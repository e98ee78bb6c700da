"""The documentation works: README code blocks run, notebooks execute, docs/api.md lists every public name.

README blocks run as written, except that loop counts and ``steps=`` are capped at 20 so they finish in seconds.
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
NOTEBOOK_NAMES = ("quickstart", "your_own_model", "reproduce_paper", "robustness")
USER_DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]


# ------------------------------------------------------------------------------------------------------------
# Text checks (fast).


def _python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, dedented source) of every fenced ```python block, also inside list items."""
    blocks = []
    for m in re.finditer(r"^(?P<indent>[ \t]*)```python[ \t]*\n(?P<body>.*?)^(?P=indent)```", text, re.M | re.S):
        blocks.append((text[: m.start()].count("\n") + 1, textwrap.dedent(m.group("body"))))
    return blocks


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
    for link in re.findall(r"\]\(((?!https?:|#)[^)#]+)", README.read_text()):
        assert (ROOT / link).exists(), f"README links to missing {link}"


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
    text = README.read_text()
    order = ["## Quickstart", "## What BANG is", "### Two ways to compute it", "## Train a model with BANG",
             "## What the experiments reproduce", "## Data and the authors' weights", "## Notebooks",
             "## Documentation, citation, license", "## BANG in your own training loop"]
    positions = [text.index(h) for h in order]
    assert positions == sorted(positions)
    quickstart = re.search(r"## Quickstart\n\n```bash\n(.*?)```", text, re.S).group(1).strip().splitlines()
    assert quickstart == ['pip install -e . && python -m experiments.mnist',
                          'pip install -e ".[test]" && python -m pytest']
    for symbol in ("κ_i", "n_i", "m = max", "ε_i", "ratio", "β"):
        assert symbol in text[: positions[3]], f"{symbol} is not defined in 'What BANG is'"
    assert "@inproceedings{" in text and "(LICENSE)" in text and (ROOT / "LICENSE").exists()
    assert "BSD 2-Clause" in (ROOT / "LICENSE").read_text()


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
# README code blocks.


def _shrink(source: str) -> str:
    source = re.sub(r"\brange\((\d[\d_]*)\)", r"range(min(\1, 20))", source)
    return re.sub(r"\bsteps=(\d[\d_]*)", r"steps=min(\1, 20)", source)


README_BLOCKS = _python_blocks(README.read_text())


@pytest.mark.parametrize("line,source", README_BLOCKS, ids=[f"README-line-{n}" for n, _ in README_BLOCKS])
def test_readme_python_block_runs(line, source, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # blocks may write run directories
    namespace = {"__name__": "__readme__"}
    with jax.numpy_rank_promotion("allow"), warnings.catch_warnings():
        warnings.simplefilter("ignore", bang_jax.data.DataFallbackWarning)  # no data: the announced subset
        exec(compile(_shrink(source), f"README.md:{line}", "exec"), namespace)  # noqa: S102
    capsys.readouterr()


def test_readme_has_python_examples():
    assert len(README_BLOCKS) >= 4


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
    nb = _execute(name, env)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{name} drew no figure"
    stderr = "".join(o.get("text", "") for o in outputs if o.get("name") == "stderr")
    # Only the loaders' announced fallback (no data directory) may speak up; no library noise.
    noise = set(re.findall(r"\b\w*Warning\b|WARNING:\w+", stderr)) - {"DataFallbackWarning"}
    assert not noise, f"{name} printed {sorted(noise)}:\n{stderr[-2000:]}"
