"""Every notebook runs top to bottom at CI scale (SESSA_NOTEBOOK_SCALE=ci) as Colab runs it, and
is committed stripped: the package installed (this checkout's wheel, unpacked: nothing is
downloaded), the notebook alone in a temporary directory (no scripts/ or results/ beside it,
the checkout off the path), and notebook 03's clone of the release tag served by a local git
repository holding that tag (SESSA_JAX_REPO)."""

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

import nbformat
import pytest

import sessa_jax
from sessa_jax.ops.dispatch import resolve_method
from tests.support.processes import TIMEOUT_S, build_wheel

nbclient = pytest.importorskip("nbclient", reason="running the notebooks needs nbclient (the test extra)")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NB_DIR = os.path.join(ROOT, "notebooks")
NOTEBOOKS = sorted(f for f in os.listdir(NB_DIR) if f.endswith(".ipynb"))
TAG = f"v{sessa_jax.__version__}"


def test_the_three_notebooks_exist():
    assert NOTEBOOKS == ["01_quickstart.ipynb", "02_memory_tails.ipynb", "03_long_context.ipynb"]


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory):
    """A kernelspec that launches this interpreter (the venv), found through JUPYTER_PATH."""
    root = tmp_path_factory.mktemp("jupyter")
    spec_dir = root / "kernels" / "sessa-ci"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "sessa-ci",
        "language": "python",
    }
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


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """This checkout's wheel, unpacked into a site directory (what pip would install)."""
    whl = build_wheel(ROOT, tmp_path_factory.mktemp("wheel"))
    site = tmp_path_factory.mktemp("site")
    zipfile.ZipFile(whl).extractall(site)
    return str(site)


@pytest.fixture(scope="module")
def release_repo(tmp_path_factory):
    """A git repository whose only tag is this version's, holding this checkout's scripts/: what
    `git clone --branch vX.Y.Z` of the published repository gives (a file:// URL)."""
    repo = tmp_path_factory.mktemp("release") / "sessa-jax"
    shutil.copytree(os.path.join(ROOT, "scripts"), repo / "scripts", ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(
        os.environ,
        GIT_AUTHOR_NAME="ci",
        GIT_AUTHOR_EMAIL="ci@localhost",
        GIT_COMMITTER_NAME="ci",
        GIT_COMMITTER_EMAIL="ci@localhost",
    )
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "release"], ["tag", TAG]):
        subprocess.run(["git", *cmd], cwd=repo, env=env, check=True, capture_output=True, timeout=TIMEOUT_S)
    return "file://" + str(repo)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_as_colab_does(name, kernel_name, installed, release_repo, tmp_path, monkeypatch):
    jupyter_path, kernel = kernel_name
    work, tmp = tmp_path / "content", tmp_path / "tmp"  # Colab's working directory; its /tmp
    work.mkdir(), tmp.mkdir()
    shutil.copy(os.path.join(NB_DIR, name), work / name)
    monkeypatch.setenv("JUPYTER_PATH", jupyter_path)
    monkeypatch.setenv("SESSA_NOTEBOOK_SCALE", "ci")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYTHONPATH", installed)  # the installed package only, not the checkout
    monkeypatch.setenv("SESSA_JAX_REPO", release_repo)
    monkeypatch.setenv("TMPDIR", str(tmp))
    nb = nbformat.read(str(work / name), as_version=4)
    probe = (
        "import sys, sessa_jax\nprint('sessa_jax', sessa_jax.__file__)\n"
        "print('compare_models', getattr(sys.modules.get('compare_models'), '__file__', None))"
    )
    nb.cells.append(nbformat.v4.new_code_cell(probe))
    client = nbclient.NotebookClient(
        nb, kernel_name=kernel, timeout=int(TIMEOUT_S), resources={"metadata": {"path": str(work)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    printed = dict(line.split(" ", 1) for line in nb.cells[-1].outputs[0]["text"].splitlines())
    assert printed["sessa_jax"].startswith(installed), printed  # imported from the install, not the checkout
    if name.startswith("03"):  # the script came from the clone of the release tag
        assert printed["compare_models"] == str(tmp / f"sessa-jax-{TAG}" / "scripts" / "compare_models.py")


def test_quickstart_says_what_auto_picks():
    """Notebook 01's sentence on solver='auto' names what the dispatcher resolves it to."""
    nb = nbformat.read(os.path.join(NB_DIR, "01_quickstart.ipynb"), as_version=4)
    (text,) = [c.source for c in nb.cells if c.cell_type == "markdown" and "solver='auto'" in c.source]
    sentence = text[text.index("solver='auto'") :]
    for platform, on in (("gpu", "GPU/TPU"), ("tpu", "GPU/TPU"), ("cpu", "CPU")):
        method = resolve_method("auto", platform)
        assert re.search(rf"the {method} (solve|scan)[^.;]* on {re.escape(on)}", sentence), (platform, method)
    assert "feedback_kernels='pallas'" in sentence  # the solve's Pallas kernels are opt-in
