"""Every third-party package the code imports is declared in pyproject.toml, and every
declared runtime dependency is imported somewhere (AST walk of node/, protocol/, wasm_verify/).

Imports at run time need `dependencies`; an import guarded by `except ImportError`
may come from an extra; one under `if TYPE_CHECKING:` is for mypy (the test extra).
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("node", "protocol", "wasm_verify")
# Import names whose distribution is not installed here (optional extras).
KNOWN = {"pynvml": "nvidia-ml-py"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _req_name(req: str) -> str:
    m = re.match(r"[A-Za-z0-9_.-]+", req)
    assert m, req
    return _norm(m.group(0))


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _guards_import_error(node: ast.Try) -> bool:
    for h in node.handlers:
        names = h.type.elts if isinstance(h.type, ast.Tuple) else [h.type] if h.type else []
        if any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError") for n in names):
            return True
    return False


def _imports() -> dict[str, set[str]]:
    """Top-level module -> contexts it is imported in: 'runtime', 'optional', 'typing'."""
    found: dict[str, set[str]] = {}

    def visit(node: ast.AST, ctx: str) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.body:
                visit(child, "typing")
            for child in node.orelse:
                visit(child, ctx)
            return
        if isinstance(node, ast.Try) and _guards_import_error(node) and ctx == "runtime":
            for child in node.body:
                visit(child, "optional")
            for child in [*node.handlers, *node.orelse, *node.finalbody]:
                visit(child, ctx)
            return
        if isinstance(node, ast.Import):
            for a in node.names:
                found.setdefault(a.name.split(".")[0], set()).add(ctx)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.setdefault(node.module.split(".")[0], set()).add(ctx)
        for child in ast.iter_child_nodes(node):
            visit(child, ctx)

    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            visit(ast.parse(path.read_text(), str(path)), "runtime")
    return {m: c for m, c in found.items() if m not in sys.stdlib_module_names and m not in ("autoglm", "__future__")}


def _distribution(module: str) -> str:
    if module in KNOWN:
        return KNOWN[module]
    dists = md.packages_distributions().get(module)
    assert dists, f"{module} is imported but no installed distribution provides it"
    return _norm(dists[0])


def _declared() -> tuple[set[str], dict[str, set[str]]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = {_req_name(r) for r in project["dependencies"]}
    extras = {name: {_req_name(r) for r in reqs} for name, reqs in project["optional-dependencies"].items()}
    return deps, extras


def test_every_import_is_declared() -> None:
    deps, extras = _declared()
    any_extra = set().union(*extras.values())
    problems = []
    for module, contexts in sorted(_imports().items()):
        dist = _distribution(module)
        if "runtime" in contexts and dist not in deps:
            problems.append(f"{module} ({dist}) is imported at run time but not in [project] dependencies")
        elif "optional" in contexts and dist not in deps | any_extra:
            problems.append(f"{module} ({dist}) is an optional import but in no extra")
        elif contexts == {"typing"} and dist not in deps | extras["test"]:
            problems.append(f"{module} ({dist}) is imported for type checking but not in the test extra")
    assert not problems, "\n".join(problems)


def test_every_dependency_is_imported() -> None:
    deps, _ = _declared()
    used = {_distribution(m) for m, c in _imports().items() if "runtime" in c}
    assert deps - used == set(), "declared but never imported"


def test_the_walk_sees_what_it_must() -> None:
    """The walk itself: h11 (serve-mirror) at run time, pynvml optional, trio_typing for typing only."""
    found = _imports()
    assert "runtime" in found["h11"] and "runtime" in found["trio"]
    assert found["pynvml"] == {"optional"}
    assert found["trio_typing"] == {"typing"}
