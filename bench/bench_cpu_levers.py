"""Benchmark of two CPU levers the engine does not pull by default: `torch.compile` and glibc malloc settings.

    .venv/bin/python bench/bench_cpu_levers.py [--steps 10] [--repeats 1] [--workspace DIR] [--quick]

The engine's run (`python -m training train PLANFILE`, a fresh process per variant so its peak RSS is its own): LoRA
rank 8 on the embedded SmolLM2-135M-Instruct (dequantized from its Q4_1 GGUF) over the example FAQ pairs, batch 8,
seq_len cap 256, `precision: float32` pinned (so no lever mixes with bfloat16), the same seed and data:
- baseline: the plan as `common.faq_lora_plan` makes it;
- compile: the same plan with `compile: true` (`torch.compile` of the loss module; inductor's C++ kernels on a CPU);
- malloc arenas: the baseline's plan, the child's environment with MALLOC_ARENA_MAX=2;
- malloc arenas + thresholds: also MALLOC_TRIM_THRESHOLD_ and MALLOC_MMAP_THRESHOLD_ at 131072 bytes each (what
  `mallopt(M_TRIM_THRESHOLD / M_MMAP_THRESHOLD)` would set; glibc reads them at start).
Tokens/s: the median of the engine's per-step figure over steps 3 .. steps-1 (steps 1 and 2 warm up, and under
compile they compile; the last is followed by validation); compile's warm-up: its extra seconds over steps 1 and 2
against the baseline's, cold (each child gets an empty TORCHINDUCTOR_CACHE_DIR: no kernels cached by an
earlier run). Peak RSS: the child's own (`result.json`'s peak_memory_mb, its ru_maxrss, the export
included). Losses: the largest relative difference from the baseline's at any step. With --repeats N the variants
run N rounds in turn and each figure is the median of its N runs.
Decision rules the section applies: compile pays when it is >= 1.1x the baseline's tokens/s after its warm-up with
every step's loss within 1e-3 (relative) of the baseline's; a malloc setting pays when it cuts peak RSS by >= 10% at
>= 0.95x the baseline's tokens/s. The section says, for each, whether the engine should adopt it.
Writes bench/results/bench_cpu_levers.json and its section of bench/RESULTS.md (`--quick`: 5 steps, into
bench/quick/). Whole run: 6 to 7 minutes on 2 cores at the defaults, most of it compile's cold warm-up (about 3.5
minutes measured under load: inductor compiles at step 1 and again at step 2, when the batch's shape changes and it
recompiles with dynamic shapes); the other variants take under a minute each.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (DEFAULT_WORKSPACE, ROOT, faq_lora_plan, result_json, run_curve, stamp, stamp_rows, table, write_json,
                    write_section)
from common import parse

OUT = result_json("bench_cpu_levers")
COMPILE_SPEED, COMPILE_LOSS = 1.1, 1e-3
MALLOC_RSS_CUT, MALLOC_SPEED = 0.10, 0.95
THRESHOLD = 131072  # bytes: MALLOC_TRIM_THRESHOLD_ and MALLOC_MMAP_THRESHOLD_
WARMUP_STEPS = 2
QUICK_STEPS = 5
# variant: (what the section calls it, the plan's change, the child's extra environment)
VARIANTS = {
    "baseline": ("baseline", {}, {}),
    "compile": ("compile: true", {"compile": True}, {}),
    "malloc_arenas": ("MALLOC_ARENA_MAX=2", {}, {"MALLOC_ARENA_MAX": "2"}),
    "malloc_thresholds": (f"MALLOC_ARENA_MAX=2, trim and mmap thresholds {THRESHOLD}", {},
                          {"MALLOC_ARENA_MAX": "2", "MALLOC_TRIM_THRESHOLD_": str(THRESHOLD),
                           "MALLOC_MMAP_THRESHOLD_": str(THRESHOLD)}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="steps per run (>= 4)")
    ap.add_argument("--repeats", type=int, default=1, help="rounds of all the variants (figures: medians)")
    ap.add_argument("--workspace", type=Path, default=DEFAULT_WORKSPACE)
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_STEPS} steps per run (bench/quick/)")
    a = parse(ap)
    if a.quick:
        a.steps = QUICK_STEPS

    raw: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for rnd in range(a.repeats):
        for name, (label, change, env) in VARIANTS.items():
            print(f"round {rnd + 1}/{a.repeats}, {label}: {a.steps} steps ...", flush=True)
            raw[name].append(run_variant(a, name, change, env))
    variants = {name: summarise(runs) for name, runs in raw.items()}
    base = variants["baseline"]
    for name, v in variants.items():
        v["speed_ratio"] = v["tokens_per_s"] / base["tokens_per_s"]
        v["rss_ratio"] = v["peak_rss_mb"] / base["peak_rss_mb"]
        v["max_relative_loss_gap"] = max(abs(v["losses"][s] - base["losses"][s]) / base["losses"][s] for s in base["losses"])
        v["warmup_extra_s"] = v["warmup_s"] - base["warmup_s"]
    comp = variants["compile"]
    comp["pays"] = comp["speed_ratio"] >= COMPILE_SPEED and comp["max_relative_loss_gap"] <= COMPILE_LOSS
    for name in ("malloc_arenas", "malloc_thresholds"):
        v = variants[name]
        v["pays"] = v["rss_ratio"] <= 1 - MALLOC_RSS_CUT and v["speed_ratio"] >= MALLOC_SPEED
    out = {"steps": a.steps, "repeats": a.repeats, "warmup_steps": WARMUP_STEPS, "first_timed_step": WARMUP_STEPS + 1,
           "rank": 8, "batch": 8, "seq_len_cap": 256, "precision": "float32", "threshold_bytes": THRESHOLD,
           "malloc_arena_max": 2, "compile_speed": COMPILE_SPEED, "compile_loss": COMPILE_LOSS,
           "malloc_rss_cut": MALLOC_RSS_CUT, "malloc_speed": MALLOC_SPEED,
           "envs": {name: env for name, (_, _, env) in VARIANTS.items()}, "variants": variants, "raw": raw, **stamp()}
    out["summary"] = [
        {"target": f"torch.compile pays on this CPU (>= {COMPILE_SPEED}x tokens/s after warm-up, losses within "
                   f"{COMPILE_LOSS:g} relative)",
         "figure": f"{comp['speed_ratio']:.2f}x, warm-up +{comp['warmup_extra_s']:.0f} s, loss gap "
                   f"{comp['max_relative_loss_gap']:.1e}", "met": comp["pays"]},
        *({"target": f"{VARIANTS[name][0]} pays (peak RSS cut >= {MALLOC_RSS_CUT:.0%} at >= {MALLOC_SPEED}x tokens/s)",
           "figure": f"{variants[name]['rss_ratio']:.2f}x peak RSS at {variants[name]['speed_ratio']:.2f}x tokens/s",
           "met": variants[name]["pays"]} for name in ("malloc_arenas", "malloc_thresholds"))]
    write_json(OUT, out)
    lines = section(out, a)
    write_section("bench_cpu_levers", lines)
    print("\n".join(lines[5:-1]))


def run_variant(a, name: str, change: dict, env: dict) -> dict:
    """One run of the engine in a fresh process: its curve, step times, peak RSS and wall time."""
    from training.runs import Run

    run_id = f"levers-{name}-{int(time.time())}"
    plan = faq_lora_plan(a.workspace, a.steps, precision="float32", **change)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as scratch:
        plan_file = Path(scratch) / "bench-plan.json"
        plan_file.write_text(plan.model_dump_json(), encoding="utf-8")
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "training", "train", str(plan_file), "--workspace", str(a.workspace),
                               "--run-id", run_id, "--quiet"], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, **env, "TORCHINDUCTOR_CACHE_DIR": str(Path(scratch) / "inductor")})
        wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{name}: the run failed\n{done.stderr[-2000:]}")
    run = Run(a.workspace, run_id)
    rows = run.metrics_rows()
    step_s, before = {}, 0
    for r in rows:  # the engine logs cumulative tokens and each step's tokens/s
        step_s[r["step"]] = (r["tokens"] - before) / r["tokens_per_s"]
        before = r["tokens"]
    return {"run_id": run_id, "peak_rss_mb": run.result().peak_memory_mb, "wall_s": wall, "load_avg_before": load,
            "step_s": step_s, **run_curve(a.workspace, run_id, a.steps)}


def summarise(runs: list[dict]) -> dict:
    """The median over a variant's runs; losses are the first run's (the runs of a variant repeat the same steps)."""
    med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    steady = [max(s for k, s in r["step_s"].items() if WARMUP_STEPS < k < len(r["step_s"])) for r in runs]
    return {"tokens_per_s": med("tokens_per_s"), "peak_rss_mb": med("peak_rss_mb"), "wall_s": med("wall_s"),
            "warmup_s": statistics.median(sum(r["step_s"][k] for k in range(1, WARMUP_STEPS + 1)) for r in runs),
            "slowest_steady_step_s": statistics.median(steady), "losses": runs[0]["losses"]}


def section(out: dict, a) -> list[str]:
    v = out["variants"]
    base, comp = v["baseline"], v["compile"]
    yes = lambda met: "yes" if met else "no"  # noqa: E731
    rows = [*stamp_rows(out)]
    for name, (label, _, _) in VARIANTS.items():
        x = v[name]
        rows.append((f"{label}: tokens/s (x baseline) / peak RSS (x baseline)",
                     f"{x['tokens_per_s']:.0f} ({x['speed_ratio']:.2f}x) / {x['peak_rss_mb']:.0f} MB ({x['rss_ratio']:.2f}x)"))
    rows += [
        ("compile: warm-up, steps 1-2: compile / baseline (extra)",
         f"{comp['warmup_s']:.1f} s / {base['warmup_s']:.1f} s (+{comp['warmup_extra_s']:.1f} s)"),
        ("slowest step after warm-up: compile / baseline (a recompile shows here)",
         f"{comp['slowest_steady_step_s']:.2f} s / {base['slowest_steady_step_s']:.2f} s"),
        ("whole process (imports, load, steps, validation, export): " + " / ".join(l for l, _, _ in VARIANTS.values()),
         " / ".join(f"{v[n]['wall_s']:.0f} s" for n in VARIANTS)),
        ("largest relative loss difference from the baseline at any step, parts per million: " + " / ".join(
            VARIANTS[n][0] for n in VARIANTS if n != "baseline"),
         " / ".join(f"{v[n]['max_relative_loss_gap'] * 1e6:.1f}" for n in VARIANTS if n != "baseline")),
        (f"compile pays (>= {COMPILE_SPEED}x tokens/s after warm-up, losses within {COMPILE_LOSS:g})", yes(comp["pays"])),
        *((f"{VARIANTS[n][0]} pays (peak RSS >= {MALLOC_RSS_CUT:.0%} lower at >= {MALLOC_SPEED}x tokens/s)", yes(v[n]["pays"]))
          for n in ("malloc_arenas", "malloc_thresholds")),
    ]
    adopt = ["- `compile: true`: " + (
        f"pays here ({comp['speed_ratio']:.2f}x after a {comp['warmup_extra_s']:.0f} s warm-up); the engine should "
        "turn it on for CPU runs long enough to repay the warm-up." if comp["pays"] else
        f"does not pay here ({comp['speed_ratio']:.2f}x tokens/s after warm-up, loss gap "
        f"{comp['max_relative_loss_gap'] * 1e6:.1f} ppm); the engine should keep `compile: false` by default on the CPU.")]
    for n in ("malloc_arenas", "malloc_thresholds"):
        x = v[n]
        adopt.append(f"- {VARIANTS[n][0]}: " + (
            f"pays here ({x['rss_ratio']:.2f}x peak RSS at {x['speed_ratio']:.2f}x tokens/s); the engine should set it "
            "for its training processes." if x["pays"] else
            f"does not pay here ({x['rss_ratio']:.2f}x peak RSS at {x['speed_ratio']:.2f}x tokens/s); the engine "
            "should not adopt it."))
    return ["", "## CPU levers: torch.compile and malloc settings (`bench/bench_cpu_levers.py`)", "",
            f"Generated by `bench/bench_cpu_levers.py --steps {a.steps} --repeats {a.repeats}` from "
            "`bench/results/bench_cpu_levers.json`. The engine's LoRA run (rank 8, batch 8, the example FAQ pairs, "
            "seq_len cap 256) on SmolLM2-135M-Instruct, dequantized from its Q4_1 GGUF, `precision: float32`, each "
            "variant a fresh `python -m training train` process with the same seed and data (its own peak RSS; the "
            "malloc settings in its environment). Tokens/s: median of the engine's per-step figure over steps "
            f"{out['first_timed_step']} to {a.steps - 1}; compile's warm-up is steps 1 and 2, cold (an empty inductor cache)."
            + (f" Each figure is the median of {a.repeats} runs." if a.repeats > 1 else " One run per variant."), "",
            *table(rows), "", "Should the engine adopt it?", "", *adopt, ""]


if __name__ == "__main__":
    main()
