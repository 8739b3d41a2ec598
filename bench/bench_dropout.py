"""Does LoRA dropout earn its cost? The same LoRA run with `lora.dropout` 0.05 and 0, over seeds.

    .venv/bin/python bench/bench_dropout.py [--steps 30] [--seeds 1,2] [--quick]

The engine's LoRA run (rank 8, batch 8, lr 2e-4, the example FAQ pairs, seq_len cap 256) on the embedded
SmolLM2-135M-Instruct (dequantized from its Q4_1 GGUF), validated every 10 steps on 4 batches, in this process
one after the other: each seed once with dropout 0.05 (peft draws a mask over every adapter input, every step) and
once with 0 (peft puts an identity there). Reports per seed the best and last validation loss and the tokens/s
(median of the engine's per-step figure). Dropout 0 "costs nothing" when its best validation loss is within 1% of
dropout's on every seed; then it is the default (training/contracts.py LoraSettings.dropout).
Writes bench/results/bench_dropout.json and its section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from common import DEFAULT_WORKSPACE, faq_lora_plan, parse, result_json, run_curve, table, write_json, write_section

OUT = result_json("bench_dropout")
TOLERANCE = 0.01  # relative: dropout 0's best validation loss may be this much worse and still cost nothing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seeds", default="1,2")
    ap.add_argument("--quick", action="store_true", help="one seed, 10 steps")
    ap.add_argument("--workspace", type=Path, default=DEFAULT_WORKSPACE)
    a = parse(ap)
    if a.quick:
        a.steps, a.seeds = 10, "1"
    from training.contracts import LoraSettings
    from training.loop import train

    seeds = [int(s) for s in a.seeds.split(",")]
    runs: dict[str, list[dict]] = {"0.05": [], "0": []}
    for seed in seeds:
        for dropout in runs:
            run_id = f"dropout-{dropout}-seed{seed}-{int(time.time())}"
            plan = faq_lora_plan(a.workspace, a.steps, seed=seed, eval_every=10, eval_batches=4,
                                 lora=LoraSettings(rank=8, alpha=16, dropout=float(dropout)))
            print(f"seed {seed}, lora dropout {dropout}: {a.steps} steps ...", flush=True)
            result = train(plan, a.workspace, run_id, show_progress=False)
            curve = run_curve(a.workspace, run_id, a.steps)
            runs[dropout].append({"seed": seed, "run_id": run_id, "best_val_loss": result.best_val_loss,
                                  "final_val_loss": result.final_val_loss, "tokens_per_s": curve["tokens_per_s"]})
    gaps = [(z["best_val_loss"] - d["best_val_loss"]) / d["best_val_loss"] for d, z in zip(runs["0.05"], runs["0"])]
    ratios = [z["tokens_per_s"] / d["tokens_per_s"] for d, z in zip(runs["0.05"], runs["0"])]
    speed = statistics.median(ratios)
    free = max(gaps) <= TOLERANCE
    target = f"LoRA dropout 0 reaches dropout 0.05's best validation loss within {TOLERANCE:.0%} on every seed"
    out = {"steps": a.steps, "seeds": seeds, "runs": runs, "relative_best_val_gap": gaps, "speed_ratio": speed,
           "speed_ratios": ratios, "rank": plan.lora.rank, "batch": plan.batch_size, "lr": plan.lr,
           "eval_every": plan.eval_every, "eval_batches": plan.eval_batches,
           "tolerance": TOLERANCE, "costs_nothing": free,
           "summary": [{"target": target, "figure": f"worst gap {max(gaps):+.2%}, {speed:.2f}x tokens/s", "met": free}]}
    write_json(OUT, out)
    rows = []
    for d, z, gap in zip(runs["0.05"], runs["0"], gaps):
        rows.append((f"seed {d['seed']}: best / last validation loss, dropout 0.05 vs 0",
                     f"{d['best_val_loss']:.4f} / {d['final_val_loss']:.4f} vs {z['best_val_loss']:.4f} / "
                     f"{z['final_val_loss']:.4f} (best {gap:+.2%})"))
        rows.append((f"seed {d['seed']}: tokens/s, dropout 0.05 vs 0", f"{d['tokens_per_s']:.0f} vs {z['tokens_per_s']:.0f}"))
    rows += [("tokens/s of dropout 0 over dropout 0.05, per seed (median)",
              f"{', '.join(f'{r:.2f}x' for r in ratios)} ({speed:.2f}x)"),
             (target, "yes: 0 is the default" if free else "no: 0.05 stays the default")]
    lines = ["", "## LoRA dropout on the CPU (`bench/bench_dropout.py`)", "",
             f"The engine's LoRA run (rank {plan.lora.rank}, batch {plan.batch_size}, lr {plan.lr:g}, {a.steps} steps, the "
             f"example FAQ pairs, validation every {plan.eval_every} steps on {plan.eval_batches} batches) on SmolLM2-135M-Instruct, dequantized from its Q4_1 GGUF, float32, with LoRA dropout "
             "0.05 and 0, the same seed and data, one after the other in one process.", "", *table(rows), ""]
    write_section("bench_dropout", lines)
    print("\n".join(lines[3:]))


if __name__ == "__main__":
    main()
