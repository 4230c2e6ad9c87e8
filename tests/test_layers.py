"""The layers point one way: worker -> app -> unlearning, and inside the app the core sits
under every domain. Read from the source's import statements (function-level ones included),
so a violation fails here before it becomes a cycle at run time."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """Every absolute module a file imports, wherever the statement sits."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from app import tables` imports the module app.tables
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def violations(package: str, forbidden: tuple[str, ...], allowed: tuple[str, ...] = ()
               ) -> list[str]:
    def matches(module: str, prefixes: tuple[str, ...]) -> bool:
        return any(module == p or module.startswith(p + ".") for p in prefixes)

    return sorted(f"{path.relative_to(REPO)} imports {module}"
                  for path in (REPO / package).rglob("*.py")
                  for module in imported_modules(path)
                  if matches(module, forbidden) and not matches(module, allowed))


def test_the_engine_imports_nothing_from_the_app_or_the_worker() -> None:
    assert violations("unlearning", ("app", "worker")) == []


def test_the_app_imports_nothing_from_the_worker() -> None:
    assert violations("app", ("worker",)) == []


def test_the_core_imports_no_domain() -> None:
    assert violations("app/core", ("app",), allowed=("app.core",)) == []


def test_no_two_modules_import_each_other() -> None:
    modules: dict[str, set[str]] = {}
    for package in ("app", "worker", "unlearning", "benchmarks"):
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = (
                imported_modules(path))
    assert sorted(f"{a} <-> {b}" for a, imports in modules.items() for b in imports
                  if a < b and a in modules.get(b, ())) == []
