"""Checks the README and docs/*.md: their commands run as written, and what they name exists.

Marked blocks (an HTML comment on the line before a fenced block) are run:

* ``<!-- readme-check -->`` before a ```console block: every ``$ CMD`` line is run with
  bash in the repository root, with the caller's PATH (the commands must say
  ``.venv/bin/...`` themselves, as a user on a fresh clone would have to); the lines after
  it, up to the next ``$``, are its expected output. ``<!-- readme-check: slow -->`` marks
  blocks run only with ``--slow`` (e.g. ``make train``).
* ``<!-- readme-check -->`` before a ```python block: run with this interpreter; it must exit 0.

Volatile parts are masked on both sides before comparing: rates, step times, ETAs,
durations, the jax version and absolute paths of the checkout. Losses, accuracies and other
numbers are compared as printed (CPU runs are deterministic on one machine and JAX version).

Every file is also checked without running anything (``references``): in its fenced shell
blocks, ``python -m benchmarks.NAME`` / ``python -m sessa_jax.NAME`` must name a module of
the checkout, ``scripts/...``, ``notebooks/...`` and ``*.py`` paths must exist, and
``--config=NAME`` must be a shipped run config; every relative Markdown link must point to an
existing file and, with ``#anchor``, to one of its headings; and the README must not call
``sessa-train``/``sessa-eval``/``sessa-sample`` bare (they live in ``.venv/bin`` until the
venv is activated).

    python scripts/readme_check.py            # check (exit 1 on drift, with a diff)
    python scripts/readme_check.py --refs     # only the reference checks (seconds)
    python scripts/readme_check.py --update   # rewrite the transcripts from a fresh run
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARK = re.compile(r"^<!-- readme-check(: slow)? -->\s*$")
VOLATILE = [
    (re.compile(r"[\d.]+k? tok/s"), "N tok/s"),
    (re.compile(r"[\d.e+-]+ s/step"), "N s/step"),
    (re.compile(r"eta \d+h?\d*m\d\ds( \(incl\. compile\))?"), "eta T"),
    (re.compile(r"\b\d+h\d\dm\d\ds\b|\b\d+m\d\ds\b"), "T"),
    (re.compile(r"jax \d+\.\d+\.\d+(\.\d+)?"), "jax X"),
    (re.compile(r"/[^\s]*/plugins/profile/\S+"), "PROFILE"),
]


def normalize(text: str) -> list[str]:
    text = text.replace(REPO + "/", "").replace(REPO, ".")
    lines = []
    for line in text.rstrip().splitlines():
        for pattern, repl in VOLATILE:
            line = pattern.sub(repl, line)
        lines.append(line.rstrip())
    return lines


def blocks(lines: list[str]):
    """(start, end, lang, slow) of each marked fenced block; lines[start] is the opening fence."""
    i = 0
    while i < len(lines):
        m = MARK.match(lines[i])
        if m and i + 1 < len(lines) and lines[i + 1].startswith("```"):
            lang = lines[i + 1][3:].strip()
            end = next(j for j in range(i + 2, len(lines)) if lines[j].startswith("```"))
            yield i + 1, end, lang, bool(m.group(1))
            i = end
        i += 1


SHELL_LANGS = ("", "bash", "console", "sh", "shell")
_MODULE = re.compile(r"\bpython3?\s+-m\s+((?:benchmarks|sessa_jax)(?:\.\w+)*)")
_PATH = re.compile(r"(?<![\w./-])((?:scripts|notebooks|benchmarks|configs|docs|results)/[\w./-]*\w|[\w-]+\.py)\b")
_CONFIG = re.compile(r"--config[= ]([A-Za-z_]\w*)(?=\s|$)")
_BARE = re.compile(r"^(?:\$ )?(?:\S+=\S+ )*(sessa-(?:train|eval|sample))\b")
_OUTPUT = re.compile(r"--(?:out|output|output_dir|workdir|dump)[= ]\S+")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(lines: list[str]) -> set[str]:
    """Anchors of a Markdown file's headings (outside fenced blocks), with GitHub's -1, -2 suffixes."""
    seen, out, fenced = {}, set(), False
    for line in lines:
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"^#{1,6} ", line):
            base = slug(line.lstrip("#"))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def fenced_blocks(lines: list[str]):
    """(first body line index, lang, body lines) of every fenced block."""
    i = 0
    while i < len(lines):
        if lines[i].startswith("```"):
            lang = lines[i][3:].strip()
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), len(lines))
            yield i + 1, lang, lines[i + 1 : end]
            i = end
        i += 1


def _module_exists(root: str, name: str) -> bool:
    path = os.path.join(root, *name.split("."))
    return os.path.isfile(path + ".py") or os.path.isfile(os.path.join(path, "__init__.py"))


def references(path: str, root: str = REPO) -> list[str]:
    """Problems with what the Markdown file at ``path`` names (see the module docstring); [] if none."""
    lines = open(path).read().splitlines()
    name = os.path.relpath(path, root)
    problems = []
    configs = os.path.join(root, "sessa_jax", "configs")
    for start, lang, body in fenced_blocks(lines):
        if lang not in SHELL_LANGS:
            continue
        for k, line in enumerate(body):
            where = f"{name}:{start + k + 1}"
            if line.lstrip().startswith("#") and not line.startswith("#!"):
                continue
            code = _OUTPUT.sub("", line.split(" # ")[0])  # what a command writes need not exist yet
            for mod in _MODULE.findall(code):
                if not _module_exists(root, mod):
                    problems.append(f"{where}: `python -m {mod}`: no such module in the checkout")
            for ref in _PATH.findall(code):
                if ref.endswith(".py") and "/" not in ref and ref != "train.py":
                    continue  # a bare file name (an argument, e.g. --config=my_run.py) is the user's
                if not os.path.exists(os.path.join(root, ref)):
                    problems.append(f"{where}: {ref}: no such file")
            for cfg in _CONFIG.findall(code):
                if not os.path.isfile(os.path.join(configs, cfg + ".py")):
                    problems.append(f"{where}: --config={cfg}: no such run config in sessa_jax/configs")
            if os.path.basename(path) == "README.md" and _BARE.match(line.strip()):
                problems.append(
                    f"{where}: `{_BARE.match(line.strip()).group(1)}` called bare: after `make install` "
                    f"it is .venv/bin/{_BARE.match(line.strip()).group(1)} (or activate the venv first)"
                )
    fenced = False
    for i, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            continue
        for target in _LINK.findall(line):
            if re.match(r"^[a-z]+:", target):
                continue  # http:, https:, mailto:
            file, _, anchor = target.partition("#")
            dest = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
            if not os.path.exists(dest):
                problems.append(f"{name}:{i + 1}: link to {target}: no such file")
            elif anchor and dest.endswith(".md") and anchor not in anchors(open(dest).read().splitlines()):
                problems.append(f"{name}:{i + 1}: link to {target}: no heading with that anchor")
    return problems


def documents(root: str = REPO) -> list[str]:
    """README.md and docs/*.md of the checkout."""
    docs = os.path.join(root, "docs")
    extra = sorted(os.path.join(docs, f) for f in os.listdir(docs) if f.endswith(".md")) if os.path.isdir(docs) else []
    return [os.path.join(root, "README.md")] + extra


def run(cmd: str, env: dict) -> str:
    out = subprocess.run(["bash", "-c", cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    text = out.stdout + out.stderr
    if out.returncode:
        raise SystemExit(
            f"readme_check: `{cmd}` exited {out.returncode}; a README command must run as written:\n{text[-3000:]}"
        )
    return text


def check_console(body: list[str], env: dict) -> tuple[list[str], list[str], list[str]]:
    """(expected, got) transcripts of a console block, normalized, and the raw new transcript."""
    expected, got, raw = [], [], []
    for line in body:
        if line.startswith("$ "):
            expected.append(line)
            got.append(line)
            raw.append(line)
            print(f"  {line}", flush=True)
            out = [
                x
                for x in run(line[2:], env).replace(REPO + "/", "").replace(REPO, ".").splitlines()
                if x.strip() and not _noise(x)
            ]
            raw.extend(x.rstrip() for x in out)
            got.extend(normalize("\n".join(out)) if out else [])
        elif line.strip():
            expected.extend(normalize(line))
    return expected, got, raw


def _noise(line: str) -> bool:
    """Chatter that is not the program's output: absl/orbax/XLA warnings, and make's (re)install
    of .venv when pyproject.toml changed (pip and setuptools banners)."""
    return bool(
        re.match(
            r"^(WARNING|I\d{4}|W\d{4}|E\d{4}|  warnings\.warn|.*Warning: |\s*!!|\s*\*{20,}|"
            r"\s*(Please be careful|name as your package|with strategy|corresp)|"
            r"\.venv/bin/python -m pip |touch \.venv/|python3 -m venv )",
            line,
        )
    )


def check_file(path: str, env: dict, slow: bool, update: bool) -> int:
    """Runs the marked blocks of one Markdown file; returns the number of failed blocks."""
    lines = open(path).read().splitlines()
    name = os.path.relpath(path, REPO)
    failures, replaced = 0, {}
    for start, end, lang, is_slow in list(blocks(lines)):
        if is_slow and not slow:
            print(f"{name} line {start + 1}: slow block skipped (--slow runs it)")
            continue
        body = lines[start + 1 : end]
        print(f"{name} line {start + 1}: {lang} block", flush=True)
        if lang == "python":
            out = subprocess.run(
                [sys.executable, "-c", "\n".join(body)], cwd=REPO, env=env, capture_output=True, text=True, timeout=1200
            )
            if out.returncode:
                failures += 1
                print(f"FAILED (exit {out.returncode}):\n{out.stderr[-3000:]}")
            continue
        expected, got, raw = check_console(body, env)
        if update:
            replaced[(start, end)] = raw
        elif expected != got:
            failures += 1
            print("DRIFT:\n" + "\n".join(difflib.unified_diff(expected, got, name, "run", lineterm="")))
    if update and replaced:
        for (start, end), got in sorted(replaced.items(), reverse=True):
            lines[start + 1 : end] = got
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"updated {len(replaced)} transcript(s) in {name}")
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--update", action="store_true", help="rewrite transcripts instead of checking")
    parser.add_argument("--slow", action="store_true", help="also run blocks marked slow")
    parser.add_argument("--refs", action="store_true", help="only check what the files name; run nothing")
    parser.add_argument(
        "--readme", nargs="+", default=None, help="Markdown files to check (default: README.md and docs/*.md)"
    )
    args = parser.parse_args(argv)
    env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3")
    paths = args.readme or documents()
    failures = 0
    for path in paths:
        problems = references(path)
        for problem in problems:
            print(f"REFERENCE: {problem}")
        failures += len(problems)
    if not args.refs:
        for path in paths:
            failures += check_file(path, env, args.slow, args.update)
    print("readme_check: " + ("OK" if not failures else f"{failures} problem(s)"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
