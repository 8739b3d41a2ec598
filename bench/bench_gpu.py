"""GPU benchmark: pretraining the 124M model in bf16 with our loop, tokens/s and MFU, against the HF Trainer.

    # here (CPU): curate bbc-news and train the 50k BPE tokenizer once, into a folder the GPU run carries
    .venv/bin/python bench/bench_gpu.py prepare [--dir bench/.gpu]
    # on the GPU machine: every configuration in its own subprocess, then the report
    python3 bench/bench_gpu.py run [--dir bench/.gpu] [--steps 50] [--warmup 15] [--micro 16,32]

What is measured, per configuration (each a fresh process, so CUDA's peak-memory counter is its own):

- **ours**: `training.loop.train()` on a `size: 124m` pretraining plan (seq_len 1024, bf16 autocast,
  fused AdamW, optionally `torch.compile`), with the tokenizer prepared above placed in the run dir.
  Step times come from the run's own logged metrics (the loop reads the loss once per step, which
  synchronises the device, so a step's time is its real time).
- **Trainer**: `transformers.Trainer` on the same model (`training.models.build_scratch`, same seed),
  the same packed windows, `bf16=True`, `optim=adamw_torch_fused`, the same compile setting, a callback
  that synchronises the device at every step end.
- Steady state: steps `warmup+1 .. steps-1` (compilation and warm-up left out).
- **MFU** = achieved FLOP/s / peak bf16 FLOP/s of the card (dense, from the datasheet: 989 TFLOP/s for
  an H100 SXM), with FLOPs per token = 6 N + 12 L d T (PaLM's formula: N all parameters, the tied
  output layer counted once; L layers, d width, T sequence length). The same run also times a large
  bf16 matmul, the practical ceiling, and reports MFU against it too.

Writes `bench/results/bench_gpu.json` and the bench_gpu section of `bench/RESULTS.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from common import BENCH, fresh_run, git_commit, result_json, write_json, write_section

DEFAULT_DIR = BENCH / ".gpu"
OUT = result_json("bench_gpu")
TARGET_MFU = 0.45
SEQ_LEN = 1024
# Dense bf16 peak by card name (datasheets, no sparsity).
PEAK_BF16 = {"H100 80GB HBM3": 989.4e12, "H100 SXM": 989.4e12, "H100 PCIe": 756.0e12, "H200": 989.4e12,
             "A100": 312.0e12}


def prepare(work: Path) -> None:
    """Curate bbc-news as text and train the 124m tokenizer: everything the GPU run needs, nothing else."""
    from training.data.curate import curate_to_workspace
    from training.models import resolve_size
    from training.tokenizer import train_bpe
    from training.batches import read_split
    from training.data.store import datasets_dir

    ws = work / "ws"
    summary = curate_to_workspace("bbc-news", ws, format="text").summary
    records = read_split(datasets_dir(ws) / summary.fingerprint, "train")
    tok = train_bpe([r["text"] for r in records], resolve_size("124m").vocab_size)
    tok.save_pretrained(str(work / "tokenizer"))
    (work / "dataset.txt").write_text(summary.fingerprint, encoding="utf-8")
    print(f"prepared {work}: dataset {summary.fingerprint}, {len(records)} train records, vocab {len(tok)}")


def peak_flops(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def matmul_ceiling() -> float:
    """bf16 FLOP/s of an 8192^3 matmul on random data (median of 20 after warm-up)."""
    import torch

    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(20):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    return 2 * 8192**3 / sorted(times)[len(times) // 2]


def child_ours(spec: dict) -> dict:
    import torch

    from training.contracts import Budget, TrainPlan
    from training.loop import train

    ws = Path(spec["workspace"])
    run = fresh_run(ws, spec["run_id"], spec["tokenizer_dir"])
    plan = TrainPlan(task="pretrain", dataset=spec["dataset"], size="124m", seq_len=SEQ_LEN, batch_size=spec["micro"],
                     budget=Budget(steps=spec["steps"]), eval_every=10**6, eval_batches=2, checkpoint_every=10**6,
                     lr=6e-4, warmup_steps=10, device="cuda", compile=spec["compile"])
    profile: dict = {}
    if spec.get("profile"):
        profile_steps(profile, start=20, n=5)
    result = train(plan, ws, spec["run_id"], show_progress=False)
    rows = run.metrics_rows()
    step_s = [spec["micro"] * SEQ_LEN / r["tokens_per_s"] for r in rows]
    shutil.rmtree(run.dir, ignore_errors=True)
    return {"step_s": step_s, "loss": [r["loss"] for r in rows], "peak_mb": result.peak_memory_mb,
            "params": result.total_params, "status": result.status, "torch": torch.__version__, **profile}


def profile_steps(out: dict, start: int, n: int) -> None:
    """Profile steps start+1 .. start+n of the loop (started and stopped from its metrics writer)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from training.setup import MetricsLog

    write = MetricsLog.write
    state: dict = {}

    def profiled_write(self, row):
        write(self, row)
        if row["step"] == start:
            state["prof"] = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            state["prof"].__enter__()
        elif row["step"] == start + n and "prof" in state:
            torch.cuda.synchronize()
            state["prof"].__exit__(None, None, None)
            events = state["prof"].key_averages()
            total = sum(e.self_device_time_total for e in events)
            top = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:25]
            out["profile"] = {"steps": n, "device_ms_per_step": total / 1e3 / n, "top": [
                {"name": e.key[:90], "ms_per_step": e.self_device_time_total / 1e3 / n, "share": e.self_device_time_total / total,
                 "calls_per_step": e.count / n} for e in top]}

    MetricsLog.write = profiled_write


def child_trainer(spec: dict) -> dict:
    import torch
    from transformers import PreTrainedTokenizerFast, Trainer, TrainerCallback, TrainingArguments

    from training.batches import build_examples, read_split
    from training.data.store import datasets_dir
    from training.models import build_scratch, resolve_size

    tok = PreTrainedTokenizerFast.from_pretrained(spec["tokenizer_dir"])
    records = read_split(datasets_dir(Path(spec["workspace"])) / spec["dataset"], "train")
    examples = build_examples(tok, records, "text", SEQ_LEN)
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    torch.manual_seed(0)
    model = build_scratch(resolve_size("124m"), tok, SEQ_LEN, 0.0)
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return {k: torch.tensor(v, dtype=torch.long) for k, v in rows[i].items()}

    args = TrainingArguments(
        output_dir=str(Path(spec["workspace"]) / "trainer-out"), per_device_train_batch_size=spec["micro"],
        max_steps=spec["steps"], learning_rate=6e-4, warmup_steps=10, lr_scheduler_type="cosine", weight_decay=0.1,
        adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, bf16=True, optim="adamw_torch_fused",
        torch_compile=spec["compile"], eval_strategy="no", save_strategy="no", logging_strategy="no", report_to=[],
        dataloader_num_workers=2, dataloader_pin_memory=True, dataloader_drop_last=True, disable_tqdm=True, remove_unused_columns=False, seed=0)
    torch.cuda.synchronize()
    start = time.perf_counter()
    Trainer(model=model, args=args, train_dataset=Rows(), callbacks=[Clock()]).train()
    ends = [start] + stamps
    return {"step_s": [b - a for a, b in zip(ends, ends[1:])], "peak_mb": torch.cuda.max_memory_allocated() / 2**20,
            "params": sum(p.numel() for p in model.parameters())}


def summarise(res: dict, warmup: int, peak: float | None, ceiling: float) -> dict:
    steady = res["step_s"][warmup:-1]
    tokens_per_s = res["micro"] * SEQ_LEN * len(steady) / sum(steady)
    flops_per_token = 6 * res["params"] + 12 * 12 * 768 * SEQ_LEN
    achieved = tokens_per_s * flops_per_token
    return {"tokens_per_s": tokens_per_s, "tflops": achieved / 1e12, "mfu": achieved / peak if peak else None,
            "of_ceiling": achieved / ceiling, "steady_steps": len(steady), "first_step_s": res["step_s"][0]}


def run(work: Path, steps: int, warmup: int, micros: list[int], sides: list[str], compile_modes: list[bool],
        profile: bool = False) -> None:
    import torch

    name = torch.cuda.get_device_name()
    peak, ceiling = peak_flops(name), matmul_ceiling()
    dataset = (work / "dataset.txt").read_text().strip()
    configs = [(side, micro, comp) for comp in compile_modes for micro in micros for side in sides]
    out = {"device": name, "peak_bf16_flops": peak, "matmul_ceiling_flops": ceiling, "torch": torch.__version__,
           "steps": steps, "warmup": warmup, "seq_len": SEQ_LEN, "commit": os.environ.get("ENGINE_COMMIT") or git_commit(),
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "platform": platform.platform(),
           "results": []}
    for side, micro, comp in configs:
        spec = {"side": side, "micro": micro, "compile": comp, "steps": steps, "profile": profile and side == "ours", "workspace": str(work / "ws"),
                "dataset": dataset, "tokenizer_dir": str(work / "tokenizer"), "run_id": f"gpu-{side}-{micro}-{int(comp)}"}
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "child", json.dumps(spec)], capture_output=True, text=True)
        if proc.returncode:
            print(f"{side} micro {micro} compile {comp}: FAILED\n{proc.stderr[-3000:]}", flush=True)
            out["results"].append({**spec, "error": proc.stderr[-1500:]})
        else:
            res = {**spec, **json.loads(proc.stdout.strip().splitlines()[-1]), "wall_s": time.perf_counter() - t0}
            res.update(summarise(res, warmup, peak, ceiling))
            print(f"{side:7s} micro {micro:3d} compile {comp!s:5s}: {res['tokens_per_s']:>10,.0f} tok/s  "
                  f"MFU {res['mfu'] or 0:.1%}  peak {res['peak_mb']:,.0f} MiB  wall {res['wall_s']:.0f}s", flush=True)
            out["results"].append(res)
            for k in (res.get("profile") or {}).get("top", [])[:12]:
                print(f"    {k['share']:6.1%} {k['ms_per_step']:7.2f} ms/step  {k['calls_per_step']:5.0f} calls  {k['name']}")
        save(out)  # after every configuration: a run cut short still leaves what it measured
    render(out)


def save(out: dict) -> None:
    write_json(OUT, out)
    if os.environ.get("OUT"):  # the device machine sends back what is under $OUT
        shutil.copy(OUT, Path(os.environ["OUT"]) / OUT.name)


def render(out: dict) -> None:
    ok = [r for r in out["results"] if "error" not in r]
    lines = ["", "## 124M pretraining on a GPU, bf16 (`bench/bench_gpu.py`)", "",
             f"Generated by `bench/bench_gpu.py run --steps {out['steps']} --warmup {out['warmup']}` from "
             "`bench/results/bench_gpu.json`. Model: the `124m` Llama (12 layers, d 768, SwiGLU 3072, tied embeddings), "
             f"seq_len {out['seq_len']}, packed bbc-news windows, bf16 autocast, fused AdamW, no gradient accumulation. "
             "Each row is a fresh process; tokens/s over the steady steps (warm-up and compilation excluded). "
             "MFU = tokens/s x (6N + 12 L d T) / peak dense bf16 of the card.", "",
             "| measure | value |", "|---|---|",
             f"| device | {out['device']} |", f"| torch | {out['torch']} |",
             f"| peak bf16 (datasheet, dense) | {(out['peak_bf16_flops'] or 0) / 1e12:.0f} TFLOP/s |",
             f"| measured 8192^3 bf16 matmul (same run) | {out['matmul_ceiling_flops'] / 1e12:.0f} TFLOP/s |",
             f"| engine commit | {out['commit']} |", f"| date (UTC) | {out['date']} |", "",
             "| side | micro-batch | compile | tokens/s | TFLOP/s | MFU (datasheet) | of measured matmul | peak GPU memory | first step |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in ok:
        lines.append(f"| {r['side']} | {r['micro']} | {r['compile']} | {r['tokens_per_s']:,.0f} | {r['tflops']:.0f} | "
                     f"{(r['mfu'] or 0):.1%} | {r['of_ceiling']:.1%} | {r['peak_mb']:,.0f} MiB | {r['first_step_s']:.1f} s |")
    for r in out["results"]:
        if "error" in r:
            lines.append(f"| {r['side']} | {r['micro']} | {r['compile']} | failed: {r['error'].strip().splitlines()[-1][:120]} |||||||")
    best = max((r for r in ok if r["side"] == "ours"), key=lambda r: r["tokens_per_s"], default=None)
    if best:
        lines += ["", f"Target: MFU >= {TARGET_MFU:.0%} on an H100. Best of ours: {(best['mfu'] or 0):.1%} "
                  f"(micro-batch {best['micro']}, compile {best['compile']}) -> "
                  f"{'MET' if (best['mfu'] or 0) >= TARGET_MFU else 'MISSED by %.1f points' % (100 * (TARGET_MFU - (best['mfu'] or 0)))}."]
        for r in ok:
            base = next((b for b in ok if b["side"] == "trainer" and b["micro"] == r["micro"] and b["compile"] == r["compile"]), None)
            if r["side"] == "ours" and base:
                lines.append(f"- micro-batch {r['micro']}, compile {r['compile']}: ours / Trainer tokens/s = "
                             f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x, peak memory {r['peak_mb'] / base['peak_mb']:.2f}x")
    lines.append("")
    write_section("bench_gpu", lines)
    print("\n".join(line for line in lines if line.startswith(("|", "-", "Target"))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    r = sub.add_parser("run")
    r.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    r.add_argument("--steps", type=int, default=50)
    r.add_argument("--warmup", type=int, default=15)
    r.add_argument("--micro", default="16,32")
    r.add_argument("--sides", default="ours,trainer")
    r.add_argument("--compile", default="1", help="comma list of 1/0")
    r.add_argument("--profile", action="store_true", help="profile 5 steady steps of ours (their kernels, by device time)")
    c = sub.add_parser("child")
    c.add_argument("spec")
    sub.add_parser("render")
    a = ap.parse_args()
    if a.cmd == "prepare":
        prepare(a.dir)
    elif a.cmd == "run":
        run(a.dir, a.steps, a.warmup, [int(m) for m in a.micro.split(",")], a.sides.split(","),
            [c == "1" for c in a.compile.split(",")], a.profile)
    elif a.cmd == "render":
        render(json.loads(OUT.read_text()))
    else:
        spec = json.loads(a.spec)
        res = (child_ours if spec["side"] == "ours" else child_trainer)(spec)
        print(json.dumps(res))


if __name__ == "__main__":
    main()
