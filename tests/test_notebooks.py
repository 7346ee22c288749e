"""The notebooks in notebooks/: stored clean, public API only, and every one runs from top to bottom.

Each notebook is executed with nbclient on an ipykernel of this interpreter, in a fresh working
directory (tmp_path: every run a notebook trains lands under it), with FASHIONLAB_NOTEBOOK_SUBSET
set so it trains on a small stratified subset. The notebooks need the real dataset: like
conftest's `real_data`, a missing dataset fails under CI=true and skips elsewhere.
"""

from __future__ import annotations

import ast
import base64
import json
import os
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
SUBSET = "2000"  # training images per run in quick mode
CELL_TIMEOUT = 600  # seconds; a cell that hangs fails instead of blocking the suite

# Beyond the standard library, the only modules a notebook may import (user code: arrays, plots, images).
ALLOWED_THIRD_PARTY = {"fashionlab", "numpy", "matplotlib", "PIL"}

# What each notebook must show besides running cleanly: text in its outputs (regular expressions) and
# the least number of figures (PNG images, inline or embedded in HTML).
EXPECTED = {
    "01_explore.ipynb": dict(text=[r"\(60000, 28, 28\) uint8", r"closest pairs", r"Pullover\s+~ Coat"], figures=7),
    "02_dense_vs_cnn.ipynb": dict(text=[r"mlp: test accuracy 0\.\d{4}", r"cnn: test accuracy 0\.\d{4}",
                                        r"Comparison", r"hardest class for cnn: ", r"mistakes fewer with the CNN"],
                                  figures=7),
    "03_cnn_vs_lstm.ipynb": dict(text=[r"cnn_small seed 4: test accuracy 0\.\d{4}", r"lstm seed 4: test accuracy 0\.\d{4}",
                                       r"Study.*cnn-vs-rnn", r"winner here: ", r"the models disagree on"], figures=6),
    "04_augmented_cnn.ipynb": dict(text=[r"test accuracy 0\.\d{4} after 2 epochs", r"Normalize\(.*resize=32",
                                         r"test-\d+\.png \(true class: Shirt\)\n  \S.* \d+\.\d%",
                                         r"same from a PIL image and from the array: True"], figures=7),
    "05_conv_experiment.ipynb": dict(text=[r"16 of 16 trainings done, 0 failed", r"Sweep.*conv-layers-quick",
                                           r"kernel\s+3\s", r"depth\s+2\s", r"pool\s+stride\s", r"\bbest\b",
                                           r"(not significantly different|significant)",
                                           r"depth: best level \d", r"16 run folders"], figures=2),
}


def test_every_notebook_has_expectations():
    assert NOTEBOOKS, f"no notebooks in {NOTEBOOK_DIR}"
    assert sorted(EXPECTED) == [p.name for p in NOTEBOOKS]


# --------------------------------------------------------------------------- stored form

def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _code(nb: dict) -> list[str]:
    return ["".join(c["source"]) if isinstance(c["source"], list) else c["source"]
            for c in nb["cells"] if c["cell_type"] == "code"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs(path):
    nb = _read(path)
    assert nb["nbformat"] == 4
    first = nb["cells"][0]
    assert first["cell_type"] == "markdown" and "".join(first["source"]).lstrip().startswith("# "), \
        "a notebook opens with a markdown cell: a title, what it reproduces and what to look at"
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], f"cell {i} has stored outputs: clear them before committing"
            assert cell["execution_count"] is None, f"cell {i} has an execution count: clear it before committing"
        assert "attachments" not in cell or not cell["attachments"], f"cell {i} has attachments"
    markdown = "".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    assert "FASHIONLAB_NOTEBOOK_SUBSET" in markdown, "a markdown cell says what the quick mode changes"


def _public_names() -> set[str]:
    import fashionlab
    return set(fashionlab.__all__)


def api_violations(source: str, public: set[str]) -> list[str]:
    """What a code cell does beyond `import fashionlab` and its public names (and the allowed modules)."""
    tree = ast.parse(source)
    problems, aliases = [], set()
    stdlib = set(sys.stdlib_module_names)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                top = a.name.split(".")[0]
                if top == "fashionlab":
                    if a.name != "fashionlab":
                        problems.append(f"line {node.lineno}: import {a.name} (a submodule; use `import fashionlab as fl`)")
                    aliases.add(a.asname or "fashionlab")
                elif top not in ALLOWED_THIRD_PARTY and top not in stdlib:
                    problems.append(f"line {node.lineno}: import {a.name} (not fashionlab, numpy, matplotlib, PIL "
                                    f"or the standard library)")
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            top = module.split(".")[0]
            if node.level:
                problems.append(f"line {node.lineno}: relative import")
            elif top == "fashionlab":
                if module != "fashionlab":
                    problems.append(f"line {node.lineno}: from {module} import ... (a submodule)")
                else:
                    problems += [f"line {node.lineno}: from fashionlab import {a.name} (not in fashionlab.__all__)"
                                 for a in node.names if a.name not in public]
            elif top not in ALLOWED_THIRD_PARTY and top not in stdlib:
                problems.append(f"line {node.lineno}: from {module} import ... (not fashionlab, numpy, matplotlib, "
                                f"PIL or the standard library)")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in {"__import__", "exec", "eval"}:
            problems.append(f"line {node.lineno}: {node.func.id}()")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            if node.attr not in public and not (node.attr.startswith("__") and node.attr.endswith("__")):
                problems.append(f"line {node.lineno}: {node.value.id}.{node.attr} (not in fashionlab.__all__)")
    return problems


def test_api_check_catches_private_use():
    public = {"train", "Run"}
    assert api_violations("import fashionlab as fl\nrun = fl.train()\nfl.__version__", public) == []
    for bad in ("from fashionlab.sweeps.report import text_table", "import fashionlab.data",
                "from fashionlab import data", "import fashionlab as fl\nfl.studies.run_study()",
                "import fashionlab\nfashionlab.report.FIGURES", "import torch", "from sklearn import svm",
                "__import__('fashionlab.data')"):
        assert api_violations(bad, public), bad


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_uses_only_the_public_api(path):
    public = _public_names()
    problems = [f"code cell {i}: {p}" for i, src in enumerate(_code(_read(path))) for p in api_violations(src, public)]
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------- execution

@pytest.fixture
def kernel_env(tmp_path_factory, monkeypatch) -> dict[str, str]:
    """The kernel's environment: this interpreter as a kernelspec of its own (so a `python3` kernel
    installed elsewhere cannot be picked up), the source tree first on PYTHONPATH, quick mode."""
    home = tmp_path_factory.mktemp("jupyter")
    spec_dir = home / "kernels" / "fashionlab-test"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "fashionlab test kernel", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(home))  # searched before every other kernelspec folder
    env = dict(os.environ)
    env.update({
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src")] + [p for p in [env.get("PYTHONPATH")] if p]),
        "FASHIONLAB_NOTEBOOK_SUBSET": SUBSET,
        "JUPYTER_PATH": str(home),
        "IPYTHONDIR": str(home / "ipython"),  # no user profile or start-up files
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",
    })
    # One thread per process unless told otherwise: on a busy 2-core machine PyTorch's two intra-op
    # threads keep waiting for each other (docs/sweeps.md measured 8-13x slower sweeps).
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _outputs(nb) -> list[dict]:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


def _text(outputs) -> str:
    parts = []
    for o in outputs:
        if o.output_type == "stream":
            parts.append(o.text)
        elif o.output_type in ("execute_result", "display_data"):
            parts += [o.data.get("text/plain", ""), o.data.get("text/html", "")]
    return "\n".join(parts)


def _figures(outputs) -> int:
    """PNG images shown: image/png outputs plus PNGs embedded in HTML (fashionlab's figure sets)."""
    count = 0
    for o in outputs:
        if o.output_type in ("execute_result", "display_data"):
            if "image/png" in o.data:
                base64.b64decode(o.data["image/png"], validate=True)
                count += 1
            count += len(re.findall(r"data:image/png;base64,", o.data.get("text/html", "")))
    return count


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, real_data, kernel_env, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    work = tmp_path / "work"
    work.mkdir()
    before = sorted(p.name for p in NOTEBOOK_DIR.iterdir())
    client = NotebookClient(nb, kernel_name="fashionlab-test", timeout=CELL_TIMEOUT, allow_errors=False,
                            record_timing=False, resources={"metadata": {"path": str(work)}})
    client.execute(cwd=str(work), env=kernel_env)  # raises CellExecutionError naming the failing cell

    outputs = _outputs(nb)
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, errors
    text = _text(outputs)
    expected = EXPECTED[path.name]
    missing = [pattern for pattern in expected["text"] if not re.search(pattern, text)]
    assert not missing, f"{path.name}: no output matches {missing}"
    assert _figures(outputs) >= expected["figures"], f"{path.name}: {_figures(outputs)} figures shown"
    assert "Traceback" not in text
    # everything the notebook writes stays in its working directory, nothing lands beside the notebooks
    assert sorted(p.name for p in NOTEBOOK_DIR.iterdir()) == before
    if path.name != "01_explore.ipynb":
        assert list((work / "runs" / "notebooks").iterdir()), "the notebook trained nothing under its working directory"
