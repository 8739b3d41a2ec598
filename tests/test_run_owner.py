"""A run has one owner: no module but training/runs.py builds a `runs/<id>` path or names a run's artefact.

Read from the source (AST), like the layering test: a file name or path part written as a string
constant anywhere else means someone reads or writes a run's files by hand.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.test_layering import LAYERS, ROOT

OWNER = ROOT / "training" / "runs.py"
ARTEFACTS = {"plan.json", "result.json", "evaluation.json", "gate.json", "deployment.json", "memory_used.json",
             "crew_result.json", "narrative.json", "lessons.jsonl", "metrics.jsonl", "trace.jsonl"}


def sources() -> list[Path]:
    files = [p for layer in LAYERS for p in (ROOT / layer).rglob("*.py")] + list((ROOT / "bench").rglob("*.py"))
    return sorted(p for p in files if p != OWNER)


def offences_in(path: Path, root: Path = ROOT) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(root)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in ARTEFACTS:
            found.append(f"{where} names the run artefact {node.value!r}")
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            for side in (node.left, node.right):
                if isinstance(side, ast.Constant) and side.value == "runs":
                    found.append(f"{where} joins a path with 'runs'")
        elif isinstance(node, ast.Call) and any(isinstance(a, ast.Constant) and a.value == "runs" for a in node.args):
            found.append(f"{where} passes 'runs' to {ast.unparse(node.func)}()")
        elif isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant) \
                and str(node.values[0].value).startswith("runs/"):
            found.append(f"{where} formats a 'runs/...' path")
    return found


def test_no_module_but_the_run_owner_builds_run_paths_or_reads_run_artefacts():
    offences = [o for path in sources() for o in offences_in(path)]
    assert offences == []


def test_the_check_finds_each_kind_of_hand_built_path(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text('from pathlib import Path\n'
                      'a = Path(ws) / "runs" / rid / "gate.json"\n'
                      'b = Path(ws).joinpath("runs", rid)\n'
                      'c = f"runs/{rid}/x"\n')
    offences = offences_in(sample, root=tmp_path)
    assert len(offences) == 4, offences
