"""The package's imports form no cycle and only run downward through its layers.

Imports are read from the source (``ast``), imports inside functions included: a cycle that an
in-function import hides still ties the modules together. An edge goes to the module named, or,
for ``from package import name`` where ``name`` is a submodule, to that submodule; the implicit
import of the parent packages' ``__init__`` is not counted (every module would then depend on
``sessa_jax/__init__.py``).
"""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "sessa_jax"

# Layers, lowest first: a module may import modules of its own layer or of a lower one. The
# longest matching prefix picks a module's layer.
LAYERS = (
    ("sessa_jax.options",),
    ("sessa_jax.config",),
    # Kernels, their dispatch, and helpers that import nothing of the package. The training
    # work directory and resume guard are file-system helpers that data/ uses as well.
    (
        "sessa_jax.ops",
        "sessa_jax.sharding",
        "sessa_jax.distributed",
        "sessa_jax.train.workdir",
        "sessa_jax.train.resume_guard",
    ),
    ("sessa_jax.layer_norm", "sessa_jax.split_dense", "sessa_jax.mixer", "sessa_jax.mamba_mixer", "sessa_jax.cache"),
    ("sessa_jax.layer",),
    ("sessa_jax.model",),
    ("sessa_jax.decoding", "sessa_jax.convert", "sessa_jax.golden"),
    ("sessa_jax.data",),
    ("sessa_jax.baselines",),
    # The package's public face and the tools built on training.
    (
        "sessa_jax.train",
        "sessa_jax.sample",
        "sessa_jax.analysis",
        "sessa_jax.cli",
        "sessa_jax.configs",
        "sessa_jax.__init__",
    ),
)


def _modules(package: pathlib.Path = PACKAGE) -> dict[str, pathlib.Path]:
    """Dotted module name -> source file, for every module of ``package``."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        modules[".".join(parts[:-1]) if parts[-1] == "__init__" else ".".join(parts)] = path
    return modules


def _edges(modules: dict[str, pathlib.Path]) -> dict[str, set[str]]:
    """module -> the package modules it imports (anywhere in its source)."""
    edges = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        out = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            for target in targets:
                while target not in modules and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target in modules and target != name and target.startswith("sessa_jax"):
                    out.add(target)
        edges[name] = out
    return edges


def _layer(module: str, path: pathlib.Path) -> int:
    key = "sessa_jax.__init__" if module == "sessa_jax" else module
    best, level = -1, None
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (key == prefix or key.startswith(prefix + ".")) and len(prefix) > best:
                best, level = len(prefix), i
    assert level is not None, f"{module} ({path}) is in no layer of tests/tools/test_import_graph.py: add it to LAYERS"
    return level


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_parser_sees_in_function_and_relative_imports(tmp_path):
    pkg = tmp_path / "sessa_jax"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import b\n")
    (pkg / "a.py").write_text("def f():\n    from sessa_jax.sub import b\n")
    (pkg / "sub" / "b.py").write_text("from ..a import f\n")
    edges = _edges(_modules(pkg))
    assert edges["sessa_jax.a"] == {"sessa_jax.sub.b"}
    assert edges["sessa_jax.sub.b"] == {"sessa_jax.a"}
    assert edges["sessa_jax.sub"] == {"sessa_jax.sub.b"}
    assert _cycles(edges) == [["sessa_jax.a", "sessa_jax.sub.b"]]


def test_no_import_cycles():
    cycles = _cycles(_edges(_modules()))
    assert not cycles, f"import cycles (move what both need into a lower module): {cycles}"


def test_imports_only_run_downward():
    modules = _modules()
    upward = []
    for name, targets in _edges(modules).items():
        level = _layer(name, modules[name])
        upward += [
            f"{name} (layer {level}) imports {t} (layer {_layer(t, modules[t])})"
            for t in sorted(targets)
            if _layer(t, modules[t]) > level
        ]
    assert not upward, "imports running up the layers of tests/tools/test_import_graph.py:\n" + "\n".join(upward)
