"""The import rules of docs/architecture.md, checked on the source (every import, top-level or inside a function).

The packages are installed under other names than their folders (pyproject.toml's package-dir): server/ is
relat_server, clients/ relat_client, evaluation/ relat_eval.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"relat_core": ROOT / "relat_core", "relat_server": ROOT / "server", "relat_client": ROOT / "clients",
            "relat_eval": ROOT / "evaluation"}
HTTP = {"fastapi", "starlette", "uvicorn", "httpx", "pydantic", "pydantic_settings", "prometheus_client"}

# What each package may not import (top-level module names).
FORBIDDEN: dict[str, set[str]] = {
    "relat_core": {"relat_server", "relat_client", "relat_eval"} | HTTP,  # the algorithm: plain PyTorch, no HTTP
    "relat_client": {"relat_core", "relat_server", "relat_eval", "torch", "transformers"},  # depends on nothing
    "relat_eval": {"relat_server"},  # in-process through relat_core, or a server through relat_client
    "relat_server": set(),  # checked per module below
}
# The `relat` command (server/cli.py) fronts the client (`relat ask --url`) and `relat eval`; the server proper
# reaches the engine only.
SERVER_COMMAND = "relat_server.cli"
# Inside the engine: the scheduler decides which rows run which phase; phases, rows and events never reach back
# into it, and the models know nothing of the engine.
ENGINE_LAYERS: dict[str, set[str]] = {
    "relat_core.engine.events": {"relat_core.engine"},
    "relat_core.engine.rows": {"relat_core.engine.scheduler"},
    "relat_core.engine.training": {"relat_core.engine.scheduler"},
    "relat_core.engine.thinking": {"relat_core.engine.scheduler"},
    "relat_core.engine.answering": {"relat_core.engine.scheduler"},
    "relat_core.models": {"relat_core.engine"},
}


def module_name(package: str, path: Path) -> str:
    relative = path.relative_to(PACKAGES[package]).with_suffix("")
    parts = [p for p in relative.parts if p != "__init__"]
    return ".".join([package, *parts])


def imports_of(module: str, path: Path) -> set[str]:
    """Every module a file imports, absolute, relative imports resolved."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            found.add(prefix)
            found.update(f"{prefix}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return found


def all_modules() -> list[tuple[str, str, Path]]:
    return [(package, module_name(package, path), path) for package, folder in PACKAGES.items()
            for path in sorted(folder.rglob("*.py"))]


def breaks(imported: str, forbidden: set[str]) -> bool:
    return any(imported == name or imported.startswith(name + ".") for name in forbidden)


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_packages_import_only_what_the_architecture_allows(package: str):
    offences = []
    for owner, module, path in all_modules():
        if owner != package:
            continue
        forbidden = set(FORBIDDEN[package])
        if package == "relat_server" and module != SERVER_COMMAND:
            forbidden |= {"relat_client", "relat_eval"}
        offences += [f"{module} imports {name}" for name in sorted(imports_of(module, path))
                     if breaks(name, forbidden)]
    assert not offences, "\n".join(offences)


def test_the_engine_phases_never_reach_back_into_the_scheduler():
    offences = []
    for _, module, path in all_modules():
        for layer, forbidden in ENGINE_LAYERS.items():
            if module == layer or module.startswith(layer + "."):
                offences += [f"{module} imports {name}" for name in sorted(imports_of(module, path))
                             if breaks(name, forbidden) and not name.startswith(module)]
    assert not offences, "\n".join(offences)


def test_the_rule_checker_sees_relative_and_function_level_imports(tmp_path: Path):
    path = tmp_path / "training.py"
    path.write_text("def f():\n    from .scheduler import Engine\n    import relat_server.app\n")
    found = imports_of("relat_core.engine.training", path)
    assert {"relat_core.engine.scheduler", "relat_core.engine.scheduler.Engine", "relat_server.app"} <= found
    assert breaks("relat_server.app", FORBIDDEN["relat_core"])
    assert breaks("relat_core.engine.scheduler.Engine", ENGINE_LAYERS["relat_core.engine.training"])
    assert not breaks("relat_core.engine.rows", ENGINE_LAYERS["relat_core.engine.training"])
    init = tmp_path / "__init__.py"
    init.write_text("from .rows import Piece\nfrom .. import params\n")
    assert {"relat_core.engine.rows", "relat_core.params"} <= imports_of("relat_core.engine", init)


def test_every_package_folder_is_in_the_wheel():
    """pyproject.toml lists its packages one by one: a new subpackage left off the list is missing from a wheel
    (the Docker image installs one) while an editable install, and so every other test, still finds it."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {module_name(package, init) for package, folder in PACKAGES.items() for init in folder.rglob("__init__.py")}
    assert found == listed
