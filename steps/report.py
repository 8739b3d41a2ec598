"""The run's report, and the one lesson kept about it in memory."""

from __future__ import annotations

from pathlib import Path

from memory.store import MemoryStore
from reports.run import render


def write_report(workspace: Path, run_id: str, goal_text: str | None, dataset: str, narrative: str | None = None,
                 lesson: str | None = None, author: str = "unknown") -> Path:
    """Render report.md and report.html from the run's artefacts (refusing a narrative that carries its own
    numbers or contradicts the verdict) and store `lesson` under its `author`; returns the Markdown path."""
    md, _ = render(Path(workspace), run_id, goal_text or None, narrative, author)
    if lesson:
        MemoryStore(workspace).add_lesson(lesson, run_id, dataset, author=author)
    return md
