"""What the bench scripts share; no bench script imports another (or anything under tests/).

- the places: the repository root (put on sys.path by importing this module: the scripts run as
  `python bench/<script>.py`), `RESULTS.md` and the JSON files under `bench/results/`;
- the machine a bench ran on (CPU, cores, memory, package versions, commit, load average: `machine_info`
  and its table `machine_rows`, or the short `stamp` and `stamp_rows` of the one-table benches);
- the output: a script's generated section of RESULTS.md (`write_section`), its JSON (`write_json`),
  the markdown (`table`, `render_tables`) and terminal (`print_report`) tables;
- the child processes, clocks, RSS and profiles of the ours-vs-baseline runs of bench_train.py and
  bench_lora.py, and the comparison, report rows and profile tables both render;
- the support-ticket stream and tiny ticket model of bench_loop_memory.py.

Runs are reached through their owner, `training.runs` (no path or artefact of a run is built here by hand).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import itertools
import json
import os
import platform
import pstats
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# `--quick` (make bench-quick): reduced sizes, whose figures go to bench/quick/ (ignored by git), never over the real ones
QUICK = "--quick" in sys.argv[1:]
OUTPUT = BENCH / "quick" if QUICK else BENCH
RESULTS_MD = OUTPUT / "RESULTS.md"
WORKSPACE = ROOT / ".modelcrew"  # the crew's default workspace (`make demo` fills it)
DEFAULT_WORKSPACE = Path(tempfile.gettempdir()) / "modelcrew-bench"  # bench_train.py and bench_lora.py share it
TORCH_PACKAGES = ("torch", "transformers", "peft", "accelerate")
TARGET_CORES = 2  # the CPU targets are stated for 2 cores
MB = 10**6


def result_json(name: str) -> Path:
    """`bench/results/<name>.json` (bench/quick/results/ with --quick): where a bench keeps every figure of its
    last run."""
    return OUTPUT / "results" / f"{name}.json"


# --------------------------------------------------------------------------------------------------
# the machine


def git_commit() -> str:
    """The short commit, marked when the tree has uncommitted changes (for the lines a bench prints)."""
    commit, dirty = tree_state()
    return commit[:10] + ("+uncommitted" if dirty else "")


def tree_state() -> tuple[str, list[str]]:
    """(HEAD's full commit, the paths with uncommitted changes), a bench's own outputs left out."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=normal"], cwd=ROOT, capture_output=True,
                                text=True, check=False).stdout
    except OSError:
        return "", []
    paths = [line[3:] for line in status.splitlines() if line[3:]]
    return commit, [p for p in paths if not (p == "bench/RESULTS.md" or p.startswith("bench/results/"))]


# Where, when and by what the figures of this process's bench were measured: set by `begin` before measuring (or
# by `load_json` when a section is rendered again from its JSON); `write_json` records it and `write_section`
# ends the section with it.
_provenance: dict | None = None


def parse(ap: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """The bench's arguments, with --allow-dirty; then `begin`."""
    ap.add_argument("--allow-dirty", action="store_true",
                    help="measure on a tree with uncommitted changes (the JSON and the section then say so)")
    args = ap.parse_args(argv)
    begin(args.allow_dirty)
    return args


def begin(allow_dirty: bool = False) -> dict:
    """Before measuring: refuse a tree with uncommitted changes (figures must be traceable to a commit) unless
    `allow_dirty`, which is then printed and recorded; record the commit, the command and the machine, its matmul
    peak included."""
    global _provenance
    commit, dirty = tree_state()
    shown = ", ".join(dirty[:4]) + (f" and {len(dirty) - 4} more" if len(dirty) > 4 else "")
    if dirty and not allow_dirty:
        print(f"bench: uncommitted changes in {shown}: commit them first, or pass --allow-dirty (the figures then say "
              "they were measured on an uncommitted tree)", file=sys.stderr)
        raise SystemExit(2)
    if dirty:
        print(f"bench: --allow-dirty: measuring with uncommitted changes in {shown}", file=sys.stderr)
    script = Path(sys.argv[0]).resolve()
    command = " ".join(["python", str(shown_path(script)), *sys.argv[1:]])
    _provenance = {"commit": commit, "dirty": dirty, "command": command, "machine": machine(),
                   "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    return _provenance


def load_json(path: Path) -> dict:
    """A bench's JSON, to render its section again: its provenance becomes this process's."""
    global _provenance
    payload = json.loads(path.read_text(encoding="utf-8"))
    _provenance = payload.get("provenance")
    return payload


def machine() -> dict:
    """The CPU (model and matrix features), the cores this process may use and torch's threads, the GPU if any, and
    the measured matmul peak: the physical limit each figure can be read against."""
    import torch

    out = {"cpu": cpu_model(), "nproc": os.cpu_count(), "cores_used": len(os.sched_getaffinity(0)),
           "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "load_avg_start": round(os.getloadavg()[0], 2)}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    out["matmul_gflops"] = matmul_gflops("cuda" if torch.cuda.is_available() else "cpu")
    return out


def matmul_gflops(device: str = "cpu") -> dict[str, float]:
    """GFLOP/s of one square matmul (2048 on a CPU, 8192 on a GPU) in float32 and bfloat16: best of a few after a
    warm-up, within about a second each."""
    import torch

    n = 8192 if device == "cuda" else 2048
    peaks = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
        times: list[float] = []
        while len(times) < 3 or (sum(times) < 1.0 and len(times) < 20):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            a @ b
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        peaks[str(dtype).removeprefix("torch.")] = round(2 * n**3 / min(times[1:]) / 1e9, 1)
    peaks["n"] = n
    return peaks


def provenance_lines(p: dict | None) -> list[str]:
    """The section's last lines: commit (and whether the tree was clean), command, machine and matmul peak."""
    if not p:
        return []
    m = p["machine"]
    tree = (f"**with uncommitted changes** in {', '.join(p['dirty'][:4])}" if p["dirty"] else "clean tree")
    peak = m["matmul_gflops"]
    where = m.get("gpu") or f"{m['cpu']}, {m['cores_used']} of {m['nproc']} cores, {m['torch_threads']} torch threads"
    # a run recorded before provenance existed (rebuilt from its own record: `reconstructed` says how) lacks some fields
    load = f"load average {m['load_avg_start']:.2f} at the start; " if "load_avg_start" in m else ""
    peaks = ", ".join(f"{peak[k]:,.0f} GFLOP/s {k}" for k in ("float32", "bfloat16") if k in peak)
    note = f" {p['reconstructed']}" if p.get("reconstructed") else ""
    return ["", f"Measured at commit `{p['commit'][:10]}` ({tree}) by `{p['command']}` on {p['date_utc'][:10]}; {where}; "
                f"{load}measured matmul peak ({peak['n']}^2): {peaks}.{note}", ""]


def machine_info(packages: tuple[str, ...] = TORCH_PACKAGES) -> dict:
    """CPU, cores, memory, python and `packages` versions, platform, commit, load average and date."""
    from importlib.metadata import PackageNotFoundError, version

    def ver(pkg: str) -> str:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return "-"

    cpu = cpu_model()
    mem = None
    try:
        m = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
        mem = int(m.group(1)) * 1024 if m else None
    except OSError:
        pass
    return {"cpu_model": cpu, "nproc": os.cpu_count(), "cores_used": len(os.sched_getaffinity(0)),
            "mem_total_bytes": mem, "python": platform.python_version(), **{p: ver(p) for p in packages},
            "platform": platform.platform(), "git_commit": git_commit(), "loadavg_start": os.getloadavg()[0],
            "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def machine_rows(m: dict, packages: tuple[str, ...] = TORCH_PACKAGES) -> list[tuple[str, str]]:
    """Memory, versions, platform and load at start and end; CPU, cores, commit and date are in the provenance line."""
    return [
        ("memory", f"{fmt(m['mem_total_bytes'] / 10**9, 1)} GB" if m["mem_total_bytes"] else "n/a"),
        (" / ".join(("python",) + packages), " / ".join(m[k] for k in ("python",) + packages)),
        ("platform", m["platform"]),
        ("load average (1 min) at start / end, other work on the machine skews timings",
         f"{m['loadavg_start']:.2f} / {m.get('loadavg_end', float('nan')):.2f}"),
    ]


def limit_cores() -> None:
    """The targets are stated for 2 cores: use at most that many (children inherit the affinity)."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) > TARGET_CORES:
        os.sched_setaffinity(0, cores[:TARGET_CORES])


def set_threads(spec: dict) -> None:
    if spec.get("threads"):
        import torch

        torch.set_num_threads(spec["threads"])


# --------------------------------------------------------------------------------------------------
# output: RESULTS.md sections, JSON, tables


def markers(name: str) -> tuple[str, str]:
    """The comments around the section of RESULTS.md that `bench/<name>.py` generates."""
    return f"<!-- {name}:begin (generated by bench/{name}.py; do not edit) -->", f"<!-- {name}:end -->"


def write_section(name: str, body: list[str], md_path: Path = RESULTS_MD) -> None:
    """Regenerate the section of `md_path` that `bench/<name>.py` owns: `body` between its markers
    (the section is appended when the file has none yet)."""
    head, tail = markers(name)
    update_markdown(md_path, "\n".join([head, *body, *provenance_lines(_provenance), tail]), head, tail)


def update_markdown(md_path: Path, section: str, begin: str, end: str) -> None:
    """Replace the text from `begin` to `end` in `md_path` with `section` (appended when not there yet)."""
    text = md_path.read_text(encoding="utf-8") if md_path.exists() else "# Benchmark results\n\n"
    start, stop = text.find(begin), text.find(end)
    if start != -1 and stop != -1:
        text = text[:start] + section + text[stop + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    md_path.write_text(text, encoding="utf-8")


def write_json(path: Path, payload: dict) -> None:
    """`payload` with this process's provenance (see `begin`): a bench's figures never lose where they came from."""
    if _provenance is None:
        raise RuntimeError("a bench writes its JSON only after common.begin() (or common.parse()) recorded the commit")
    payload = {**payload, "provenance": _provenance}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def cpu_model() -> str:
    """The CPU's model name and the matrix features that decide its speed (AMX, AVX512-BF16, AVX-512, AVX2)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "unknown")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    features = [label for flag, label in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16"), ("avx512f", "AVX-512"),
                                          ("avx2", "AVX2")) if flag in flags]
    return f"{name} ({', '.join(features) or 'no AVX2'})"


def stamp() -> dict:
    """What the provenance line (commit, machine, date, load at the start) lacks: the platform and the load at the end."""
    return {"platform": platform.platform(), "load_avg_end": os.getloadavg()[0]}


def stamp_rows(out: dict, threads: str = "") -> list[tuple[str, str]]:
    """The row of a one-table section with `stamp()`'s platform and end-of-run load (the rest is in its provenance line)."""
    return [("platform, threads, load at the end", f"{out['platform']}, {threads}load average {out['load_avg_end']:.2f} "
                                                   "at the end (other work on the machine skews timings)")]


def shown_path(path: Path) -> Path:
    """`path` relative to the repository when it is inside it (as the reports name their JSON)."""
    try:
        return path.resolve().relative_to(ROOT)
    except ValueError:
        return path


def fmt(x, digits=0) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return f"{x:,}"


def verdict(met: bool) -> str:
    return "MET" if met else "MISSED"


def table(rows: list[tuple[str, str]]) -> list[str]:
    """A markdown table of (measure, value) rows; a '|' in a value is written '/'."""
    return ["| measure | value |", "|---|---|"] + [f"| {label} | {str(value).replace('|', '/')} |" for label, value in rows]


def render_tables(sections: list[tuple[str, list[tuple[str, str]]]]) -> list[str]:
    """One table per (section, rows), under the section's heading."""
    lines = []
    for section, rows in sections:
        lines += [f"### {section}", "", *table(rows), ""]
    return lines


def print_report(title: str, sections, prof: dict | None = None, what: str = "") -> None:
    """The (section, [(label, value)]) rows as one terminal table; with `prof`, the step's split and top operators."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=title)
    table.add_column("measure")
    table.add_column("value", overflow="fold")
    for section, rows in sections:
        table.add_section()
        table.add_row(f"[bold]{section}[/bold]", "")
        for label, value in rows:
            table.add_row("  " + label, value)
    console.print(table)
    if prof and prof.get("split"):
        t = Table(title=f"where our {what} step goes (cProfile, {prof['steps']} steps)")
        for c in ("part", "s/step", "share"):
            t.add_column(c)
        for r in prof["split"]:
            t.add_row(r["part"], f"{r['seconds'] / prof['steps']:.3f}", f"{100 * r['seconds'] / prof['cprofile_seconds']:.0f}%")
        console.print(t)
    if prof and prof.get("torch_ops"):
        t = Table(title=f"top operators (torch profiler, {prof['steps']} steps)")
        for c in ("operator", "calls", "own s/step"):
            t.add_column(c)
        for r in prof["torch_ops"][:12]:
            t.add_row(r["op"], fmt(r["calls"]), f"{r['self_cpu_s'] / prof['steps']:.3f}")
        console.print(t)


def make_progress():
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=Console(stderr=True), transient=True)


# --------------------------------------------------------------------------------------------------
# memory, clocks and the machine's other work


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def system_busy_s() -> float:
    """CPU-seconds all processes have spent busy since boot (/proc/stat, every core)."""
    with open("/proc/stat") as fh:
        v = [int(x) for x in fh.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v) - idle) / os.sysconf("SC_CLK_TCK")


class StepClock:
    """Wall time, own CPU time, the machine's busy CPU time and RSS at the end of every optimizer step
    (index 0: when the clock started)."""

    def __init__(self) -> None:
        self.t, self.cpu, self.busy, self.rss, self.peak = [], [], [], [], []
        self.tick()

    def tick(self) -> None:
        self.t.append(time.perf_counter())
        self.cpu.append(time.process_time())
        self.busy.append(system_busy_s())
        self.rss.append(rss_bytes())
        self.peak.append(peak_rss_bytes())

    def as_dict(self) -> dict:
        return {"t": self.t, "cpu": self.cpu, "busy": self.busy, "rss": self.rss, "peak": self.peak}


def free_cores_needed(threads: int) -> float:
    """Other processes may use this many cores before they contend with `threads` torch threads."""
    return max(0.0, TARGET_CORES - threads) + 0.3


def min_quiet(warmup: int, last: int) -> int:
    """Uncontended steps a side needs before its speed is judged on them alone."""
    return max(3, (last - warmup) // 2)


def steady(clock: dict, tokens: list[int], warmup: int, last: int, threads: int) -> dict:
    """Tokens/s over steps warmup+1..last (1-based), timed from the end of step `warmup` to the end of `last`.

    A step is *uncontended* when the other processes on the machine used fewer cores during it than
    would leave torch's threads a core each (the machine's busy CPU time minus ours, over the step's wall
    time). When they take a core that a torch thread needs, the OpenMP threads wait on each other at
    every parallel region and the step gets several times slower: those steps are reported, but also
    left out of the uncontended figure.
    """
    t, cpu, busy = clock["t"], clock["cpu"], clock["busy"]
    n_tok = sum(tokens[warmup:last])
    seconds = t[last] - t[warmup]
    cpu_seconds = cpu[last] - cpu[warmup]
    steps = range(warmup, last)
    per_step = [t[i + 1] - t[i] for i in steps]
    others = [max(0.0, (busy[i + 1] - busy[i]) - (cpu[i + 1] - cpu[i])) / max(t[i + 1] - t[i], 1e-9) for i in steps]
    quiet = [i for i, o in zip(steps, others) if o < free_cores_needed(threads)]
    return {"steps": last - warmup, "tokens": n_tok, "seconds": seconds, "tokens_per_s": n_tok / seconds,
            "tokens_per_cpu_s": n_tok / max(cpu_seconds, 1e-9), "step_s_median": statistics.median(per_step),
            "step_s_min": min(per_step), "step_s_max": max(per_step), "others_cores": [round(o, 2) for o in others],
            "quiet_steps": len(quiet), "quiet_tokens": sum(tokens[i] for i in quiet),
            "quiet_seconds": sum(t[i + 1] - t[i] for i in quiet),
            "rss_max_in_window": max(clock["rss"][warmup : last + 1]), "rss_min_in_window": min(clock["rss"][warmup : last + 1])}


def other_cpu_load(seconds: float = 2.0) -> float:
    """Cores kept busy by the whole machine over `seconds` (this process sleeps meanwhile): others' load."""
    b0, t0 = system_busy_s(), time.perf_counter()
    time.sleep(seconds)
    return (system_busy_s() - b0) / (time.perf_counter() - t0)


def wait_for_quiet(max_s: float, threads: int, spinner: str | None = None) -> dict:
    """Wait (up to max_s) until other processes leave torch's threads a core each; say how it went.
    With `spinner`, say so on the terminal meanwhile."""
    if spinner:
        with make_progress() as progress:
            progress.add_task(spinner, total=None)
            return wait_for_quiet(max_s, threads)
    t0 = time.perf_counter()
    load = other_cpu_load()
    while load >= free_cores_needed(threads) and time.perf_counter() - t0 < max_s:
        load = other_cpu_load()
    return {"waited_s": round(time.perf_counter() - t0, 1), "other_load_cores": round(load, 2),
            "quiet": load < free_cores_needed(threads)}


# --------------------------------------------------------------------------------------------------
# the same batches on both sides; the Trainer's side


def batch_order(n_examples: int, batch_size: int, seed: int, steps: int) -> list[list[int]]:
    """The example indices of every batch `training.batches.BatchStream` yields (rank 0 of 1), in order."""
    import numpy as np

    epoch, index, order, out = 0, 0, np.random.default_rng([seed, 0]).permutation(n_examples), []
    for _ in range(steps):
        picked = []
        while len(picked) < batch_size:
            if index >= len(order):
                epoch, index = epoch + 1, 0
                order = np.random.default_rng([seed, epoch]).permutation(n_examples)
            picked.append(int(order[index]))
            index += 1
        out.append(picked)
    return out


def batch_checksum(batch) -> list[int]:
    ids, mask = batch["input_ids"], batch["attention_mask"]
    w = 1 + (ids * mask).sum(dim=1).remainder(1_000_003)
    return [int((w * (1 + mask.sum(dim=1))).sum()), int(mask.sum()), int(ids.shape[1])]


def trainer_clock_callback(clock: StepClock):
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.tick()

    return Clock()


class DynamicPadCollator:
    """Right-pads input_ids / attention_mask with the pad id and labels with -100 to the batch's longest
    example (the usual dynamic padding), and records a checksum of every batch it builds."""

    def __init__(self, pad_id: int, checksums: list) -> None:
        self.pad_id, self.checksums = pad_id, checksums

    def __call__(self, features: list[dict]):
        import torch

        width = max(len(f["input_ids"]) for f in features)
        n = len(features)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        labels = torch.full((n, width), -100, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for row, f in enumerate(features):
            k = len(f["input_ids"])
            ids[row, :k] = torch.tensor(f["input_ids"])
            labels[row, :k] = torch.tensor(f["labels"])
            mask[row, :k] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        self.checksums.append(batch_checksum(batch))
        return batch


class ListDataset:
    """A map-style dataset over a list of dicts (a torch Dataset needs only __len__ / __getitem__)."""

    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def trainer_args(spec: dict, output_dir: str, cls=None, **extra):
    """TrainingArguments (or `cls`, a subclass such as TRL's DPOConfig, with its `extra` fields) matching the
    engine's optimizer, schedule and precision (bf16: CPU autocast, as the engine's); no eval, no saving, no
    reporting."""
    if cls is None:
        from transformers import TrainingArguments as cls

    return cls(
        output_dir=output_dir, per_device_train_batch_size=spec["batch_size"], gradient_accumulation_steps=1,
        max_steps=spec["steps"], learning_rate=spec["lr"], warmup_steps=spec["warmup_steps"],
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": spec["min_lr_ratio"]},
        weight_decay=spec["weight_decay"], adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=spec["grad_clip"],
        eval_strategy="no", save_strategy="no", logging_strategy="no", report_to=[], dataloader_num_workers=0,
        dataloader_pin_memory=False, train_sampling_strategy="sequential", seed=spec["seed"], data_seed=spec["seed"],
        disable_tqdm=True, use_cpu=True, remove_unused_columns=False, bf16=spec["precision"] == "bfloat16", **extra,
    )


def run_trainer(model, spec: dict, examples, pad_id: int, clock: StepClock, rss_imports: int, t0: float, prefix: str) -> dict:
    """`transformers.Trainer.train()` on `examples` in the engine's batches (a sequential sampler over their
    order, each batch padded to its longest example, a clock tick at every step end); what a baseline child
    reports: RSS, wall time since `t0`, its clock, tokens and batch checksums per step, how its optimizer ran."""
    from transformers import Trainer

    order = batch_order(len(examples), spec["batch_size"], spec["seed"], spec["steps"])
    rows = [{"input_ids": examples[i].input_ids.tolist(), "labels": examples[i].labels.tolist()} for b in order for i in b]
    checksums: list = []
    with tempfile.TemporaryDirectory(prefix=prefix) as out_dir:
        trainer = Trainer(model=model, args=trainer_args(spec, out_dir), train_dataset=ListDataset(rows),
                          data_collator=DynamicPadCollator(pad_id, checksums), callbacks=[trainer_clock_callback(clock)])
        trainer.train()
    wall = time.perf_counter() - t0
    opt = trainer.optimizer
    return {"rss_after_imports": rss_imports, "wall_s": wall, "peak_rss_train": peak_rss_bytes(),
            "peak_rss_total": peak_rss_bytes(), "clock": clock.as_dict(),
            "tokens_per_step": [sum(len(examples[i].input_ids) for i in b) for b in order], "checksums": checksums,
            "optim": str(trainer.args.optim.value), "optimizer_class": type(getattr(opt, "optimizer", opt)).__name__,
            "optimizer_fused": bool(opt.param_groups[0].get("fused"))}


# --------------------------------------------------------------------------------------------------
# our side: the engine's loop, instrumented from outside (nothing in training/ is edited)


def hook_engine(clock: StepClock, checksums: list, export_peak: dict) -> None:
    """Instrument the engine from outside (nothing in training/ is edited): a step-end tick on every
    metrics row, a checksum of every training batch, and the peak RSS just before the final export."""
    from training import batches, loop, setup

    write = setup.MetricsLog.write

    def timed_write(self, row):
        clock.tick()
        return write(self, row)

    nxt = batches.BatchStream.next

    def summed_next(self):
        batch = nxt(self)
        checksums.append(batch_checksum(batch))
        return batch

    export = loop.export_model

    def measured_export(*a, **kw):
        export_peak.setdefault("before_export", peak_rss_bytes())
        export_peak.setdefault("t_export", time.perf_counter())
        return export(*a, **kw)

    setup.MetricsLog.write = timed_write
    batches.BatchStream.next = summed_next
    loop.export_model = measured_export
    record_optimizer(export_peak)


def record_optimizer(out: dict) -> None:
    """Note the class and fused / foreach flags of the first optimizer that steps (a global torch hook)."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    def pre_hook(optimizer, args, kwargs):
        if "optimizer" not in out:
            group = optimizer.param_groups[0]
            out["optimizer"] = {"class": type(optimizer).__name__, "fused": group.get("fused"), "foreach": group.get("foreach")}

    register_optimizer_step_pre_hook(pre_hook)


def fresh_run(workspace: Path, run_id: str, tokenizer_dir: str | None = None):
    """Run `run_id` of `workspace` emptied of what an earlier bench left there; with `tokenizer_dir`, that
    tokenizer is placed in the run first, so that the engine's prepare_run reuses it instead of training one."""
    from training.runs import Run

    run = Run(workspace, run_id)
    shutil.rmtree(run.dir, ignore_errors=True)
    if tokenizer_dir:
        shutil.copytree(tokenizer_dir, run.tokenizer_dir)
    return run


def run_ours(spec: dict, plan, profile: bool = False) -> dict:
    """`training.loop.train(plan)` instrumented from outside; with `profile`, profiled instead of timed."""
    import torch  # noqa: F401  (imports before the RSS reading, as the Trainer child does)
    import transformers  # noqa: F401

    from training.loop import train

    rss_imports = rss_bytes()
    workspace = Path(spec["workspace"])
    run = fresh_run(workspace, spec["run_id"], spec.get("tokenizer_dir"))
    prof: dict = {}
    clock, checksums, export_peak = StepClock(), [], {}
    if profile:
        install_step_profiler(spec["profile_start"], spec["profile_steps"], prof)
    else:
        hook_engine(clock, checksums, export_peak)
    t0 = time.perf_counter()
    result = train(plan, workspace, spec["run_id"], show_progress=False)
    wall = time.perf_counter() - t0
    rows = run.metrics_rows()
    shutil.rmtree(run.dir, ignore_errors=True)
    from training import loop, objective as objectives

    objective = ("NextTokenLoss: output layer fused with the loss in chunks, on supervised positions only"
                 if hasattr(objectives, "chunked_linear_cross_entropy") else
                 "NextTokenLoss: output layer and loss on supervised positions only" if hasattr(loop, "NextTokenLoss")
                 else "model(**batch).loss: output layer on every position")
    out = {"rss_after_imports": rss_imports, "wall_s": wall, "peak_rss_total": peak_rss_bytes(), "objective": objective,
           "result": result.model_dump(mode="json"), "engine_tokens_per_s": [r["tokens_per_s"] for r in rows],
           "loss": [r["loss"] for r in rows]}
    if profile:
        functions = cprofile_rows(prof.pop("_cprof"))
        secs, ts = prof.get("cprofile_seconds"), prof.get("torch_profile_seconds")
        # the shares the section shows, kept with the seconds they come from
        split = [{**r, "share": r["seconds"] / secs} if secs else r for r in step_split(functions)]
        ops = [{**r, "share_of_wall": r["self_cpu_s"] / max(ts or 0, 1e-9)} for r in prof.get("torch_ops", [])]
        out["profile"] = {**top_functions(functions), "split": split, "steps": spec["profile_steps"],
                          "cprofile_seconds": secs, "cprofile_cpu_util": prof.get("cprofile_cpu_util"),
                          "torch_profile_seconds": ts, "torch_ops": ops}
        return out
    tokens = [rows[0]["tokens"]] + [b["tokens"] - a["tokens"] for a, b in itertools.pairwise(rows)]
    out.update(clock=clock.as_dict(), tokens_per_step=tokens, checksums=checksums,
               peak_rss_train=export_peak.get("before_export", peak_rss_bytes()), optimizer=export_peak.get("optimizer"))
    return out


# --------------------------------------------------------------------------------------------------
# profiles


def cprofile_rows(profiler: cProfile.Profile) -> list[dict]:
    """Every function of a cProfile run: where (the engine's files relative to the repository), calls, own and
    cumulative seconds, whether it is the engine's (training/), and its file and name."""
    stats = pstats.Stats(profiler, stream=io.StringIO())
    rows = []
    for (file, line, name), (cc, nc, tt, ct, _) in stats.stats.items():
        engine = file.startswith(str(ROOT / "training"))
        where = file.replace(str(ROOT) + "/", "") if engine else short_path(file)
        rows.append({"function": f"{where}:{line}({name})" if line else name, "calls": nc, "tottime": tt,
                     "cumtime": ct, "engine": engine, "file": file, "name": name})
    return rows


def top_functions(rows: list[dict], top: int = 15, fields: tuple[str, ...] = ("function", "calls", "tottime", "cumtime")) -> dict:
    """Top functions by own time; the engine's own functions (training/) by cumulative time."""
    by_own = sorted(rows, key=lambda r: -r["tottime"])[:top]
    by_cum = sorted((r for r in rows if r["engine"]), key=lambda r: -r["cumtime"])[:top]
    keep = lambda rs: [{k: r[k] for k in fields} for r in rs]
    return {"by_own_time": keep(by_own), "engine_by_cumulative_time": keep(by_cum)}


def short_path(file: str) -> str:
    m = re.search(r"site-packages/(.+)$", file)
    return m.group(1) if m else Path(file).name


# (label, file suffix, function name): cumulative time of these entry points inside the profiled steps
SPLIT = [
    ("forward (model call, incl. loss)", "torch/nn/modules/module.py", "_wrapped_call_impl"),
    ("backward (loss.backward)", "torch/_tensor.py", "backward"),
    ("optimizer.step (AdamW)", "torch/optim/optimizer.py", "wrapper"),
    ("clip_grad_norm_", "torch/nn/utils/clip_grad.py", "_no_grad_wrapper"),
    ("batch (BatchStream.next + collate)", "training/batches.py", "next"),
    ("optimizer.zero_grad", "torch/optim/optimizer.py", "zero_grad"),
    ("metrics row + progress", "training/setup.py", "write"),
]


def step_split(rows: list[dict]) -> list[dict]:
    out = []
    for label, suffix, name in SPLIT:
        hits = [r for r in rows if r["file"].endswith(suffix) and r["name"] == name]
        if hits:
            out.append({"part": label, "seconds": max(r["cumtime"] for r in hits)})
    return out


def torch_op_rows(prof, top: int = 15) -> list[dict]:
    rows = []
    for e in prof.key_averages():
        rows.append({"op": e.key, "calls": e.count, "self_cpu_s": e.self_cpu_time_total / 1e6,
                     "cpu_s": e.cpu_time_total / 1e6})
    return sorted(rows, key=lambda r: -r["self_cpu_s"])[:top]


def install_step_profiler(start_step: int, n_steps: int, out: dict) -> None:
    """Profile steps start_step+1 .. start_step+n with cProfile, then the next n with the torch profiler,
    switching at step ends (hooked on the engine's metrics row, as the timed runs are)."""
    import torch

    from training import setup

    write = setup.MetricsLog.write
    state = {"cprof": cProfile.Profile(), "tprof": None}

    def profiled_write(self, row):
        step = row["step"]
        if step == start_step + n_steps:
            state["cprof"].disable()
            out["cprofile_seconds"] = time.perf_counter() - out["t_cprofile"]
            out["cprofile_cpu_util"] = (time.process_time() - out["cpu_cprofile"]) / out["cprofile_seconds"]
        if step == start_step + 2 * n_steps and state["tprof"] is not None:
            state["tprof"].__exit__(None, None, None)
            out["torch_profile_seconds"] = time.perf_counter() - out["t_torch"]
            out["torch_ops"] = torch_op_rows(state["tprof"])
            state["tprof"] = None
        result = write(self, row)
        if step == start_step:
            out["t_cprofile"], out["cpu_cprofile"] = time.perf_counter(), time.process_time()
            state["cprof"].enable()
        if step == start_step + n_steps:
            state["tprof"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            state["tprof"].__enter__()
            out["t_torch"] = time.perf_counter()
        return result

    setup.MetricsLog.write = profiled_write
    out["_cprof"] = state["cprof"]


def profile_parts(prof: dict) -> tuple[float, dict]:
    return prof["cprofile_seconds"], {r["part"]: r["seconds"] for r in prof["split"]}


def render_profile(prof: dict | None, what: str, threads: int | None = None) -> list[str]:
    if not prof:
        return []
    lines = []
    util = prof.get("cprofile_cpu_util")
    if threads and threads > 1 and util is not None and util < 0.9 * threads:
        lines += [(f"Note: the profiled run was contended (CPU time / wall {util:.2f} with {threads} threads: another process held "
                  "a core), so its steps are slower than the timed ones and the elementwise operators' shares are inflated "
                  "more than the matmuls'; read the shares as approximate."), ""]
    n, secs = prof["steps"], prof.get("cprofile_seconds")
    if prof.get("split"):
        util = prof.get("cprofile_cpu_util")
        lines += [(f"### Where one of our {what} steps goes (cProfile over {n} steady steps, {secs:.1f} s under the profiler, "
                  f"CPU time / wall {util:.2f})"), "",
                  "| part | s per step | share |", "|---|---|---|"]
        for r in prof["split"]:
            lines.append(f"| {r['part']} | {r['seconds_per_step']:.3f} | {100 * r['seconds'] / secs:.0f}% |")
        lines.append("")
    if prof.get("torch_ops"):
        ts = prof.get("torch_profile_seconds", 0.0)
        lines += [f"### Top operators in our {what} steps (torch profiler over the next {n} steps, {ts:.1f} s, own CPU time)", "",
                  "| operator | calls | own s per step | share of wall |", "|---|---|---|---|"]
        for r in prof["torch_ops"][:12]:
            lines.append(f"| `{r['op']}` | {fmt(r['calls'])} | {r['self_cpu_s_per_step']:.3f} | {100 * r['self_cpu_s'] / max(ts, 1e-9):.0f}% |")
        lines.append("")
    if prof.get("by_own_time"):
        lines += ["### Python functions by own time (same cProfile window)", "", "| function | calls | own s | cum s |", "|---|---|---|---|"]
        lines += [f"| `{r['function']}` | {fmt(r['calls'])} | {r['tottime']:.2f} | {r['cumtime']:.2f} |" for r in prof["by_own_time"][:10]]
        lines.append("")
    return lines


# --------------------------------------------------------------------------------------------------
# child processes: the script itself, `--child KIND --spec FILE --result FILE`


def run_child(script: Path, kind: str, spec: dict, spinner: str) -> dict:
    """Run `script --child kind` in a fresh interpreter; return the JSON it wrote."""
    with tempfile.TemporaryDirectory(prefix="bench_child_") as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "answer.json"
        spec_path.write_text(json.dumps(spec), encoding="utf-8")
        cmd = [sys.executable, str(script), "--child", kind, "--spec", str(spec_path), "--result", str(result_path)]
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error",
                   HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore", **spec.get("env", {}))
        if spec.get("threads"):
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(spec["threads"])
        with make_progress() as progress:
            progress.add_task(spinner, total=None)
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not result_path.exists():
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
            raise SystemExit(f"child {kind} failed (exit {proc.returncode})")
        return json.loads(result_path.read_text(encoding="utf-8"))


def child_main(args, children: dict[str, Callable[[dict], dict]]) -> None:
    """In a child: set its threads from the spec, run `children[args.child]` on it and write what it returns."""
    spec = json.loads(Path(args.spec).read_text(encoding="utf-8"))
    set_threads(spec)
    Path(args.result).write_text(json.dumps(children[args.child](spec)), encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# ours vs the baseline: interleaved runs, their comparison and report


@dataclass
class Comparison:
    """What bench_train.py and bench_lora.py each bring to the shared runs and report."""

    name: str  # the script, e.g. "bench_train": its section of RESULTS.md
    title: str  # of the terminal table
    what: str  # the kind of step, in the profile's headings ("pretraining", "LoRA")
    heading: str  # of the section
    intro: Callable[[dict, Path], str]  # (workload, JSON path shown) -> how the section was generated
    report_rows: Callable[[dict], list]
    analyse: Callable[[dict], list[str]]
    summary: Callable[[dict], list[dict]]  # the rows of `make bench`'s table: target, figure, met

    def start(self, p: argparse.ArgumentParser, argv, prep: Callable, ours: Callable, baseline: Callable):
        """Parse the command line. In a child (`prep`, `ours`, `baseline` or a profiled `ours`), or with
        --render-only, do that and return None; else check the steps, keep to the target's cores, make the
        workspace and return the arguments."""
        args = p.parse_args(argv)
        if args.child:
            child_main(args, {"prep": prep, "ours": ours, "baseline": baseline, "profile": lambda s: ours(s, profile=True)})
            return None
        if args.render_only:
            self.render_only(args)
            return None
        if args.quick:
            args.steps, args.warmup, args.repeats, args.no_profile = 8, 2, 1, True
        if args.steps - 1 - args.warmup < 3:
            p.error("--steps must leave at least 3 timed steps after --warmup (and the last step)")
        limit_cores()
        begin(args.allow_dirty)
        args.workspace.mkdir(parents=True, exist_ok=True)
        return args

    def section(self, res: dict, json_path: Path) -> list[str]:
        """The section's lines: heading, how it was generated, the contention note, the tables, the analysis and the profile."""
        lines = ["", self.heading, "", self.intro(res["workload"], shown_path(json_path)), "", CONTENTION_NOTE, ""]
        lines += render_tables(self.report_rows(res))
        lines += analysis_lines(res)
        lines += render_profile(res.get("profile"), self.what, res["workload"].get("threads"))
        return lines

    def publish(self, res: dict, args) -> None:
        """Regenerate the script's section of `--results-md` from `res` and print the tables."""
        write_section(self.name, self.section(res, args.out), args.results_md)
        print_report(self.title, self.report_rows(res), res.get("profile"), self.what)

    def render_only(self, args) -> None:
        """The report again from `--out`, without running: the wording follows the code; the figures come from the JSON."""
        res = load_json(args.out)
        recompute(res)
        if res.get("profile"):
            per_step(res["profile"])
        res["analysis"] = self.analyse(res)
        # the figures keep the provenance of the run that measured them; the wording records the commit that wrote it
        commit, dirty = tree_state()
        res["rendered"] = {"commit": commit, "dirty": dirty, "by": "--render-only"}
        write_json(args.out, res)
        self.publish(res, args)

    def finish(self, res: dict, runs: dict, args, console) -> None:
        """The analysis, the raw runs (less their checksums) and the load at the end into `res`; `--out`, the report."""
        for kind in ("ours", "baseline"):
            for r in runs[kind]:
                r.pop("checksums", None)
        res["raw"] = runs  # before the analysis, which reads how ours ran (its result.json) from it
        res["analysis"] = self.analyse(res)
        res["summary"] = self.summary(res)
        res["machine"]["loadavg_end"] = os.getloadavg()[0]
        write_json(args.out, res)
        self.publish(res, args)
        console.print(f"figures: {args.out}   report: {args.results_md}")


def curate(source: str, workspace: Path, label: str, **settings) -> str:
    """Curate `source` into `workspace` (a spinner meanwhile); the dataset's fingerprint."""
    from training.data import curate_to_workspace

    with make_progress() as progress:
        progress.add_task(f"curating {label}", total=None)
        return curate_to_workspace(source, workspace, **settings).summary.fingerprint


LORA_BASE = "smollm2-135m-instruct"  # bench_lora and bench_dpo: the embedded base, its attention projections adapted
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def default_dropout() -> float:
    from training.contracts import LoraSettings

    return LoraSettings().dropout


def spec_lora_plan(spec: dict, **extra):
    """The engine's LoRA plan for a comparison child's `spec` (bench_lora; bench_dpo adds objective and beta)."""
    from training.contracts import Budget, LoraSettings, TrainPlan

    return TrainPlan(task="finetune", dataset=spec["dataset"], base_model=LORA_BASE, method="lora",
                     lora=LoraSettings(rank=spec["rank"], alpha=spec["alpha"], dropout=spec["lora_dropout"],
                                       target_modules=LORA_TARGETS),
                     seq_len=spec["seq_len"], batch_size=spec["batch_size"], budget=Budget(steps=spec["steps"]),
                     eval_every=10**6, checkpoint_every=10**6, lr=spec["lr"], warmup_steps=spec["warmup_steps"],
                     seed=spec["seed"], weight_decay=spec["weight_decay"], grad_clip=spec["grad_clip"],
                     min_lr_ratio=spec["min_lr_ratio"], device="cpu", precision=spec["precision"], **extra)


def faq_lora_plan(workspace: Path, steps: int, **change):
    """The engine run that bench_precision.py and bench_checkpointing.py each vary one setting of (`change`): LoRA
    rank 8 on the embedded SmolLM2-135M-Instruct over the example FAQ pairs (curated into `workspace`), batch 8,
    seq_len cap 256, `steps` steps on the CPU in float32, validated and checkpointed only at the end unless `change`
    says otherwise."""
    from training.contracts import Budget, LoraSettings, TrainPlan

    fp = curate(str(ROOT / "examples" / "data" / "support_faq.jsonl"), workspace, "the FAQ pairs")
    settings = dict(task="finetune", dataset=fp, base_model=LORA_BASE, method="lora",
                    lora=LoraSettings(rank=8, alpha=16), lr=2e-4, batch_size=8, seq_len=256, warmup_steps=2,
                    budget=Budget(steps=steps), eval_every=steps, eval_batches=1, checkpoint_every=steps, device="cpu",
                    precision="float32")
    return TrainPlan(**(settings | change))


def run_curve(workspace: Path, run_id: str, steps: int) -> dict:
    """A run's loss at each step and its tokens/s: the median of the engine's per-step figure over steps 3 ..
    steps-1 (the first two warm up; the last is followed by validation)."""
    from training.runs import Run

    rows = Run(workspace, run_id).metrics_rows()
    return {"losses": {r["step"]: r["loss"] for r in rows},
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows if 3 <= r["step"] < steps)}


def resolved_precision(asked: str) -> str:
    """The precision a CPU run of the engine uses for `asked` (auto: bfloat16 where the CPU multiplies it natively);
    the baseline is then run in the same one."""
    import torch

    from training.objective import precision_name

    return precision_name(torch.device("cpu"), asked)


def comparison_parser(doc: str, out: Path, steps: int, warmup: int, repeats: int, profile_steps: int) -> argparse.ArgumentParser:
    """The options of bench_train.py and bench_lora.py (each adds its own), with their defaults."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=steps, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=warmup, help="leading steps left out of the steady-state figure")
    p.add_argument("--repeats", type=int, default=repeats, help="runs per side, interleaved")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--profile-steps", type=int, default=profile_steps, help="steps profiled (cProfile, then as many torch profiler)")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--threads", type=int, default=TARGET_CORES, help="torch threads in every run (default: the target's 2 cores)")
    p.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="both sides' matmuls (auto: what the engine picks on this CPU; bf16 is autocast on both sides)")
    p.add_argument("--quiet-wait-s", type=float, default=45.0, help="before each run, wait up to this long for idle cores")
    p.add_argument("--workspace", type=Path, default=DEFAULT_WORKSPACE)
    p.add_argument("--out", type=Path, default=out)
    p.add_argument("--results-md", type=Path, default=RESULTS_MD)
    p.add_argument("--render-only", action="store_true", help="regenerate the report from --out without running")
    p.add_argument("--quick", action="store_true", help="8 steps, 1 run per side, no profile; figures under bench/quick/")
    p.add_argument("--allow-dirty", action="store_true",
                   help="measure on a tree with uncommitted changes (the JSON and the section then say so)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p


def summarise_runs(runs: list[dict], warmup: int, last: int, threads: int) -> dict:
    """Per-run steady figures, their medians, and the uncontended steps of all runs pooled."""
    per = [steady(r["clock"], r["tokens_per_step"], warmup, last, threads) for r in runs]
    quiet_steps = sum(p["quiet_steps"] for p in per)
    quiet_seconds = sum(p["quiet_seconds"] for p in per)
    return {"runs": per,
            "tokens_per_s": statistics.median(p["tokens_per_s"] for p in per),
            "quiet_steps": quiet_steps, "timed_steps": sum(p["steps"] for p in per),
            "quiet_tokens_per_s": sum(p["quiet_tokens"] for p in per) / quiet_seconds if quiet_steps else None,
            "tokens_per_cpu_s": statistics.median(p["tokens_per_cpu_s"] for p in per),
            "step_s_median": statistics.median(p["step_s_median"] for p in per),
            "peak_rss_train": statistics.median(r["clock"]["peak"][last] for r in runs),
            "peak_rss_before_export": statistics.median(r["peak_rss_train"] for r in runs),
            "rss_step_end_min": statistics.median(p["rss_min_in_window"] for p in per),
            "rss_step_end_max": statistics.median(p["rss_max_in_window"] for p in per),
            "peak_rss_total": statistics.median(r["peak_rss_total"] for r in runs),
            "rss_after_imports": statistics.median(r["rss_after_imports"] for r in runs),
            "first_step_end_s": statistics.median(r["clock"]["t"][1] - r["clock"]["t"][0] for r in runs),
            "wall_s": statistics.median(r["wall_s"] for r in runs),
            "quiet_waits": [r.get("quiet_wait") for r in runs]}


def speed_verdict(o: dict, b: dict, min_quiet: int) -> dict:
    """The ratio the target is judged on: uncontended steps when both sides have enough, else all steps."""
    if o["quiet_steps"] >= min_quiet and b["quiet_steps"] >= min_quiet:
        return {"basis": "uncontended steps", "ours": o["quiet_tokens_per_s"], "baseline": b["quiet_tokens_per_s"],
                "ratio": o["quiet_tokens_per_s"] / b["quiet_tokens_per_s"]}
    return {"basis": "all timed steps (too few uncontended steps: other processes were using the cores)",
            "ours": o["tokens_per_s"], "baseline": b["tokens_per_s"], "ratio": o["tokens_per_s"] / b["tokens_per_s"]}


def interleaved(repeats: int) -> list[tuple[int, str]]:
    """ours, Trainer | Trainer, ours | ...: each side runs first as often as the other."""
    out = []
    for rep in range(repeats):
        pair = ["ours", "baseline"] if rep % 2 == 0 else ["baseline", "ours"]
        out += [(rep, k) for k in pair]
    return out


def run_pairs(script: Path, spec: dict, repeats: int, label_ours: str, label_base: str, what: str, quiet_wait_s: float,
              warmup: int, last: int, threads: int, console, run_prefix: str) -> dict[str, list]:
    """The interleaved runs of both sides, each after waiting (a bounded time) for the cores to be quiet."""
    runs: dict[str, list] = {"ours": [], "baseline": []}
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for rep, kind in interleaved(repeats):
        label = label_ours if kind == "ours" else label_base
        quiet = wait_for_quiet(quiet_wait_s, threads, f"waiting up to {quiet_wait_s:g} s for other processes to leave the cores")
        r = run_child(script, kind, {**spec, "run_id": f"{run_prefix}-{stamp}-{rep}"},
                      f"{label}, run {rep + 1}/{repeats}: {what}")
        r["quiet_wait"] = quiet
        runs[kind].append(r)
        st = steady(r["clock"], r["tokens_per_step"], warmup, last, threads)
        console.print(f"{label} run {rep + 1}: {st['tokens_per_s']:,.0f} tokens/s over all timed steps "
                      f"({st['quiet_steps']}/{st['steps']} uncontended), peak RSS {r['peak_rss_train'] / MB:,.0f} MB "
                      f"[others' load before: {quiet['other_load_cores']:.2f} cores]")
    return runs


def profiled_run(script: Path, spec: dict, start: int, steps: int, quiet_wait_s: float, run_prefix: str) -> dict:
    """A run of ours profiled (not timed) over `steps` steady steps after step `start`, once the cores are quiet."""
    prof_spec = {**spec, "run_id": f"{run_prefix}-profile-{os.getpid()}", "steps": start + 2 * steps + 1,
                 "profile_start": start, "profile_steps": steps}
    wait_for_quiet(quiet_wait_s, spec["threads"], "waiting for idle cores before the profiled run")
    prof = run_child(script, "profile", prof_spec, f"profiled run of ours ({prof_spec['steps']} steps, not timed)")["profile"]
    per_step(prof)
    return prof


def per_step(prof: dict) -> None:
    """The profile's figures per step, as the section shows them (stored, so the JSON holds every figure shown)."""
    n = prof["steps"]
    for r in prof.get("split", []):
        r["seconds_per_step"] = round(r["seconds"] / n, 3)
    for r in prof.get("torch_ops", []):
        r["self_cpu_s_per_step"] = round(r["self_cpu_s"] / n, 3)


def compare(runs: dict[str, list], warmup: int, last: int, threads: int, min_quiet: int, identical: bool | None = None) -> dict:
    """ours vs baseline: steady figures per side, the ratios, and the basis the speed target is judged on.

    Peak RSS is compared at the end of step `last` (the last timed step): both sides have then run the
    same training steps, and ours has not yet validated, checkpointed or exported."""
    o = summarise_runs(runs["ours"], warmup, last, threads)
    b = summarise_runs(runs["baseline"], warmup, last, threads)
    if identical is None:  # checksums are dropped from the stored JSON once compared
        ref = runs["ours"][0]["checksums"][:last]
        identical = all(r["checksums"][:last] == ref for r in runs["ours"] + runs["baseline"])
    return {"ours": o, "last": last, "baseline": b, "speed": speed_verdict(o, b, min_quiet),
            "speed_ratio_all_steps": o["tokens_per_s"] / b["tokens_per_s"],
            "pair_speed_ratios": [po["tokens_per_s"] / pb["tokens_per_s"] for po, pb in zip(o["runs"], b["runs"])],
            "memory_ratio": o["peak_rss_train"] / b["peak_rss_train"],
            "identical_batches": identical,
            "engine_reported_tokens_per_s": statistics.median(x for r in runs["ours"] for x in r["engine_tokens_per_s"][warmup:last])}


def record_comparison(res: dict, runs: dict[str, list], warmup: int, last: int, threads: int) -> None:
    """The comparison of the timed runs, and how each side's optimizer and loss ran, into `res`."""
    res["comparison"] = compare(runs, warmup, last, threads, min_quiet=min_quiet(warmup, last))
    base = runs["baseline"][0]
    res["baseline_optim"] = f"{base['optim']} ({base['optimizer_class']}, fused={base['optimizer_fused']})"
    res["ours_optimizer"] = runs["ours"][0].get("optimizer")
    res["ours_objective"] = runs["ours"][0].get("objective")


def recompute(res: dict) -> None:
    """Re-derive the comparison from the raw per-step figures kept in the JSON (after a change of definitions)."""
    w = res["workload"]
    last = w["steps"] - 1
    res["comparison"] = compare(res["raw"], w["warmup"], last, w["threads"], min_quiet=min_quiet(w["warmup"], last),
                                identical=res["comparison"]["identical_batches"])


def throughput_rows(c: dict, base_name: str) -> list[tuple[str, str]]:
    o, b, sp = c["ours"], c["baseline"], c["speed"]
    q = lambda d: f"{fmt(d['quiet_tokens_per_s'], 0)} ({d['quiet_steps']} of {d['timed_steps']} steps)" if d["quiet_tokens_per_s"] else f"none of {d['timed_steps']} steps"
    return [
        ("ours: tokens/s, uncontended steps pooled", q(o)),
        (f"{base_name}: tokens/s, uncontended steps pooled", q(b)),
        ("ours: tokens/s, all timed steps (median of runs)", f"{fmt(o['tokens_per_s'], 0)}  (runs: {', '.join(fmt(r['tokens_per_s'], 0) for r in o['runs'])})"),
        (f"{base_name}: tokens/s, all timed steps (median of runs)", f"{fmt(b['tokens_per_s'], 0)}  (runs: {', '.join(fmt(r['tokens_per_s'], 0) for r in b['runs'])})"),
        (f"ours / {base_name} tokens/s, all timed steps", f"{c['speed_ratio_all_steps']:.2f}x  (per pair of runs: {', '.join(f'{x:.2f}' for x in c['pair_speed_ratios'])})"),
        (f"ours / {base_name} tokens/s, judged on {sp['basis']}", f"**{sp['ratio']:.2f}x**"),
        (f"median step time: ours / {base_name}", f"{o['step_s_median']:.3f} s / {b['step_s_median']:.3f} s"),
        (f"tokens per CPU-second: ours / {base_name}", f"{fmt(o['tokens_per_cpu_s'], 0)} / {fmt(b['tokens_per_cpu_s'], 0)} ({o['tokens_per_cpu_s'] / b['tokens_per_cpu_s']:.2f}x)"),
        ("ours: the engine's own figure (median of metrics.jsonl tokens_per_s, same steps)", fmt(c["engine_reported_tokens_per_s"], 0)),
        ("other processes' load before each run (cores busy; waited s)", "; ".join(
            f"{k}: " + ", ".join(f"{w['other_load_cores']:.2f} ({w['waited_s']:.0f} s)" for w in d["quiet_waits"] if w)
            for k, d in (("ours", o), (base_name, b)))),
    ]


def memory_rows(c: dict, base_name: str, base_end: str) -> list[tuple[str, str]]:
    o, b = c["ours"], c["baseline"]
    return [
        (f"peak RSS through step {c.get('last', '')} (the last timed step; both sides have run the same steps): ours / {base_name}",
         f"{fmt(o['peak_rss_train'] / MB)} MB / {fmt(b['peak_rss_train'] / MB)} MB (**{c['memory_ratio']:.2f}x**)"),
        (f"RSS at the end of the timed steps, min-max: ours / {base_name}",
         f"{fmt(o['rss_step_end_min'] / MB)}-{fmt(o['rss_step_end_max'] / MB)} MB / {fmt(b['rss_step_end_min'] / MB)}-{fmt(b['rss_step_end_max'] / MB)} MB"),
        (f"RSS after imports: ours / {base_name}", f"{fmt(o['rss_after_imports'] / MB)} MB / {fmt(b['rss_after_imports'] / MB)} MB"),
        (f"ours: peak RSS with the last step, its validation and the final checkpoint (before export) / {base_name}: after train()",
         f"{fmt(o['peak_rss_before_export'] / MB)} MB / {fmt(b['peak_rss_before_export'] / MB)} MB"),
        ("ours: peak RSS of the whole run (final validation, checkpoint, export included)", f"{fmt(o['peak_rss_total'] / MB)} MB"),
        (f"start to end of step 1: ours / {base_name} (data, model, first step)", f"{o['first_step_end_s']:.1f} s / {b['first_step_end_s']:.1f} s"),
        (f"whole run: ours (incl. validation, checkpoint, export) / {base_name} ({base_end})", f"{o['wall_s']:.1f} s / {b['wall_s']:.1f} s"),
    ]


def speed_target_row(c: dict, target: float, base_name: str, threads: int) -> tuple[str, str]:
    r = c["speed"]["ratio"]
    short = "" if r >= target else f" (short by {100 * (1 - r / target):.0f}% of the target: {target / r:.2f}x more speed needed)"
    return (f"tokens/s >= {target}x the {base_name}'s on CPU ({TARGET_CORES} cores, {threads} torch thread{'s' if threads > 1 else ''} per run)",
            f"{r:.2f}x -> {verdict(r >= target)}{short}")


def workload_rows(res: dict, base_name: str) -> list[tuple[str, str]]:
    """The rows that end both benches' Workload table: steps, runs, optimizer, loss, batches, threads."""
    w, c = res["workload"], res["comparison"]
    return [
        ("steps per run / timed steps", f"{w['steps']} / {w['warmup'] + 1}-{w['steps'] - 1} (first {w['warmup']} are warm-up; the last is left out)"),
        ("runs per side (interleaved)", str(w["repeats"])),
        ("optimizer", f"AdamW betas ({w['betas'][0]}, {w['betas'][1]}), wd {w['weight_decay']}, clip {w['grad_clip']}, lr {w['lr']}, warmup {w['warmup_steps']}, cosine to {w['min_lr_ratio']:g}x"),
        (f"optimizer implementation: ours / {base_name}", f"{ours_optimizer(res)} / {res['baseline_optim']}"),
        (f"loss: ours / {base_name}", f"{ours_objective(res)} / model(**inputs) (output layer on every position)"),
        ("identical batches (checksums of every batch)", "yes" if c["identical_batches"] else "NO"),
        ("torch threads", str(w["threads"])),
        ("precision (both sides)", "bfloat16 autocast, float32 weights" if w.get("precision") == "bfloat16" else "float32"),
    ]


def speed_missed(res: dict, target: float, base_name: str, what: str = "Target") -> list[str]:
    """The sentence saying by how much the speed target was missed (none when met)."""
    c = res["comparison"]
    r = c["speed"]["ratio"]
    if r >= target:
        return []
    return [(f"{what} missed: ours runs at {r:.2f}x the {base_name}'s tokens/s ({c['speed']['basis']}) against "
             f"{target}x: short by {100 * (1 - r / target):.0f}% of the target "
             f"({fmt(c['speed']['ours'], 0)} tokens/s vs the {fmt(target * c['speed']['baseline'], 0)} needed).")]


def ours_optimizer(res: dict) -> str:
    """How our AdamW ran (recorded by a hook; runs from before the hook existed used fused=False on CPU)."""
    o = res.get("ours_optimizer")
    if not o:
        return "AdamW (fused=False on CPU: the single-tensor path)"
    path = "fused" if o["fused"] else ("foreach" if o["foreach"] else "single-tensor path")
    return f"{o['class']} (fused={o['fused']}, foreach={o['foreach']}: {path})"


def ours_attention(res: dict) -> str:
    """The words for the attention ours trained with, from its runs' result.json (older runs: SDPA, as both sides)."""
    ran = {(r.get("result") or {}).get("attention") for r in (res.get("raw") or {}).get("ours", [])}
    if "modelcrew_lean" in ran:
        return ("ours swaps transformers' attention for `training/attention.py`'s on the CPU (eager's matmuls and float32 "
                "softmax, keeping only the query, keys, values and probabilities for backward), the baseline runs "
                "transformers' default SDPA kernel")
    return "both run transformers' default SDPA attention"


def ours_objective(res: dict) -> str:
    """How our loss was computed (recorded; for older JSON, told by the profile: training/objective.py ran or not)."""
    if res.get("ours_objective"):
        return res["ours_objective"]
    ran = [r["function"] for r in (res.get("profile") or {}).get("engine_by_cumulative_time", [])]
    if any(f.startswith("training/objective.py") for f in ran):
        return "NextTokenLoss: output layer and loss on supervised positions only"
    return "model(**batch).loss: output layer on every position"


def ours_fused(res: dict) -> bool:
    return bool((res.get("ours_optimizer") or {}).get("fused"))


def analysis_lines(res: dict) -> list[str]:
    items = res.get("analysis", [])
    return (["### What bounds it", ""] + [f"- {t}" for t in items] + [""]) if items else []


CONTENTION_NOTE = (
    "This machine's 2 cores are shared with other work. When another process takes a core that one of torch's "
    "threads needs, the OpenMP threads wait on each other at every parallel region and a step gets several times "
    "slower. Every step therefore also records the machine's busy CPU time: a step is *uncontended* when the other "
    "processes used fewer cores during it than leave each torch thread a core of its own (under 0.3 cores with 2 threads, "
    "under 1.3 with 1). The speed target is judged on the uncontended steps of all runs pooled when each side has enough "
    "of them, else on all timed steps; the table names the basis.")


# --------------------------------------------------------------------------------------------------
# a stream of support tickets and a tiny model pretrained on them (bench_loop_memory.py): examples/tickets.py

from examples.tickets import ticket_base, ticket_rows, write_jsonl  # noqa: E402,F401  (shared with the tests)


# ---- one extra run of ours with another environment (a malloc setting), beside a comparison ---------------------


def variant_run(script: Path, spec: dict, env: dict, what: str, args, last: int, console, prefix: str, res: dict) -> dict:
    """One run of ours with `env` added to its environment, after the compared runs (`res["comparison"]`): its
    tokens/s (uncontended steps when there are enough) and peak RSS, and both as ratios to the compared runs', for
    the section's "ours with ..." rows (`variant_rows`)."""
    quiet = wait_for_quiet(args.quiet_wait_s, args.threads, "waiting for idle cores before the variant run")
    r = run_child(script, "ours", {**spec, "run_id": f"{prefix}-variant-{os.getpid()}", "env": env}, f"ours with {what}")
    st = steady(r["clock"], r["tokens_per_step"], args.warmup, last, args.threads)
    enough = st["quiet_steps"] >= min_quiet(args.warmup, last)
    v = {"env": env, "what": what, "peak_rss_train": r["peak_rss_train"], "peak_rss_last_step": r["clock"]["peak"][last],
         "peak_rss_total": r["peak_rss_total"], "rss_step_end_min": st["rss_min_in_window"],
         "rss_step_end_max": st["rss_max_in_window"], "quiet_wait": quiet, "steady": st,
         "tokens_per_s": st["quiet_tokens"] / st["quiet_seconds"] if enough else st["tokens_per_s"],
         "basis": "uncontended steps" if enough else "all timed steps"}
    c = res["comparison"]
    v["speed_vs_ours"] = v["tokens_per_s"] / c["ours"]["tokens_per_s"]
    v["peak_vs_baseline"] = variant_peak(v)[1] / c["baseline"]["peak_rss_train"]
    console.print(f"ours with {what}: {v['tokens_per_s']:,.0f} tokens/s, peak RSS {r['peak_rss_train'] / MB:,.0f} MB")
    return v


def variant_peak(v: dict) -> tuple[str, float]:
    """The variant's peak RSS at the end of the last timed step, or (older JSON) before its export."""
    if "peak_rss_last_step" in v:
        return "peak RSS through the last timed step", v["peak_rss_last_step"]
    return "peak RSS before export (the last step's validation included)", v["peak_rss_train"]


def variant_rows(res: dict, label: str, baseline: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """The section's rows for `res["variant"]` beside the compared runs: ours with `label`, against `baseline`'s
    peak and ours' tokens/s."""
    v = res.get("variant")
    if not v:
        return []
    b = res["comparison"]["baseline"]
    peak_label, peak = variant_peak(v)
    speed = f" / {v['speed_vs_ours']:.2f}x" if "speed_vs_ours" in v else ""  # older JSON: no ratio stored
    return [(f"Ours with {label} (one run; not used for the targets)", [
        ("tokens/s" + (" / vs ours' in the compared runs" if speed else ""),
         f"{fmt(v['tokens_per_s'], 0)}{speed} ({v['basis']}: {v['steady']['quiet_steps']} of {v['steady']['steps']} uncontended)"),
        (f"{peak_label} / vs {baseline}'s through the last timed step",
         f"{fmt(peak / MB)} MB / {v.get('peak_vs_baseline', peak / b['peak_rss_train']):.2f}x"),
        ("RSS at the end of the timed steps, min-max", f"{fmt(v['rss_step_end_min'] / MB)}-{fmt(v['rss_step_end_max'] / MB)} MB"),
        ("peak RSS of the whole run (export included)", f"{fmt(v['peak_rss_total'] / MB)} MB"),
    ])]
