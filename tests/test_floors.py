"""The package's floors (DESIGN.md), read from every import in tunelab/, function-level ones included: errors/ui ->
config -> data, model -> train, export, infer -> cli; nothing imports upward, data/ imports neither model/ nor
train/, train/ and export/ never import infer/, infer/ never imports train/, and the exported Space's app.py
imports nothing from tunelab."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "tunelab"
FLOORS = {"tunelab": 0, "errors": 0, "ui": 0, "cache": 0, "config": 1, "data": 2, "model": 2, "train": 3,
          "export": 3, "infer": 3, "demo": 4, "cli": 5, "__main__": 5}
FORBIDDEN = {"data": {"model", "train"}, "train": {"infer"}, "export": {"infer"}, "infer": {"train"}}
APP_TEMPLATE = PACKAGE / "export" / "app_template" / "app.py"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """The tunelab modules a file imports (`from tunelab import ui` is the module tunelab.ui)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "tunelab"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tunelab":
            base = PACKAGE.parent.joinpath(*node.module.split("."))
            subs = {f"{node.module}.{a.name}" for a in node.names
                    if (base / f"{a.name}.py").exists() or (base / a.name).is_dir()}
            out |= subs or {node.module}
    return out


def room(module: str) -> str:
    """tunelab.data.formats -> data; tunelab.ui -> ui; tunelab -> tunelab."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "tunelab"


def package_imports() -> dict[str, set[str]]:
    return {module_name(f): imported_modules(f) for f in sorted(PACKAGE.rglob("*.py")) if f != APP_TEMPLATE}


def test_every_room_has_a_floor() -> None:
    rooms = {room(m) for m in package_imports()}
    assert rooms <= set(FLOORS), rooms - set(FLOORS)


def test_nothing_imports_upward() -> None:
    upward = [f"{m} -> {i}" for m, imports in package_imports().items() for i in sorted(imports)
              if FLOORS[room(i)] > FLOORS[room(m)]]
    assert not upward, "\n".join(upward)


def test_the_named_floors_keep_apart() -> None:
    crossing = [f"{m} -> {i}" for m, imports in package_imports().items() for i in sorted(imports)
                if room(i) in FORBIDDEN.get(room(m), set())]
    assert not crossing, "\n".join(crossing)


def test_the_exported_app_imports_nothing_from_tunelab() -> None:
    assert imported_modules(APP_TEMPLATE) == set()


def test_the_walk_sees_function_level_imports() -> None:
    """cli.py imports its commands inside functions; the walk must see them, or the floors say nothing."""
    cli = package_imports()["tunelab.cli"]
    assert {"tunelab.train.loop", "tunelab.infer.api.server", "tunelab.export.app", "tunelab.ui"} <= cli
