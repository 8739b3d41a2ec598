"""Curated datasets in the workspace: `datasets/<fingerprint>/` with the summary and the splits.

Each dataset is written into a temporary directory beside its final place and renamed into place at
the end, so a reader never sees half a dataset and a failed curation leaves nothing behind.
"""

from __future__ import annotations

import json
from pathlib import Path

from training.atomic import atomic_dir, write_text_atomic
from training.contracts import DatasetSummary
from training.errors import InputError


def datasets_dir(workspace: Path) -> Path:
    return Path(workspace) / "datasets"


def write_jsonl(path: Path, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False))
            f.write("\n")


def save_dataset(workspace: Path, summary: DatasetSummary, files: dict[str, list[dict]]) -> Path:
    """Atomically (re)place `datasets/<fingerprint>/` with summary.json and one .jsonl per entry in `files`."""
    target = datasets_dir(workspace) / summary.fingerprint
    with atomic_dir(target) as tmp:  # the same data curated again replaces its old copy whole
        for name, rows in files.items():
            write_jsonl(tmp / f"{name}.jsonl", rows)
        (tmp / "summary.json").write_text(summary_json(summary) + "\n", encoding="utf-8")
    return target


def summary_json(summary: DatasetSummary) -> str:
    return json.dumps(summary.model_dump(mode="json", by_alias=True), indent=2, ensure_ascii=False)


def load_summary(workspace: Path, fingerprint: str) -> DatasetSummary:
    path = datasets_dir(workspace) / fingerprint / "summary.json"
    if not path.exists():
        raise InputError(f"{fingerprint}: no such dataset in {datasets_dir(workspace)}")
    return DatasetSummary.model_validate_json(path.read_text(encoding="utf-8"))


def save_contamination(workspace: Path, fingerprint: str, overlaps: list[dict]) -> None:
    """`datasets/<fingerprint>/contamination.json`: the training records that restate earlier evaluation records."""
    write_text_atomic(datasets_dir(workspace) / fingerprint / "contamination.json", json.dumps(overlaps, indent=2))


def load_contamination(workspace: Path, fingerprint: str) -> list[dict] | None:
    """The overlaps found when the dataset was curated with memory, or None when it was never checked."""
    path = datasets_dir(workspace) / fingerprint / "contamination.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def list_datasets(workspace: Path) -> list[DatasetSummary]:
    """Every curated dataset in the workspace, newest first."""
    root = datasets_dir(workspace)
    if not root.is_dir():
        return []
    found = [load_summary(workspace, p.name) for p in root.iterdir() if (p / "summary.json").is_file() and not p.name.startswith(".")]
    return sorted(found, key=lambda s: s.created_at, reverse=True)
