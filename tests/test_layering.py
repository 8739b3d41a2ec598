"""The layers import only downward: `training` never pulls in crewai or chromadb, and the CLI stays light.

The order (README, "Layout"): training < memory < serving < reports < steps < tools < llm < crews < cli.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["training", "memory", "serving", "reports", "steps", "tools", "llm", "crews", "cli"]
# layer -> top-level names it must never import: every layer above it, and crewai below `tools`
FORBIDDEN = {layer: set(LAYERS[i + 1:]) | ({"crewai"} if i < LAYERS.index("tools") else set())
             for i, layer in enumerate(LAYERS)}
FORBIDDEN["training"] |= {"chromadb"}
# `python -m training` must be training/__main__.py; it is an entry script that runs the CLI's engine
# commands (so both list the same commands and options), not a module of the engine: `import training`
# never loads it.
ENTRY_SCRIPTS = {Path("training/__main__.py")}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_no_layer_imports_upward_or_forbidden_libraries():
    offences = []
    for layer, banned in FORBIDDEN.items():
        for path in sorted((ROOT / layer).rglob("*.py")):
            if path.relative_to(ROOT) in ENTRY_SCRIPTS:
                continue
            for name in sorted(imported_modules(path) & banned):
                offences.append(f"{path.relative_to(ROOT)} imports {name}")
    assert offences == []


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_importing_the_whole_training_package_loads_neither_crewai_nor_chromadb():
    modules = [p.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".") for p in (ROOT / "training").rglob("*.py")]
    modules = [m.removesuffix(".__init__") for m in modules if not m.endswith("__main__")]
    loaded = _loaded_after("; ".join(f"import {m}" for m in modules))
    assert "training" in loaded
    assert not loaded & {"crewai", "chromadb"}


def test_cli_import_is_light():
    # `modelcrew --help` must answer in about a second: no heavy library at import time.
    loaded = _loaded_after("import cli")
    assert "typer" in loaded
    assert not loaded & {"torch", "transformers", "crewai", "chromadb", "langchain_community", "datasets", "peft"}


def test_every_package_has_a_layer():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert packages == set(LAYERS)


def test_the_entry_script_only_launches_the_cli():
    assert imported_modules(ROOT / "training" / "__main__.py") == {"cli"}
