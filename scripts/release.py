"""Tag a release: ``python scripts/release.py`` (then ``git push origin vX.Y.Z``).

The version is ``sessa_jax.__version__``; the notebooks' Colab badges, install cells and
notebook 03's clone name the tag ``v<version>``, so the tag must exist on the published
repository before a Colab user can install. This script checks, then creates the annotated
tag at HEAD:

* the working tree is clean (the tag names exactly what is committed);
* CHANGELOG.md has a ``## <version>`` section;
* every ``vX.Y.Z`` in the notebooks is ``v<version>``;
* the tag does not exist yet (an existing tag at HEAD is reported and left alone).

``--check`` runs the checks only. Exit status 0 on success, 1 with one ``error:`` line.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def version() -> str:
    text = open(os.path.join(REPO, "sessa_jax", "__init__.py")).read()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


def git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)


def problems(ver: str) -> list[str]:
    """What stops tagging ``v<ver>`` at HEAD (empty when nothing does)."""
    tag, out = f"v{ver}", []
    status = git("status", "--porcelain")
    if status.returncode:
        return [f"not a git checkout ({status.stderr.strip()})"]
    if status.stdout.strip():
        out.append("the working tree has uncommitted changes; commit them first:\n" + status.stdout.rstrip())
    if f"## {ver}" not in open(os.path.join(REPO, "CHANGELOG.md")).read():
        out.append(f"CHANGELOG.md has no '## {ver}' section; move the release's entries under it")
    for path in sorted(glob.glob(os.path.join(REPO, "notebooks", "*.ipynb"))):
        src = "".join("".join(c["source"]) for c in json.load(open(path))["cells"])
        wrong = sorted(set(re.findall(r"\bv\d+\.\d+\.\d+\b", src)) - {tag})
        if wrong:
            out.append(f"{os.path.relpath(path, REPO)} names {wrong}; make every pin {tag}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="check only, create no tag")
    args = parser.parse_args(argv)
    ver = version()
    tag = f"v{ver}"
    found = problems(ver)
    if found:
        print("error: cannot tag " + tag + ": " + "; ".join(found), file=sys.stderr)
        return 1
    existing = git("rev-parse", "-q", "--verify", f"refs/tags/{tag}^{{commit}}").stdout.strip()
    head = git("rev-parse", "HEAD").stdout.strip()
    if existing and existing != head:
        print(
            f"error: tag {tag} already exists at {existing[:12]}, not HEAD ({head[:12]}); bump __version__ in "
            f"sessa_jax/__init__.py for a new release",
            file=sys.stderr,
        )
        return 1
    if args.check:
        print(f"ok: {tag} can be tagged at HEAD ({head[:12]})" if not existing else f"ok: {tag} is HEAD already")
        return 0
    if not existing:
        made = git("tag", "-a", tag, "-m", f"sessa-jax {ver}")
        if made.returncode:
            print(f"error: git tag {tag} failed: {made.stderr.strip()}", file=sys.stderr)
            return 1
    print(f"tagged {tag} at {head[:12]}; publish it with: git push origin {tag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
