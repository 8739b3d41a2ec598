"""Curate a dataset into the workspace and record it in memory: similar datasets, contamination."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from memory.store import MemoryStore, Overlap, SimilarDataset
from training.batches import read_split
from training.contracts import CurationSettings, DatasetSummary
from training.data import curate_to_workspace
from training.data.curate import Curated
from training.data.store import datasets_dir, save_contamination


@dataclass
class Recalled:
    """What memory knows about a dataset just curated."""

    similar: list[SimilarDataset]
    contaminated: list[Overlap]  # training records that restate earlier evaluation records
    train_records: int

    def to_json(self) -> dict:
        return {"similar": [s.model_dump() for s in self.similar], "contaminated": [o.model_dump() for o in self.contaminated],
                "train_records": self.train_records}


def curate_dataset(workspace: Path, source: str, *, settings: CurationSettings | None = None, format: str | None = None,
                   columns: dict[str, str] | None = None, encoding: str = "utf-8", allowed_roots: list[Path] | None = None,
                   related: list[str] = (), remember: bool = True, show_progress: bool = False,
                   status=None) -> tuple[Curated, Recalled | None]:
    """Curate `source` into `datasets/<fingerprint>/`; with `remember`, index it in memory and check it
    against every earlier evaluation set (the overlaps are kept in the dataset's contamination.json).

    `related` names earlier versions of the same data, whose evaluation records are its own, not contamination;
    `status(text)` is a context manager shown while memory works (the CLI's spinner)."""
    curated = curate_to_workspace(source, Path(workspace), settings=settings, format=format, columns=columns or {},
                                  encoding=encoding, allowed_roots=allowed_roots, show_progress=show_progress)
    if not remember:
        return curated, None
    with (status("recording the dataset in memory ...") if status else nullcontext()):
        recalled = remember_dataset(workspace, curated.summary, related)
    return curated, recalled


def remember_dataset(workspace: Path, summary: DatasetSummary, related: list[str] = ()) -> Recalled:
    store = MemoryStore(workspace)
    store.add_dataset(summary)
    similar = store.similar_datasets(summary, k=3)
    train = read_split(datasets_dir(workspace) / summary.fingerprint, "train")
    overlaps = store.contamination(train, exclude_dataset=[summary.fingerprint, *related])
    save_contamination(workspace, summary.fingerprint, [o.model_dump() for o in overlaps])
    return Recalled(similar, overlaps, len(train))
