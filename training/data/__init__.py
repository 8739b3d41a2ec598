"""Data curation: ingest any common dataset layout, clean, dedup, scrub PII, split, fingerprint, summarise.

Entry points: `curate()` (in memory) and `curate_to_workspace()` (writes `datasets/<fingerprint>/`).
"""

from training.data.curate import Curated, curate, curate_to_workspace

__all__ = ["Curated", "curate", "curate_to_workspace"]
