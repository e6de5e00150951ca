"""The import rules of docs/architecture.md ("Layout"), read from the code itself."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICE = ROOT / "service" / "meds_service"


def imports(path: Path) -> set[str]:
    """Absolute module names a file imports (relative imports resolved against its package)."""
    package = path.relative_to(path.parents[len(path.relative_to(ROOT).parts) - 2]).with_suffix("").parts[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.py"))


def offenders(folder: Path, forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in files(folder)
        for name in sorted(imports(path))
        if name.startswith(forbidden)
    ]


@pytest.mark.parametrize(
    ("folder", "forbidden"),
    [
        (SERVICE / "core", ("meds_service.api", "meds_service.engine", "meds_service.storage", "meds_service.app")),
        (SERVICE / "engine", ("meds_service.storage", "meds_service.api", "meds_service.workers")),
        (SERVICE / "storage", ("meds_service.engine", "meds_service.api")),
        (ROOT / "client" / "meds_client", ("meds_service",)),
        (ROOT / "bench", ("tests",)),
        (ROOT / "harness", ("tests", "bench")),
    ],
)
def test_imports_flow_one_way(folder: Path, forbidden: tuple[str, ...]) -> None:
    assert offenders(folder, forbidden) == []


def test_workers_use_the_engine_only_through_its_ports_and_refits() -> None:
    engine = {n for n in imports(SERVICE / "workers.py") if n.startswith("meds_service.engine")}
    assert engine and all(n.startswith(("meds_service.engine.ports", "meds_service.engine.refits")) for n in engine)


def test_the_checker_sees_relative_imports() -> None:
    assert "meds_service.engine.ports.MemoryStore" in imports(SERVICE / "engine" / "memory.py")
    assert "meds_service.core.types" in imports(SERVICE / "storage" / "sqlite.py")
