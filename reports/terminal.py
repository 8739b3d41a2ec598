"""Rich renderings of engine results for the terminal (the CLI's tables and lines)."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from training.contracts import DatasetSummary, Evaluation, RunResult


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


def run_table(r: RunResult) -> Table:
    table = Table(title=f"run {r.run_id}: {r.status}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    val = "-" if r.best_val_loss is None else f"{r.best_val_loss:.4f} at step {r.best_step}"
    for key, value in [
        ("why it stopped", r.message),
        ("steps / tokens", f"{r.steps:,} / {r.tokens:,}"),
        ("best val loss", val),
        ("speed", f"{r.tokens_per_second:,.0f} tokens/s on {r.device}, {r.wall_seconds:.0f} s"),
        ("peak memory", f"{r.peak_memory_mb:,.0f} MB"),
        ("parameters", f"{r.trainable_params:,} trainable of {r.total_params:,}"),
        ("model", r.best_dir or r.final_dir),
    ]:
        table.add_row(key, value)
    return table


def evaluation_table(e: Evaluation) -> Table:
    level = f"{e.confidence:.0%}"
    table = Table(title=f"evaluation of {e.run_id} ({e.format}; intervals at {level})", title_justify="left")
    for col in ("metric", "records", "candidate", "base", "change vs base (paired)"):
        table.add_column(col, justify="right" if col != "metric" else "left")

    def shown(key: str) -> str:
        value, i = e.metrics.get(key), e.intervals.get(key)
        if value is None:
            return "-"
        return f"{value:.4g} ({i.low:.4g}-{i.high:.4g})" if i else f"{value:.4g}"

    for name, value in e.metrics.items():
        if name.startswith(("base_", "production_")) or name.endswith("_loss"):
            continue
        c = e.comparisons.get("base", {}).get(name)
        if c is not None:
            change = (f"{c.change:+.1%} ({c.low:+.1%} to {c.high:+.1%})" if c.kind == "ratio"
                      else f"{c.change:+.3g} ({c.low:+.3g} to {c.high:+.3g})")
        else:
            base = e.metrics.get(f"base_{name}")
            change = "" if base in (None, 0) else f"{(value - base) / abs(base):+.1%}"
        n = e.intervals[name].n if name in e.intervals else ""
        table.add_row(name, str(n), shown(name), shown(f"base_{name}"), change)
    for line in ([e.base_source] if e.base_source else []) + e.warnings:
        table.caption = ((table.caption + "\n") if table.caption else "") + line
    return table


def hits_table(hits) -> Table:
    table = Table(title=f"memory: {hits[0].kind}")
    table.add_column("id")
    table.add_column("distance", justify="right")
    table.add_column("summary")
    for h in hits:
        table.add_row(h.id, f"{h.distance:.3f}", h.summary)
    return table


def recall_lines(recalled: dict) -> list[str]:
    """What memory said about a newly curated dataset, in a few lines."""
    lines = []
    similar = [s for s in recalled["similar"] if s["similarity"] >= 0.5]
    if similar:
        lines.append("similar datasets in memory: " + ", ".join(f"{s['fingerprint']} ({s['similarity']:.2f}, {s['source']})" for s in similar))
    else:
        lines.append("memory: no similar dataset seen before")
    bad = recalled["contaminated"]
    if bad:
        datasets = sorted({o["dataset"] for o in bad})
        lines.append(f"[yellow]warning[/yellow]: {len(bad)} of {recalled['train_records']} training records restate "
                     f"evaluation records of {', '.join(datasets)} (contamination; see --json for which)")
    else:
        lines.append(f"contamination: none of {recalled['train_records']} training records restates an earlier evaluation record")
    return lines
