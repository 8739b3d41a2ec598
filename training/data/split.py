"""Deterministic train/val/test assignment by record hash.

A record's split depends only on its own content hash, never on its position or on the other
records, so appending records to a dataset never moves an old record to another split (the
retraining loop relies on this). Only one record of each near-duplicate cluster survives curation,
so a cluster can never straddle two splits.
"""

from __future__ import annotations

from training.errors import InputError

SPLITS = ("train", "val", "test")


def parse_split(spec: str) -> tuple[float, float, float]:
    """'0.8,0.1,0.1' -> (0.8, 0.1, 0.1); three non-negative fractions summing to 1."""
    try:
        parts = tuple(float(x) for x in spec.split(","))
    except ValueError:
        raise InputError(f"--split: expected three numbers like 0.8,0.1,0.1, got {spec!r}") from None
    check_split(parts, "--split")
    return parts  # type: ignore[return-value]


def check_split(parts, name: str = "split") -> None:
    if len(parts) != 3 or any(p < 0 for p in parts) or abs(sum(parts) - 1) > 1e-6 or parts[0] == 0:
        raise InputError(f"{name}: expected three non-negative fractions (train > 0) summing to 1, got {parts}")


def assign_split(content_hash: str, fractions: tuple[float, float, float]) -> str:
    # bits 64..127 of the hash: independent of the 64 bits used for the record id
    u = int(content_hash[16:32], 16) / 2**64
    if u < fractions[0]:
        return "train"
    if u < fractions[0] + fractions[1]:
        return "val"
    return "test"
