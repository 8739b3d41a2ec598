"""Rich renderings of engine results for the terminal."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from training.contracts import DatasetSummary


def summary_table(s: DatasetSummary) -> Table:
    table = Table(title=f"dataset {s.fingerprint}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    removed = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in s.removed.items() if v) or "none"
    pii = ", ".join(f"{k} {v}" for k, v in s.pii.items() if v) or "none"
    rows = [
        ("source", s.source),
        ("format", f"{s.format} ({', '.join(s.schema_)})"),
        ("records", f"{s.records_in} in -> {s.records_after} kept"),
        ("removed", removed),
        ("PII replaced", pii),
        ("splits", "  ".join(f"{k} {v}" for k, v in s.splits.items())),
        ("length (chars)", f"mean {s.lengths_chars.mean:g}, p50 {s.lengths_chars.p50}, p95 {s.lengths_chars.p95}, max {s.lengths_chars.max}"),
        (f"length ({s.lengths_tokens.unit})", f"mean {s.lengths_tokens.mean:g}, total {s.lengths_tokens.total:,}"),
    ]
    if s.labels:
        rows.append(("labels", ", ".join(f"{k} {v}" for k, v in s.labels.items())))
    rows.append(("about", s.description))
    rows += [("warning", w) for w in s.warnings]
    for key, value in rows:
        table.add_row(key, value)
    return table


def removed_table(removed: list[dict], source: str, limit: int = 8) -> Table:
    """The first `limit` dropped records: why, where in `source`, and which kept record they duplicate."""
    table = Table(title=f"removed records ({len(removed)}; all in removed.jsonl)", title_justify="left")
    for col in ("reason", "where", "duplicate of", "similarity"):
        table.add_column(col, overflow="fold")
    for r in removed[:limit]:
        sim = r.get("similarity")
        table.add_row(r["reason"].replace("_", " "), _short_where(r["where"], source), r.get("duplicate_of", ""),
                      "" if sim is None else f"{sim:.2f}")
    return table


def _short_where(where: str, source: str) -> str:
    """'faq.jsonl:12' -> 'line 12'; 'corpus/sub/a.txt:3' -> 'sub/a.txt:3' (relative to the source)."""
    prefix = str(Path(source)) if source != "bbc-news" else source
    rest = where[len(prefix):].lstrip(":/") if where.startswith(prefix) else where
    return f"line {rest}" if rest.isdigit() else rest


def datasets_table(summaries: list[DatasetSummary]) -> Table:
    table = Table(title="datasets", title_justify="left")
    for col in ("fingerprint", "format", "records", "train/val/test", "source", "created"):
        table.add_column(col)
    for s in summaries:
        table.add_row(s.fingerprint, s.format, str(s.records_after), "/".join(str(v) for v in s.splits.values()),
                      s.source, s.created_at)
    return table
