"""Every notebook runs top to bottom at CI scale (SESSA_NOTEBOOK_SCALE=ci) and is committed stripped."""

import json
import os
import sys
import time

import nbformat
import pytest

nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NB_DIR = os.path.join(ROOT, "notebooks")
NOTEBOOKS = sorted(f for f in os.listdir(NB_DIR) if f.endswith(".ipynb"))
BUDGET_S = 300.0  # all notebooks together, on the 2-core CPU machine
_elapsed = []


def test_the_three_notebooks_exist():
    assert NOTEBOOKS == ["01_quickstart.ipynb", "02_memory_tails.ipynb", "03_long_context.ipynb"]


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory):
    """A kernelspec that launches this interpreter (the venv), found through JUPYTER_PATH."""
    root = tmp_path_factory.mktemp("jupyter")
    spec_dir = root / "kernels" / "sessa-ci"
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "sessa-ci", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return str(root), "sessa-ci"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stripped_and_opens_with_badge_and_pinned_install(name):
    nb = nbformat.read(os.path.join(NB_DIR, name), as_version=4)
    assert "colab-badge.svg" in nb.cells[0].source and f"notebooks/{name}" in nb.cells[0].source
    assert "SESSA_NOTEBOOK_SCALE" in nb.cells[1].source
    install = nb.cells[2].source
    assert "import sessa_jax" in install and "@v" in install  # skipped when installed; pinned tag
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: outputs not stripped"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_at_ci_scale(name, kernel_name, monkeypatch):
    jupyter_path, kernel = kernel_name
    monkeypatch.setenv("JUPYTER_PATH", jupyter_path)
    monkeypatch.setenv("SESSA_NOTEBOOK_SCALE", "ci")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    nb = nbformat.read(os.path.join(NB_DIR, name), as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name=kernel, timeout=240,
                                     resources={"metadata": {"path": ROOT}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError on the first failing cell
    _elapsed.append(time.perf_counter() - start)
    assert sum(_elapsed) < BUDGET_S, f"notebooks took {sum(_elapsed):.0f}s so far (budget {BUDGET_S:.0f}s)"
