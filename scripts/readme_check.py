"""Runs the README's marked commands and fails when their output drifts from the transcript.

Marked blocks (an HTML comment on the line before a fenced block):

* ``<!-- readme-check -->`` before a ```console block: every ``$ CMD`` line is run with
  bash in the repository root (``.venv/bin`` first on PATH); the lines after it, up to the
  next ``$``, are its expected output. ``<!-- readme-check: slow -->`` marks blocks run only
  with ``--slow`` (e.g. ``make train``).
* ``<!-- readme-check -->`` before a ```python block: run with the venv's python; it must exit 0.

Volatile parts are masked on both sides before comparing: rates, step times, ETAs,
durations, the jax version and absolute paths of the checkout. Losses, accuracies and other
numbers are compared as printed (CPU runs are deterministic on one machine and JAX version).

    python scripts/readme_check.py            # check (exit 1 on drift, with a diff)
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


def run(cmd: str, env: dict) -> str:
    out = subprocess.run(["bash", "-c", cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    text = out.stdout + out.stderr
    if out.returncode:
        raise SystemExit(f"readme_check: `{cmd}` exited {out.returncode}; a README command must run as written:\n"
                         f"{text[-3000:]}")
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
            out = [x for x in run(line[2:], env).replace(REPO + "/", "").replace(REPO, ".").splitlines()
                   if x.strip() and not _noise(x)]
            raw.extend(x.rstrip() for x in out)
            got.extend(normalize("\n".join(out)) if out else [])
        elif line.strip():
            expected.extend(normalize(line))
    return expected, got, raw


def _noise(line: str) -> bool:
    """Chatter that is not the program's output: absl/orbax/XLA warnings, and make's (re)install
    of .venv when pyproject.toml changed (pip and setuptools banners)."""
    return bool(re.match(r"^(WARNING|I\d{4}|W\d{4}|E\d{4}|  warnings\.warn|.*Warning: |\s*!!|\s*\*{20,}|"
                         r"\s*(Please be careful|name as your package|with strategy|corresp)|"
                         r"\.venv/bin/python -m pip |touch \.venv/|python3 -m venv )", line))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--update", action="store_true", help="rewrite transcripts instead of checking")
    parser.add_argument("--slow", action="store_true", help="also run blocks marked slow")
    parser.add_argument("--readme", default=os.path.join(REPO, "README.md"))
    args = parser.parse_args(argv)
    env = dict(os.environ, PATH=os.path.join(REPO, ".venv", "bin") + os.pathsep + os.environ.get("PATH", ""),
               PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3")
    lines = open(args.readme).read().splitlines()
    failures, replaced = 0, {}
    for start, end, lang, slow in list(blocks(lines)):
        if slow and not args.slow:
            print(f"README line {start + 1}: slow block skipped (--slow runs it)")
            continue
        body = lines[start + 1:end]
        print(f"README line {start + 1}: {lang} block", flush=True)
        if lang == "python":
            out = subprocess.run([sys.executable, "-c", "\n".join(body)], cwd=REPO, env=env, capture_output=True,
                                 text=True, timeout=1200)
            if out.returncode:
                failures += 1
                print(f"FAILED (exit {out.returncode}):\n{out.stderr[-3000:]}")
            continue
        expected, got, raw = check_console(body, env)
        if args.update:
            replaced[(start, end)] = raw
        elif expected != got:
            failures += 1
            print("DRIFT:\n" + "\n".join(difflib.unified_diff(expected, got, "README", "run", lineterm="")))
    if args.update and replaced:
        for (start, end), got in sorted(replaced.items(), reverse=True):
            lines[start + 1:end] = got
        with open(args.readme, "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"updated {len(replaced)} transcript(s) in {args.readme}")
    print("readme_check: " + ("OK" if not failures else f"{failures} block(s) failed"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
