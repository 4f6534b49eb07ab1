"""The package's shape as the design card states it: no import cycles between modules (deferred imports inside
functions included), the E-step free of torch, nnU-Net and files, and its stage sequence written in one module."""

from __future__ import annotations

import ast
import pathlib
import re

import nnunetv2_em

ROOT = pathlib.Path(nnunetv2_em.__file__).parent
MODULES = {".".join(("nnunetv2_em", *path.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__"): path
           for path in ROOT.rglob("*.py")}


def _imports(name: str, path: pathlib.Path) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its file (a parent package reached only because a
    submodule is imported does not count: Python runs it first, which is not a dependency of the importer)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative
                base = ".".join([*package.split(".")[:len(package.split(".")) - node.level + 1], base]).rstrip(".")
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {module for module in found if module in MODULES and module != name}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_module_imports_one_that_imports_it_back():
    graph = {name: _imports(name, path) for name, path in MODULES.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))
    # the check finds a cycle where there is one
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_the_estep_is_array_code_and_the_product_does_not_import_the_benchmark():
    for name, path in MODULES.items():
        imported = _imports(name, path) | {
            alias.name for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Import)
            for alias in node.names}
        text = path.read_text()
        if name.startswith("nnunetv2_em.estep"):
            assert not re.search(r"^\s*(import|from)\s+(torch|nnunetv2|SimpleITK|blosc2)\b", text, re.M), name
            assert not re.search(r"\bopen\(|np\.(load|save)\(", text), name  # no file I/O
            assert not any(module.startswith(("nnunetv2_em.storage", "nnunetv2_em.checks")) for module in imported)
        # the CLI's `benchmark` command hands over to it (inside its handler); nothing else of the product may
        if not name.startswith("nnunetv2_em.benchmark") and name != "nnunetv2_em.cli":
            assert not any(module.startswith("nnunetv2_em.benchmark") for module in imported), name


def test_the_stage_sequence_is_written_once():
    """Only the front door calls the round's fit and the gate; drivers go through it."""
    calls = re.compile(r"(?<!def )\b(fit_round|gate_round)\(")
    callers = {name for name, path in MODULES.items() if calls.search(path.read_text())}
    assert callers == {"nnunetv2_em.estep.pipeline"}
