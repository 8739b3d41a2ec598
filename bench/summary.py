"""One table of every bench's targets: what is targeted, the measured figure, MET / MISSED, and where and when.

    .venv/bin/python bench/summary.py [--quick] [--times FILE]

Reads the `summary` rows each bench script writes into its JSON (bench/results/, or bench/quick/results/ with
--quick) and prints them; `make bench`, `make bench-studies` and `make bench-quick` end with it. A bench whose JSON is missing is listed as
not run. With --times (the TSV `make` writes: bench, wall seconds, the 1-minute load average before it) it also prints
how long each bench took and the total. Exits 0 whatever the verdicts: a MISSED target is a finding, not a failure
of the run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parent
# in the order `make bench` runs them, then `make bench-studies`
BENCHES = ("bench_data", "bench_train", "bench_lora", "bench_dpo", "bench_precision", "bench_memory", "bench_serve", "bench_crew",
           "bench_report", "bench_loop_memory",
           "bench_checkpointing", "bench_dropout", "bench_cpu_levers", "bench_eval", "bench_bases")


def rows(results: Path) -> list[tuple[str, str, str, str, str]]:
    out = []
    for name in BENCHES:
        path = results / f"{name}.json"
        if not path.exists():
            out.append((name, "—", "not run", "", ""))
            continue
        payload = json.loads(path.read_text(encoding="utf-8"))
        prov = payload.get("provenance") or {}
        where = (prov.get("commit", "")[:10] + (" +uncommitted" if prov.get("dirty") else "")) if prov else "no provenance"
        for row in payload.get("summary") or [{"target": "(no targets recorded)", "figure": "", "met": None}]:
            verdict = {True: "MET", False: "MISSED", None: "—"}[row.get("met")]
            out.append((name, row["target"], row["figure"], verdict, where))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the reduced runs of make bench-quick (bench/quick/)")
    ap.add_argument("--times", type=Path, help="the wall seconds per bench that make recorded (TSV)")
    a = ap.parse_args()
    from rich.console import Console
    from rich.table import Table

    table = Table(title="modelcrew benchmarks" + (" (quick: reduced sizes, not the published figures)" if a.quick else ""))
    for column in ("bench", "target", "figure", "verdict", "commit"):
        table.add_column(column, overflow="fold")
    for row in rows(BENCH / "quick" / "results" if a.quick else BENCH / "results"):
        table.add_row(*row, style={"MET": "green", "MISSED": "red"}.get(row[3]))
    Console().print(table)
    if a.times and a.times.exists():
        print(times_line(a.times))


def times_line(path: Path) -> str:
    """'make bench took 27 min 41 s: bench_data 95 s (load 0.41), ...' from the TSV make wrote."""
    parts = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    total = sum(int(seconds) for _, seconds, _ in parts)
    each = ", ".join(f"{name} {seconds} s (load {load})" for name, seconds, load in parts)
    return f"make {path.stem.removesuffix('_times')} took {total // 60} min {total % 60} s: {each}"


if __name__ == "__main__":
    main()
