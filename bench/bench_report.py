"""How long a report takes to render for a run with 10,000 logged steps (target <= 5 s).

    .venv/bin/python bench/bench_report.py [--workspace .modelcrew] [--run RUN_ID] [--steps 10000] [--quick]

Copies the artefacts of an evaluated run (not its weights) into a temporary workspace, replaces its
logged metrics with `--steps` synthetic rows (a validation row every 50 steps), and times `render()`
three times in this process after importing what it needs (timed apart).
Writes bench/results/bench_report.json and the bench_report section of bench/RESULTS.md. `--quick`: 2,000 steps.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import WORKSPACE, result_json, stamp, stamp_rows, table, verdict, write_json, write_section
from common import parse

OUT = result_json("bench_report")
TARGET_S = 5.0
MAX_POINTS = 1500  # what the plots downsample each curve to (reports/)
RENDERS = 3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workspace", type=Path, default=WORKSPACE)
    ap.add_argument("--run", default=None)
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--quick", action="store_true", help="2,000 logged steps")
    a = parse(ap)
    if a.quick:
        a.steps = min(a.steps, 2_000)
    from training.data.store import datasets_dir
    from training.runs import Run, evaluated_runs

    runs = sorted(evaluated_runs(a.workspace), key=lambda r: r.evaluation().created_at)  # the one evaluated last
    source = Run(a.workspace, a.run) if a.run else (runs[-1] if runs else None)
    if source is None:
        sys.exit("no evaluated run: run `make demo` first")
    plan = source.plan()
    tmp = Path(tempfile.mkdtemp(prefix="bench-report-"))
    try:
        target = Run(tmp, source.run_id)
        target.dir.mkdir(parents=True)
        for f in source.dir.iterdir():
            if f.is_file() and f.suffix in (".json", ".jsonl", ".md"):
                shutil.copy(f, target.dir / f.name)
        shutil.copytree(datasets_dir(a.workspace) / plan.dataset, datasets_dir(tmp) / plan.dataset)
        if (a.workspace / "memory").exists():  # the history plot reads memory, as in a real workspace
            shutil.copytree(a.workspace / "memory", tmp / "memory", ignore=shutil.ignore_patterns("*.lock", "*.holder"))
        with open(target.metrics_path, "w") as f:
            for step in range(1, a.steps + 1):
                row = {"step": step, "loss": 3 + 2 * math.exp(-step / 2000), "lr": 2e-4, "tokens": step * 800, "tokens_per_s": 130.0}
                if step % 50 == 0:
                    row["val_loss"] = 3.2 + 2 * math.exp(-step / 2500)
                f.write(json.dumps(row) + "\n")
        t0 = time.perf_counter()
        import chromadb  # noqa: F401
        import matplotlib.pyplot  # noqa: F401

        from reports.run import render

        import_s = time.perf_counter() - t0
        times = []
        for _ in range(RENDERS):
            t0 = time.perf_counter()
            render(tmp, source.run_id)
            times.append(time.perf_counter() - t0)
        size = target.report_paths()[1].stat().st_size
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    met = max(times) <= TARGET_S  # judged on rendering; imports are paid once per process (and before, in a crew run)
    out = {"run_id": source.run_id, "steps": a.steps, "val_every": 50, "max_points": MAX_POINTS, "renders": times,
           "import_s": import_s, "first_s": times[0], "next_median_s": statistics.median(times[1:]), "slowest_s": max(times),
           "html_bytes": size, "target_s": TARGET_S, **stamp(),
           "summary": [{"target": f"a report for a run with {a.steps:,} logged steps renders in <= {TARGET_S:g} s",
                        "figure": f"slowest of {RENDERS} renders {max(times):.2f} s", "met": met}]}
    write_json(OUT, out)
    lines = ["", "## Report rendering (`bench/bench_report.py`)", "",
             f"`render()` of run `{source.run_id}`'s artefacts with {a.steps:,} synthetic logged steps (plots downsample "
             f"to at most {MAX_POINTS:,} points per curve); {RENDERS} renders in one process, after the imports; the workspace's "
             "memory index is copied with it. Figures in `bench/results/bench_report.json`.", "",
             *table([("importing matplotlib, chromadb and the report module (once per process)", f"{import_s:.2f} s"),
                     ("first render (opens memory)", f"{times[0]:.2f} s"),
                     ("next renders (median)", f"{out['next_median_s']:.2f} s"),
                     ("report.html size", f"{size / 1e3:.0f} kB"),
                     (f"target: <= {TARGET_S:g} s", f"slowest {max(times):.2f} s -> {verdict(met)}"),
                     *stamp_rows(out)]), ""]
    write_section("bench_report", lines)
    print("\n".join(lines[1:-1]))


if __name__ == "__main__":
    main()
