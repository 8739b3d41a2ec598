"""The curation pipeline: read -> normalise -> clean -> scrub PII -> dedup -> split -> fingerprint -> summarise.

`curate()` works in memory and touches no file; `curate_to_workspace()` then writes the result
atomically to `<workspace>/datasets/<fingerprint>/`. Any bad input raises `InputError` before anything
is written, so a failed curation leaves the workspace as it was.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from training.contracts import CurationSettings, DatasetSummary, LengthStats
from training.data.clean import PIIScrubber, normalize_text
from training.data.dedup import clusters, near_duplicate_pairs, normalized_key
from training.data.describe import describe, top_terms
from training.data.readers import ReadOptions, read_source
from training.data.records import Record, record_id
from training.data.schemas import convert, to_record
from training.data.split import SPLITS, assign_split, check_split
from training.data.store import save_dataset
from training.errors import InputError
from training.progress import progress

REMOVAL_REASONS = ("empty", "too_long", "exact_duplicate", "near_duplicate")
FORMATS = ("text", "pairs", "chat", "classification", "preference", "feedback")
MIN_USEFUL_RECORDS = 20
TOPIC_SAMPLE = 5_000  # records read to find a dataset's frequent words


@dataclass
class Curated:
    summary: DatasetSummary
    splits: dict[str, list[dict]]  # split name -> records as written ({"id", **fields}), sorted by id
    removed: list[dict] = field(default_factory=list)
    path: Path | None = None


def curate_to_workspace(source: str, workspace: Path, **kwargs) -> Curated:
    """Curate `source` and store it as `<workspace>/datasets/<fingerprint>/`."""
    result = curate(source, **kwargs)
    files = {**result.splits, "removed": result.removed}
    result.path = save_dataset(Path(workspace), result.summary, files)
    return result


def curate(
    source: str,
    settings: CurationSettings | None = None,
    *,
    format: str | None = None,
    columns: dict[str, str] | None = None,
    encoding: str = "utf-8",
    allowed_roots: list[Path] | None = None,
    show_progress: bool = False,
) -> Curated:
    """Curate a dataset in memory. `format` forces the dataset format (else it is detected)."""
    settings = settings or CurationSettings()
    check_split(settings.split)
    opts = ReadOptions(encoding=encoding, columns=columns or {}, chunk_chars=settings.chunk_chars,
                       allowed_roots=allowed_roots)

    records, schemas = [], set()
    with progress("reading", enabled=show_progress) as advance:
        for row, where in read_source(source, opts):
            record, schema = to_record(row, where)
            records.append(record)
            schemas.add(schema)
            advance(1)
    if not records:
        raise InputError(f"{source}: no records found")
    fmt = choose_format(records, format, source)
    records = [convert(r, fmt) for r in records]

    scrubber = PIIScrubber()
    kept, removed = [], []
    with progress("cleaning", total=len(records), enabled=show_progress) as advance:
        for r in records:
            r.map_strings(normalize_text)
            if settings.scrub_pii:
                r.map_strings(scrubber)
            if r.is_empty():
                removed.append(removal(r, "empty"))
            elif len(r.body()) > settings.max_chars:
                removed.append(removal(r, "too_long"))
            else:
                kept.append(r)
            advance(1)

    with progress("deduplicating", enabled=show_progress):
        hashed, duplicates = deduplicate(kept, settings.near_dup_threshold)
    removed += duplicates
    reasons = Counter(r["reason"] for r in removed)
    if not hashed:
        why = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in sorted(reasons.items()))
        raise InputError(f"{source}: no usable records after cleaning ({len(records)} read: {why})")

    kept = [r for _, r in hashed]
    splits: dict[str, list[dict]] = {name: [] for name in SPLITS}
    for h, r in hashed:
        splits[assign_split(h, settings.split)].append({"id": record_id(h), **r.fields})

    summary = summarise(source, fmt, sorted(schemas), records, kept, splits, reasons, scrubber.counts,
                        settings, fingerprint(h for h, _ in hashed), opts.skipped)
    removed.sort(key=lambda r: (r["reason"], r["id"], r["where"]))
    return Curated(summary, splits, removed)


def choose_format(records: list[Record], forced: str | None, source: str) -> str:
    """The dataset format: as forced, or the one all records share (pairs and chat mix as chat)."""
    if forced:
        if forced not in FORMATS:
            raise InputError(f"--format: expected one of {', '.join(FORMATS)}, got {forced!r}")
        return forced
    found = {r.format for r in records}
    if len(found) == 1:
        return found.pop()
    if found == {"pairs", "chat"}:
        return "chat"
    raise InputError(
        f"{source}: records of several formats ({', '.join(sorted(found))}); "
        f"pass --format ({'|'.join(FORMATS)}) to choose one"
    )


def removal(record: Record, reason: str, duplicate_of: str | None = None, similarity: float | None = None) -> dict:
    entry = {"id": record_id(record.content_hash()), "reason": reason, "where": record.where}
    if duplicate_of is not None:
        entry["duplicate_of"] = duplicate_of
    if similarity is not None:
        entry["similarity"] = round(similarity, 4)
    entry["record"] = record.fields
    return entry


def deduplicate(records: list[Record], threshold: float) -> tuple[list[tuple[str, Record]], list[dict]]:
    """Keep one record per duplicate cluster — the one with the smallest content hash — whatever the order.

    Exact copies go first; then records whose normalised text is equal, or whose shingle sets have a
    Jaccard similarity >= `threshold`, are clustered (transitively) and all but the keeper removed.
    Returns the kept records as (content hash, record) in hash order, and the removal entries.
    """
    hashes = [r.content_hash() for r in records]
    removed, seen = [], set()
    unique: list[int] = []
    for i, h in enumerate(hashes):
        if h in seen:
            removed.append(removal(records[i], "exact_duplicate", record_id(h), 1.0))
        else:
            seen.add(h)
            unique.append(i)
    unique.sort(key=lambda i: hashes[i])  # positions below are in hash order: the keeper is the smallest
    keys = [normalized_key(records[i].body()) for i in unique]

    pairs, first_with_key = [], {}
    for pos, key in enumerate(keys):
        if key in first_with_key:
            pairs.append((first_with_key[key], pos, 1.0))
        else:
            first_with_key[key] = pos
    reps = list(first_with_key.values())
    pairs += [(reps[i], reps[j], sim) for i, j, sim in near_duplicate_pairs([keys[p] for p in reps], threshold)]

    similarity = {(i, j): sim for i, j, sim in pairs}
    dropped = set()
    for members in clusters(len(unique), pairs).values():
        keeper = min(members)
        for m in members:
            if m != keeper:
                dropped.add(m)
                sim = similarity.get((keeper, m))  # absent when linked only through another member
                removed.append(removal(records[unique[m]], "near_duplicate", record_id(hashes[unique[keeper]]), sim))
    kept = [(hashes[unique[pos]], records[unique[pos]]) for pos in range(len(unique)) if pos not in dropped]
    return kept, removed


def fingerprint(content_hashes) -> str:
    """Hash of the sorted record hashes: independent of order, file name and input format."""
    digest = hashlib.sha256("\n".join(sorted(content_hashes)).encode("ascii")).hexdigest()
    return digest[:16]


def length_stats(values: list[int], unit: str) -> LengthStats:
    arr = np.asarray(values, dtype=np.int64)
    return LengthStats(unit=unit, min=int(arr.min()), mean=round(float(arr.mean()), 1),
                       p50=int(np.percentile(arr, 50)), p95=int(np.percentile(arr, 95)),
                       max=int(arr.max()), total=int(arr.sum()))


def token_lengths(texts: list[str], tokenizer: str) -> list[int]:
    """Token counts of `texts` with a Hugging Face tokenizer (a local directory or a hub id)."""
    if tokenizer == "bytes":
        return [len(t.encode("utf-8")) for t in texts]
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(tokenizer)
    except Exception as err:  # transformers raises OSError, ValueError, ... for a bad path or id
        raise InputError(f"--tokenizer: cannot load tokenizer {tokenizer!r} ({str(err).splitlines()[0]})") from None
    return [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]


def summarise(source, fmt, schemas, records, kept, splits, reasons, pii, settings, fp, skipped) -> DatasetSummary:
    bodies = [r.body() for r in kept]
    labels = Counter(r.fields["label"] for r in kept) if fmt == "classification" else None
    if fmt == "feedback":
        labels = Counter("good" if r.fields["label"] else "bad" for r in kept)
    # Topics from a fixed sample: `kept` is in hash order, so its head is an order-independent random sample.
    terms = top_terms(bodies[:TOPIC_SAMPLE])
    label_terms = None
    if labels:
        label_terms = {name: top_terms([r.body() for r in kept if r.fields["label"] == name][:TOPIC_SAMPLE], k=4)
                       for name in labels} if fmt == "classification" else None
    train_or_all = splits["train"] or [row for rows in splits.values() for row in rows]
    warnings = [f"skipped {len(skipped)} file(s) of unsupported type: {', '.join(skipped[:5])}"] if skipped else []
    if len(kept) < MIN_USEFUL_RECORDS:
        warnings.append(f"only {len(kept)} records after cleaning: too few to train and validate reliably")
    for name, frac in zip(SPLITS, settings.split):
        if frac > 0 and not splits[name]:
            warnings.append(f"the {name} split is empty: {len(kept)} records are too few for a {frac:g} fraction")
    return DatasetSummary(
        fingerprint=fp,
        source=source,
        format=fmt,
        schema=schemas,
        records_in=len(records),
        records_after=len(kept),
        removed={reason: reasons.get(reason, 0) for reason in REMOVAL_REASONS},
        pii={kind: pii.get(kind, 0) for kind in ("email", "phone", "card", "ip")},
        splits={name: len(rows) for name, rows in splits.items()},
        lengths_chars=length_stats([len(b) for b in bodies], "chars"),
        lengths_tokens=length_stats(token_lengths(bodies, settings.tokenizer), settings.tokenizer),
        labels=dict(sorted(labels.items())) if labels else None,
        samples=train_or_all[:5],
        description=describe(fmt, len(kept), len(records), terms[:8], labels, label_terms),
        top_terms=terms,
        settings=settings,
        warnings=warnings,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
