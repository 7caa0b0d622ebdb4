"""Packaging: the wheel ships configs, console scripts, LICENSE and one version; declared
dependencies are the imported ones; notebooks install the tag of this version."""

import ast
import glob
import json
import os
import re
import subprocess
import sys
import tomllib
import zipfile

import pytest

import sessa_jax
from tests.support.processes import TIMEOUT_S, build_wheel

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYPROJECT = tomllib.load(open(os.path.join(REPO, "pyproject.toml"), "rb"))
# import name -> distribution name, where they differ
DIST = {
    "orbax": "orbax-checkpoint",
    "ml_collections": "ml-collections",
    "array_record": "array-record",
    "tensorboardX": "tensorboardX",
    "ml_dtypes": "ml-dtypes",
    "google": "google-cloud-storage",
}


def _dist_names(reqs) -> set:
    return {re.split(r"[<>=\[; ]", r, maxsplit=1)[0].lower() for r in reqs}


def _third_party_imports() -> set:
    names = set()
    for path in glob.glob(os.path.join(REPO, "sessa_jax", "**", "*.py"), recursive=True):
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "sessa_jax"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    return build_wheel(REPO, tmp_path_factory.mktemp("wheel"))


def test_wheel_ships_configs_scripts_license_and_version(wheel, tmp_path):
    z = zipfile.ZipFile(wheel)
    names = z.namelist()
    shipped = {os.path.basename(n)[:-3] for n in names if n.startswith("sessa_jax/configs/") and n.endswith(".py")}
    in_repo = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "configs", "*.py"))}
    assert in_repo <= shipped and {"tiny", "text_bpe", "paper_125m"} <= shipped
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert f"Version: {sessa_jax.__version__}" in meta and "Requires-Python: >=3.11" in meta
    entry = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    for script in ("sessa-train", "sessa-sample", "sessa-eval"):
        assert re.search(rf"^{script} = sessa_jax\.cli:\w+_main$", entry, re.M)
    # Import from the unpacked wheel alone (no checkout on the path) and load shipped configs.
    site = tmp_path / "site"
    z.extractall(site)
    code = (
        "import sessa_jax, sessa_jax.train.config as c; print(sessa_jax.__file__); "
        "print(c.load_config('tiny').train.steps, c.load_config('paper_125m').train.loss_chunk); "
        "from sessa_jax.cli import train_main; print(train_main(['--config=nope']))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert out.returncode == 0, out.stderr
    where, values, rc = out.stdout.strip().splitlines()
    assert where.startswith(str(site)) and values == "30 256" and rc == "2"
    assert "config 'nope' not found" in out.stderr and "'tiny'" in out.stderr


def test_declared_dependencies_are_the_imported_ones():
    imported = {DIST.get(n, n).lower() for n in _third_party_imports()}
    core = _dist_names(PYPROJECT["project"]["dependencies"])
    extras = set().union(*(_dist_names(v) for v in PYPROJECT["project"]["optional-dependencies"].values()))
    assert imported <= core | extras, f"imported but not declared: {imported - core - extras}"
    assert core <= imported, f"declared but never imported by sessa_jax: {core - imported}"
    assert {"matplotlib", "wandb", "torch"} <= extras - core  # optional features stay optional


def test_one_version_and_notebooks_install_its_tag():
    assert PYPROJECT["project"]["dynamic"] == ["version"] and "version" not in PYPROJECT["project"]
    tag = f"v{sessa_jax.__version__}"
    for path in glob.glob(os.path.join(REPO, "notebooks", "*.ipynb")):
        src = "".join("".join(c["source"]) for c in json.load(open(path))["cells"])
        refs = set(re.findall(r"\bv\d+\.\d+\.\d+\b", src))  # install, badge, clone: every version named
        assert refs == {tag}, f"{os.path.basename(path)} refers to {refs}, expected {tag}"
    changelog = open(os.path.join(REPO, "CHANGELOG.md")).read()
    assert f"## {sessa_jax.__version__}" in changelog


def test_release_script_tags_the_version(tmp_path):
    """scripts/release.py creates the tag the notebooks pin, and refuses what would make it lie."""
    repo = tmp_path / "repo"
    for rel in (
        "sessa_jax/__init__.py",
        "CHANGELOG.md",
        "scripts/release.py",
        *(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "notebooks", "*.ipynb"))),
    ):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_bytes(open(os.path.join(REPO, rel), "rb").read())
    env = dict(
        os.environ,
        GIT_AUTHOR_NAME="ci",
        GIT_AUTHOR_EMAIL="ci@localhost",
        GIT_COMMITTER_NAME="ci",
        GIT_COMMITTER_EMAIL="ci@localhost",
    )

    def run(*cmd):
        return subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)

    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "release"]):
        assert run("git", *cmd).returncode == 0
    tag = f"v{sessa_jax.__version__}"
    out = run(sys.executable, "scripts/release.py")
    assert out.returncode == 0 and f"git push origin {tag}" in out.stdout, out.stderr
    assert run("git", "tag").stdout.split() == [tag]
    assert run(sys.executable, "scripts/release.py", "--check").stdout.startswith(f"ok: {tag} is HEAD already")
    # a new commit without a version bump: the tag would name two different trees
    (repo / "CHANGELOG.md").write_text(
        (repo / "CHANGELOG.md").read_text().replace(f"## {sessa_jax.__version__}", "## next")
    )
    out = run(sys.executable, "scripts/release.py")
    assert out.returncode == 1 and "uncommitted changes" in out.stderr
    assert f"no '## {sessa_jax.__version__}'" in out.stderr
    run("git", "commit", "-qam", "more")
    (repo / "CHANGELOG.md").write_text(open(os.path.join(REPO, "CHANGELOG.md")).read())
    run("git", "commit", "-qam", "changelog back")
    out = run(sys.executable, "scripts/release.py")
    assert out.returncode == 1 and f"tag {tag} already exists" in out.stderr and "bump __version__" in out.stderr
