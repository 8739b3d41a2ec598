"""GPU benchmark: pretraining the 124M model in bf16 with our loop, tokens/s and MFU, against the HF Trainer.

    # here (CPU): curate bbc-news and train the 50k BPE tokenizer once, into a folder the GPU run carries
    .venv/bin/python bench/bench_gpu.py prepare [--dir bench/.gpu]
    # on the GPU machine: every configuration in its own subprocess, then the report
    python3 bench/bench_gpu.py run [--dir bench/.gpu] [--steps 50] [--warmup 15] [--micro 16,32] [--profile]
    # anywhere: the section again from bench/results/bench_gpu.json, with what bounds the run (from its kernel profile)
    .venv/bin/python bench/bench_gpu.py --render-only

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

Writes `bench/results/bench_gpu.json` and the bench_gpu section of `bench/RESULTS.md`. Without a GPU, `run` exits 2.
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

from common import BENCH, ROOT, begin, fresh_run, load_json, markers, provenance_lines, result_json, update_markdown, write_json
from common import RESULTS_MD

DEFAULT_DIR = BENCH / ".gpu"
OUT = result_json("bench_gpu")
TARGET_MFU = 0.45
SEQ_LEN = 1024
MODEL = {"layers": 12, "d": 768, "ffn": 3072}  # the `124m` size (training.models), as the FLOPs formula counts it
MATMUL_N = 8192
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

    a, b = (torch.randn(MATMUL_N, MATMUL_N, device="cuda", dtype=torch.bfloat16) for _ in range(2))
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
    return 2 * MATMUL_N**3 / sorted(times)[len(times) // 2]


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
    flops_per_token = 6 * res["params"] + 12 * MODEL["layers"] * MODEL["d"] * SEQ_LEN
    achieved = tokens_per_s * flops_per_token
    return {"tokens_per_s": tokens_per_s, "tflops": achieved / 1e12, "mfu": achieved / peak if peak else None,
            "of_ceiling": achieved / ceiling, "steady_steps": len(steady), "first_step_s": res["step_s"][0]}


def run(work: Path, steps: int, warmup: int, micros: list[int], sides: list[str], compile_modes: list[bool],
        profile: bool = False, allow_dirty: bool = False) -> None:
    import torch

    provenance = begin(allow_dirty)
    if not provenance["commit"] and os.environ.get("ENGINE_COMMIT"):  # a copy of the tree without its .git
        provenance["commit"] = os.environ["ENGINE_COMMIT"]
    name = torch.cuda.get_device_name()
    peak, ceiling = peak_flops(name), matmul_ceiling()
    dataset = (work / "dataset.txt").read_text().strip()
    configs = [(side, micro, comp) for comp in compile_modes for micro in micros for side in sides]
    out = {"device": name, "peak_bf16_flops": peak, "matmul_ceiling_flops": ceiling, "torch": torch.__version__,
           "steps": steps, "warmup": warmup, "seq_len": SEQ_LEN, "commit": provenance["commit"][:10],
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


def derived(out: dict) -> dict:
    """What the section shows beyond the raw measurements, computed from them and kept in the JSON with them: the
    settings, the target, the card's peaks in TFLOP/s, what bounds the run (`bounds`) and the summary row."""
    ok = [r for r in out["results"] if "error" not in r]
    best = max((r for r in ok if r["side"] == "ours"), key=lambda r: r["tokens_per_s"], default=None)
    return {"model": MODEL, "flops_formula": "6N + 12 L d T", "target_mfu": TARGET_MFU, "matmul_n": MATMUL_N,
            "peak_bf16_tflops": (out["peak_bf16_flops"] or 0) / 1e12, "matmul_ceiling_tflops": out["matmul_ceiling_flops"] / 1e12,
            "bounds": [bounds(out, r) for r in ok if r["side"] == "ours" and r.get("profile")],
            "vs_trainer": [vs_trainer(ok, r) for r in ok if r["side"] == "ours" and vs_trainer(ok, r)],
            "summary": [{"target": f"124M pretraining on a GPU: MFU >= {TARGET_MFU:.0%} of the card's dense bf16 peak",
                         "figure": (f"{(best['mfu'] or 0):.1%} (micro-batch {best['micro']}, {best['tokens_per_s']:,.0f} tokens/s)"
                                    if best else "no run of ours completed"),
                         "met": bool(best and (best["mfu"] or 0) >= TARGET_MFU)}]}


def vs_trainer(ok: list[dict], r: dict) -> dict | None:
    base = next((b for b in ok if b["side"] == "trainer" and b["micro"] == r["micro"] and b["compile"] == r["compile"]), None)
    return base and {"micro": r["micro"], "compile": r["compile"], "tokens_per_s_ratio": r["tokens_per_s"] / base["tokens_per_s"],
                     "peak_memory_ratio": r["peak_mb"] / base["peak_mb"]}


def bounds(out: dict, r: dict) -> dict:
    """Where one profiled step of ours goes, from the kernel profile's operators (device time under each): the matrix
    products (`aten::mm`) against the 6N FLOPs they compute, attention (cuDNN's fused kernels) against its 12 L d T
    FLOPs, and the rest of the measured step (mostly the kernels torch.compile generated around them)."""
    top = r["profile"]["top"]
    op = lambda name: sum(e["ms_per_step"] for e in top if e["name"] == name)  # noqa: E731
    tokens = r["micro"] * out["seq_len"]
    step_ms = 1e3 * tokens / r["tokens_per_s"]
    matmul_tflop = 6 * r["params"] * tokens / 1e12
    attention_tflop = 12 * MODEL["layers"] * MODEL["d"] * out["seq_len"] * tokens / 1e12
    mm_ms = op("aten::mm")
    attention_ms = op("aten::_cudnn_attention_forward") + op("aten::_cudnn_attention_backward")
    rest_ms = step_ms - mm_ms - attention_ms
    seen, generated = set(), []
    for e in top:  # the largest kernels torch.compile generated (the profile lists some twice)
        if e["name"].startswith("triton_") and e["name"] not in seen:
            seen.add(e["name"])
            generated.append({"name": e["name"], "ms_per_step": e["ms_per_step"]})
    return {"micro": r["micro"], "compile": r["compile"], "step_ms": step_ms, "model_tflop": matmul_tflop + attention_tflop,
            "matmul_ms": mm_ms, "matmul_tflop": matmul_tflop, "matmul_tflops": matmul_tflop / (mm_ms / 1e3),
            "matmul_of_ceiling": matmul_tflop / (mm_ms / 1e3) / (out["matmul_ceiling_flops"] / 1e12),
            "attention_ms": attention_ms, "attention_step_share": attention_ms / step_ms,
            "attention_flop_share": attention_tflop / (matmul_tflop + attention_tflop),
            "rest_ms": rest_ms, "rest_step_share": rest_ms / step_ms, "largest_generated": generated[:3]}


def render(out: dict) -> None:
    """The section from `out` (as in the JSON), whose derived figures are written back into the JSON first."""
    out.update(derived(out))
    save(out)
    ok = [r for r in out["results"] if "error" not in r]
    m = out["model"]
    lines = ["", "## 124M pretraining on a GPU, bf16 (`bench/bench_gpu.py`)", "",
             f"Generated by `bench/bench_gpu.py run --steps {out['steps']} --warmup {out['warmup']}` from "
             f"`bench/results/bench_gpu.json`. Model: the `124m` Llama ({m['layers']} layers, d {m['d']}, SwiGLU {m['ffn']}, tied embeddings), "
             f"seq_len {out['seq_len']}, packed bbc-news windows, bf16 autocast, fused AdamW, no gradient accumulation. "
             "Each row is a fresh process; tokens/s over the steady steps (warm-up and compilation excluded). "
             f"MFU = tokens/s x ({out['flops_formula']}) / peak dense bf16 of the card.", "",
             "| measure | value |", "|---|---|",
             f"| device | {out['device']} |", f"| torch | {out['torch']} |",
             f"| peak bf16 (datasheet, dense) | {out['peak_bf16_tflops']:.0f} TFLOP/s |",
             f"| measured {out['matmul_n']}^3 bf16 matmul (same run) | {out['matmul_ceiling_tflops']:.0f} TFLOP/s |",
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
        lines += ["", f"Target: MFU >= {out['target_mfu']:.0%} on an H100. Best of ours: {(best['mfu'] or 0):.1%} "
                  f"(micro-batch {best['micro']}, compile {best['compile']}) -> "
                  f"{'MET' if (best['mfu'] or 0) >= out['target_mfu'] else 'MISSED by %.1f points' % (100 * (out['target_mfu'] - (best['mfu'] or 0)))}."]
        lines += [f"- micro-batch {v['micro']}, compile {v['compile']}: ours / Trainer tokens/s = {v['tokens_per_s_ratio']:.2f}x, "
                  f"peak memory {v['peak_memory_ratio']:.2f}x" for v in out["vs_trainer"]]
    if out["bounds"]:
        lines += ["", "### What bounds the run (from the kernel profile of ours, in the JSON)", "",
                  "The profiler's steady steps of ours, device time per step under each operator, against the measured step "
                  "and the FLOPs the formula above counts: the matrix products (`aten::mm`) compute the 6N term, cuDNN's fused "
                  "attention the 12 L d T term; the rest of the step is everything else (the largest of it: the kernels "
                  "`torch.compile` generated for SwiGLU, RoPE, RMSNorm and the log-softmax over the vocabulary).", "",
                  "| micro-batch | measured step | model FLOPs | matrix products: time, rate (of the measured matmul) | "
                  "attention: time (share of the step / of the FLOPs) | the rest: time (share of the step) | its largest generated kernels |",
                  "|---|---|---|---|---|---|---|"]
        for b in out["bounds"]:
            kernels = ", ".join(f"`{k['name'][:48]}` {k['ms_per_step']:.1f} ms" for k in b["largest_generated"])
            lines.append(f"| {b['micro']} | {b['step_ms']:.1f} ms | {b['model_tflop']:.1f} TFLOP | {b['matmul_ms']:.1f} ms for "
                         f"{b['matmul_tflop']:.1f} TFLOP: {b['matmul_tflops']:.0f} TFLOP/s ({b['matmul_of_ceiling']:.0%}) | "
                         f"{b['attention_ms']:.1f} ms ({b['attention_step_share']:.0%} / {b['attention_flop_share']:.0%}) | "
                         f"{b['rest_ms']:.1f} ms ({b['rest_step_share']:.0%}) | {kernels} |")
        lines += ["", "The matrix products run near the card's measured matmul rate: the gap to the target is in attention and "
                  "in the rest of the step, the kernels around the products. (Engine changes after the run's commit are "
                  "not in these figures.)"]
    lines.append("")
    head, tail = markers("bench_gpu")
    update_markdown(RESULTS_MD, "\n".join([head, *lines, *provenance_lines(out["provenance"]), tail]), head, tail)
    print("\n".join(line for line in lines if line.startswith(("|", "-", "Target"))))


def reconstruct_provenance(out: dict) -> dict:
    """The provenance of a run recorded before `common.begin` existed, rebuilt from its own record: its commit (expanded
    by git), the device, the matmul ceiling it measured, the date and the settings its command had."""
    short = out["commit"].split("+")[0]
    full = subprocess.run(["git", "rev-parse", short], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    results = [r for r in out["results"] if "error" not in r]
    micros = ",".join(str(m) for m in dict.fromkeys(r["micro"] for r in results))
    compiles = ",".join(str(int(c)) for c in dict.fromkeys(r["compile"] for r in results))
    command = (f"python bench/bench_gpu.py run --steps {out['steps']} --warmup {out['warmup']} --micro {micros} "
               f"--compile {compiles}" + (" --profile" if any(r.get("profile") for r in results) else ""))
    return {"commit": full, "dirty": [] if out["commit"] == short else ["(the run recorded its tree as uncommitted)"],
            "command": command, "date_utc": out["date"],
            "machine": {"cpu": f"not recorded (the GPU machine: {out['platform']})", "gpu": out["device"], "torch": out["torch"],
                        "matmul_gflops": {"bfloat16": round(out["matmul_ceiling_flops"] / 1e9, 1), "n": MATMUL_N}},
            "reconstructed": "Provenance reconstructed from the run's own record (commit, date, device, matmul ceiling, "
                             "settings), which predates the provenance the benches now record."}


def render_only() -> None:
    out = json.loads(OUT.read_text(encoding="utf-8"))
    if not out.get("provenance"):
        out["provenance"] = reconstruct_provenance(out)
        OUT.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    render(load_json(OUT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--render-only", action="store_true", help="regenerate the section from bench/results/bench_gpu.json")
    sub = ap.add_subparsers(dest="cmd")
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
    r.add_argument("--allow-dirty", action="store_true", help="measure on a tree with uncommitted changes (recorded)")
    c = sub.add_parser("child")
    c.add_argument("spec")
    a = ap.parse_args()
    if a.render_only:
        return render_only()
    if a.cmd == "prepare":
        return prepare(a.dir)
    import torch

    if not torch.cuda.is_available():
        print("bench_gpu: needs a CUDA GPU (none here); `--render-only` regenerates the section from its JSON", file=sys.stderr)
        raise SystemExit(2)
    if a.cmd == "run":
        run(a.dir, a.steps, a.warmup, [int(m) for m in a.micro.split(",")], a.sides.split(","),
            [c == "1" for c in a.compile.split(",")], a.profile, a.allow_dirty)
    elif a.cmd == "child":
        spec = json.loads(a.spec)
        res = (child_ours if spec["side"] == "ours" else child_trainer)(spec)
        print(json.dumps(res))
    else:
        ap.error("a command: prepare, run, or --render-only")


if __name__ == "__main__":
    main()
