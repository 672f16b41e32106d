"""The package's layout rules (ARCHITECTURE.md), read from every module's imports with ``ast``.

A model travels read -> plan -> build, and check sits beside build. Each stage's folder imports
only the stages before it, nothing imports in a circle, and heavy libraries stay out of the
stages that must run without them. The rules are checked on the real package and, to show that
the checker can fail, on small made-up packages that break each rule.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "convert"
STAGES = ("read", "plan", "build", "check")
# What may stand at the top of the package, besides the four stage folders.
TOP = {
    "__init__",
    "__main__",
    "cli",
    "report",
    "report_html",
    "xcode",
    "errors",
    "heavy",
    "files",
}
# What each part of the package may import from the package ("convert" is its __init__).
ALLOWED = {
    "read": {"read", "errors", "files", "convert"},
    "plan": {"plan", "read", "errors", "files", "convert"},
    "build": {"build", "read", "plan", "check", "errors", "files", "heavy", "report", "convert"},
    "check": {"check", "read", "errors", "files", "heavy", "convert"},
    "errors": set(),
    "heavy": set(),
    "files": {"errors", "convert"},
    "report": {"plan", "read", "files", "convert"},
    "report_html": {"report", "plan", "read", "files", "convert"},
    "xcode": {"report", "read", "files", "convert"},
    "__init__": set(),
    "__main__": {"cli"},
    "cli": {
        "read",
        "plan",
        "build",
        "check",
        "report",
        "report_html",
        "xcode",
        "errors",
        "files",
        "heavy",
        "convert",
    },
}
# Libraries that reading and planning never touch: `plan` runs in a second without them.
HEAVY = {"tensorflow", "keras", "tf_keras", "coremltools", "google", "PIL"}
LIGHT_PARTS = {"read", "plan"}


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path) -> dict[str, Path]:
    return {module_name(root, p): p for p in sorted(root.rglob("*.py"))}


def defined(path: Path) -> set[str]:
    """The names a module defines at its top level (functions, classes, assignments, imports)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                elements = target.elts if isinstance(target, ast.Tuple) else [target]
                names.update(t.id for t in elements if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def missing(path: Path, mods: dict[str, Path]) -> list[str]:
    """``from <package module> import x`` where x is neither a module of the package nor a
    name the module defines: the import would fail, or find a stale copy installed elsewhere."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and not node.level and node.module in mods:
            names = defined(mods[node.module])
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                if alias.name != "*" and child not in mods and alias.name not in names:
                    out.append(f"{node.module} has no module or name {alias.name}")
        if isinstance(node, ast.Import):
            top = {m.split(".")[0] for m in mods}
            for alias in node.names:
                if alias.name.split(".")[0] in top and alias.name not in mods:
                    out.append(f"no module {alias.name}")
    return out


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function: package modules resolved
    to the module file they name (``from convert.build import spec`` is convert.build.spec),
    other libraries by their top-level name."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                child = f"{base}.{alias.name}"
                found.add(child if child in known else base)
    return found


def part_of(name: str, root: str) -> str:
    """The rule set a module answers to: its stage folder, or its own name at the top."""
    parts = name.split(".")
    if len(parts) == 1:
        return "convert" if name == root else parts[0]
    return parts[1]


def problems(root: Path) -> list[str]:
    """Every broken layout rule under the package folder ``root``, one line each."""
    top = root.name
    mods = modules(root)
    known = set(mods)
    graph: dict[str, set[str]] = {}
    out: list[str] = []
    for name, path in mods.items():
        rel = path.relative_to(root.parent)
        stem = path.stem
        if stem.startswith("fast_"):
            out.append(f"{rel}: no module is named fast_*: the direct builder is the builder")
        here = part_of(name, top) if name != top else "__init__"
        if name.count(".") == 1 and path.parent == root and stem not in TOP:
            out.append(f"{rel}: only {', '.join(sorted(TOP))} stand at the top; move it to a stage")
        out.extend(f"{rel}: {line}" for line in missing(path, mods))
        deps = imports(path, name, known)
        graph[name] = {d for d in deps if d in known}
        allowed = ALLOWED.get(here)
        for dep in sorted(deps):
            first = dep.split(".")[0]
            if here in LIGHT_PARTS and first in HEAVY:
                out.append(f"{rel}: {here}/ must not import {dep}")
            if first != top or allowed is None:
                continue
            target = "convert" if dep == top else part_of(dep, top)
            if target == here and dep != top:
                continue
            if target not in allowed:
                out.append(f"{rel}: {here} must not import {dep} ({target})")
            if here in LIGHT_PARTS and dep == f"{top}.heavy":
                out.append(f"{rel}: {here}/ must not import {dep}")
    out.extend(f"import cycle: {' -> '.join(c)}" for c in cycles(graph))
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each as a path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_keeps_its_layout() -> None:
    assert problems(PACKAGE) == []


def test_the_tests_and_scripts_import_only_what_exists() -> None:
    """A test or script that imports a module the package no longer has must fail here, not
    find an old copy of the package installed elsewhere."""
    mods = modules(PACKAGE)
    root = PACKAGE.parent
    found = [
        f"{path.relative_to(root)}: {line}"
        for folder in ("tests", "scripts")
        for path in sorted((root / folder).glob("*.py"))
        for line in missing(path, mods)
    ]
    assert found == []


def test_every_stage_has_its_folder() -> None:
    for stage in STAGES:
        assert (PACKAGE / stage / "__init__.py").is_file(), stage


# -- the checker fails where it should ---------------------------------------------------------


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "convert"
    for stage in ("", *STAGES):
        (root / stage).mkdir(parents=True, exist_ok=True)
        (root / stage / "__init__.py").write_text("")
    for rel, text in files.items():
        (root / rel).write_text(text)
    return root


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        (
            {"read/h5.py": "from convert.build import network\n", "build/network.py": ""},
            "read/h5.py: read must not import convert.build.network (build)",
        ),
        (
            {
                "check/verify.py": "def f():\n    from convert.build.spec import X\n",
                "build/spec.py": "",
            },
            "check must not import convert.build.spec (build)",
        ),
        ({"plan/make.py": "import coremltools\n"}, "plan/ must not import coremltools"),
        (
            {"read/h5.py": "from convert.heavy import keras\n", "heavy.py": ""},
            "read/ must not import convert.heavy",
        ),
        ({"build/fast_head.py": ""}, "no module is named fast_*"),
        ({"emit.py": ""}, "emit.py: only"),
        (
            {"check/verify.py": "from convert import reference\n"},
            "convert has no module or name reference",
        ),
        (
            {
                "build/a.py": "from convert.build import b\n",
                "build/b.py": "import convert.build.a\n",
            },
            "import cycle: convert.build.a -> convert.build.b",
        ),
    ],
)
def test_a_broken_rule_is_named(tmp_path: Path, files: dict[str, str], expected: str) -> None:
    found = problems(_package(tmp_path, files))
    assert any(expected in line for line in found), found


def test_a_well_formed_package_passes(tmp_path: Path) -> None:
    files = {
        "read/h5.py": "from convert.errors import SplitError\ndef read_model(): ...\n",
        "plan/make.py": "from convert.read import h5\n",
        "build/network.py": "from convert.plan import make\nfrom convert.check import rules\n",
        "check/rules.py": "from convert.read.h5 import read_model\n",
        "errors.py": "class SplitError(Exception): ...\n",
    }
    assert problems(_package(tmp_path, files)) == []
