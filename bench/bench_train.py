"""Benchmark of the training loop: pretraining a small Llama from scratch, our loop vs the HF `Trainer`.

    .venv/bin/python bench/bench_train.py [--size small] [--steps 20] [--warmup 5] [--repeats 2]
                                          [--out FILE] [--results-md FILE] [--no-profile]

What it does, all in one run:

1. Curates the offline `bbc-news` corpus (format text) into a bench workspace (default
   `$TMPDIR/modelcrew-bench`, kept between runs) and trains the byte-level BPE tokenizer the engine would
   train for that size (`training.tokenizer.train_bpe` on the train split, cached), so that neither side
   spends its time or memory on tokenizer training.
2. Runs, each in a fresh subprocess so that its peak RSS (`ru_maxrss`) is its own, and interleaved
   (ours, Trainer, Trainer, ours, ...) so that other work on the machine hits both alike:
   - **ours**: `training.loop.train()` on a pretraining plan (the tokenizer above placed in the run
     directory first, so `prepare_run` reuses it instead of training one);
   - **Trainer**: `transformers.Trainer` on the same model (`training.models.build_scratch`, same seed),
     the same packed windows (`training.batches.build_examples`) in the same order as the engine's
     `BatchStream` (a sequential sampler over that order), same batch size and seq_len, AdamW with the
     same betas, weight decay, grad clipping and warmup + cosine-to-10% schedule, no evaluation, no
     checkpoint saving, `dataloader_num_workers=0`, `report_to=[]`, the Trainer's default optimizer
     implementation. The batches are checked to be identical (checksums of every batch).
3. Steady-state tokens/s: tokens of steps `warmup+1 .. steps-1` over the time between the end of step
   `warmup` and the end of step `steps-1` (step ends are timestamped by a hook in each process; the last
   step is left out because the engine validates after it). Peak RSS: `ru_maxrss` at the end of the last
   step (ours: just before its final export; Trainer: after `train()` returns), and for ours also at the
   end of the whole run (export included).
4. A separate profiled run of ours (not timed): cProfile over `--profile-steps` steady steps (where the
   step's time goes) and the torch profiler over as many more (top operators by own CPU time).
5. Prints a rich table, writes every figure to `--out` (JSON) and regenerates the bench_train section
   of `--results-md` from that JSON.

What it shares with `bench/bench_lora.py` lives in `bench/common.py`.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from common import Comparison, StepClock, comparison_parser, curate, fmt, machine_info, machine_rows
from common import memory_rows, ours_fused, profile_parts, profiled_run, record_comparison, result_json, rss_bytes
from common import run_child, run_ours, run_pairs, run_trainer, speed_missed, speed_target_row, throughput_rows
from common import resolved_precision, variant_rows, variant_run, workload_rows

DEFAULT_OUT = result_json("bench_train")
TARGET_SPEED = 1.3  # ours / Trainer steady-state tokens/s, CPU
CORPUS = "bbc-news"


# --------------------------------------------------------------------------------------------------
# children


def plan_for(spec: dict):
    from training.contracts import Budget, TrainPlan

    return TrainPlan(task="pretrain", dataset=spec["dataset"], size=spec["size"], seq_len=spec["seq_len"],
                     batch_size=spec["batch_size"], budget=Budget(steps=spec["steps"]), eval_every=10**6,
                     checkpoint_every=10**6, lr=spec["lr"], warmup_steps=spec["warmup_steps"], seed=spec["seed"],
                     weight_decay=spec["weight_decay"], grad_clip=spec["grad_clip"], min_lr_ratio=spec["min_lr_ratio"],
                     device="cpu", precision=spec["precision"])


def child_prep(spec: dict) -> dict:
    """Train (or reuse) the tokenizer for this corpus and size; count the packed windows."""
    from transformers import PreTrainedTokenizerFast

    from training.batches import build_examples, read_split
    from training.data.store import datasets_dir
    from training.models import resolve_size
    from training.tokenizer import train_bpe

    tok_dir = Path(spec["tokenizer_dir"])
    records = read_split(datasets_dir(Path(spec["workspace"])) / spec["dataset"], "train")
    t0 = time.perf_counter()
    if not (tok_dir / "tokenizer.json").exists():
        texts = [r.get("text") or json.dumps(r, ensure_ascii=False) for r in records]
        tok = train_bpe(texts, resolve_size(spec["size"]).vocab_size)
        tmp = Path(tempfile.mkdtemp(prefix=".tok-", dir=tok_dir.parent))
        tok.save_pretrained(str(tmp))
        os.replace(tmp, tok_dir)
    tok_seconds = time.perf_counter() - t0
    tok = PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    examples = build_examples(tok, records, "text", spec["seq_len"])
    return {"tokenizer_seconds": tok_seconds, "vocab": len(tok), "train_records": len(records), "windows": len(examples)}


def child_ours(spec: dict, profile: bool = False) -> dict:
    return run_ours(spec, plan_for(spec), profile)


def child_trainer(spec: dict) -> dict:
    import torch
    import transformers  # noqa: F401
    from transformers import PreTrainedTokenizerFast, Trainer  # noqa: F401  (Trainer: before the RSS reading)

    from training.batches import build_examples, read_split
    from training.data.store import datasets_dir
    from training.models import build_scratch, resolve_size

    rss_imports = rss_bytes()
    t0 = time.perf_counter()
    clock = StepClock()
    tok = PreTrainedTokenizerFast.from_pretrained(spec["tokenizer_dir"])
    records = read_split(datasets_dir(Path(spec["workspace"])) / spec["dataset"], "train")
    examples = build_examples(tok, records, "text", spec["seq_len"])
    del records
    torch.manual_seed(spec["seed"])
    model = build_scratch(resolve_size(spec["size"]), tok, spec["seq_len"], 0.0)
    return run_trainer(model, spec, examples, tok.pad_token_id, clock, rss_imports, t0, "bench_trainer_")


# --------------------------------------------------------------------------------------------------
# report


VARIANT_ENV = {"MODELCREW_MMAP_THRESHOLD": str(1 << 20)}  # the engine's setting for FSDP processes, not for this run
VARIANT_LABEL = ("the 1 MB mmap threshold (MODELCREW_MMAP_THRESHOLD=1048576: the engine's malloc setting for FSDP "
                 "processes, and for LoRA until 51a7868, which a one-process full-weight run does not get)")


def report_rows(res: dict) -> list[tuple[str, list[tuple[str, str]]]]:
    m, w, c = res["machine"], res["workload"], res["comparison"]
    return [
        ("Machine", machine_rows(m)),
        ("Workload", [
            ("model", f"Llama '{w['size']}' from scratch: {fmt(w.get('params'))} parameters, vocab {fmt(w['vocab'])}"),
            ("data", f"{CORPUS}, {fmt(w['train_records'])} train articles packed into {fmt(w['windows'])} windows of {w['seq_len']} tokens"),
            ("batch x seq_len", f"{w['batch_size']} x {w['seq_len']} = {fmt(w['batch_size'] * w['seq_len'])} tokens per step, no padding"),
            *workload_rows(res, "Trainer"),
        ]),
        ("Steady-state throughput", throughput_rows(c, "Trainer")),
        ("Memory and wall time (median of runs)", memory_rows(c, "Trainer", "train() only, no saving")),
        *variant_rows(res, VARIANT_LABEL, "Trainer"),
        ("Targets", [speed_target_row(c, TARGET_SPEED, "Trainer", w["threads"])]),
    ]


def intro(w: dict, shown: Path) -> str:
    return (f"Generated by `bench/bench_train.py --size {w['size']} --steps {w['steps']} --warmup {w['warmup']} "
            f"--repeats {w['repeats']} --threads {w['threads']}` from `{shown}`. Each run is a fresh subprocess (its own peak RSS); ours and the "
            "Trainer alternate. Tokens/s is steady state: the warm-up steps and the last step (ours validates after "
            "it) are left out. Peak RSS is compared at the end of the last timed step, when both sides have run the same steps. MB are decimal (10^6 bytes).")


def summary(res: dict) -> list[dict]:
    r = res["comparison"]["speed"]["ratio"]
    return [{"target": f"pretraining tokens/s >= {TARGET_SPEED}x the HF Trainer's (CPU, same model, data, threads)",
             "figure": f"{r:.2f}x", "met": r >= TARGET_SPEED}]


def analyse(res: dict) -> list[str]:
    """Why the target is missed (or what bounds the step), in words built from the measured figures."""
    out = speed_missed(res, TARGET_SPEED, "Trainer")
    prof = res.get("profile")
    if prof and prof.get("split"):
        total, parts = profile_parts(prof)
        comp = sum(v for k, v in parts.items() if k.startswith(("forward", "backward")))
        opt = parts.get("optimizer.step (AdamW)", 0.0)
        threads = res["workload"]["threads"]
        util = prof.get("cprofile_cpu_util")
        if threads > 1 and util is not None and util < 0.9 * threads:
            out.append("The profiled run below was contended (see its note): its shares overstate the many small "
                       "elementwise kernels (optimizer, clipping), which suffer most when a thread waits for a core.")
        out.append(f"Both loops run the same model code (transformers' LlamaForCausalLM, the same kernels): forward + backward "
                   f"take {100 * comp / total:.0f}% of our step in the profile, so a loop can only win on the rest.")
        if opt and not ours_fused(res):
            out.append(f"optimizer.step takes {100 * opt / total:.0f}% of our step ({opt / prof['steps']:.3f} s of "
                       f"{total / prof['steps']:.3f} s): on CPU the engine's AdamW runs the single-tensor path (it asks for "
                       f"fused only on CUDA: one small kernel per parameter and per moment update), while the Trainer's "
                       f"default `{res['baseline_optim']}` updates every parameter in one fused kernel.")
        small = sum(parts.get(k, 0.0) for k in ("batch (BatchStream.next + collate)", "clip_grad_norm_", "metrics row + progress", "optimizer.zero_grad"))
        out.append(f"Batch building, clipping, zero_grad and the metrics row together: {100 * small / total:.0f}% of the step.")
        out += next_lever(res)
    return out


def next_lever(res: dict) -> list[str]:
    """Where the rest of the step goes inside the model, against the machine's matmul peak: what a faster loop would
    have to change."""
    import common  # the measuring run's provenance (its machine's matmul peak): in the JSON once written, else this process's

    measured = res.get("provenance") or common._provenance or {}
    ops, peaks = res.get("profile", {}).get("torch_ops"), measured.get("machine", {}).get("matmul_gflops") or {}
    if not ops:
        return []
    shares = {r["op"]: r["share_of_wall"] for r in ops}
    mm = sum(v for k, v in shares.items() if k in ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm"))
    top = ", ".join(f"`{r['op']}` {100 * r['share_of_wall']:.0f}%" for r in ops[:3])
    dtype = "bfloat16" if res["workload"].get("precision") == "bfloat16" else "float32"
    gflops = 6 * res["workload"]["params"] * res["comparison"]["speed"]["ours"] / 1e9
    peak = peaks.get(dtype)
    of_peak = f", {100 * gflops / peak:.0f}% of this machine's measured {dtype} matmul peak ({peak:,.0f} GFLOP/s)" if peak else ""
    return [f"Next lever: the model's own operators, the same on both sides. The torch profiler's top three are {top} of "
            f"the wall time, the matrix products {100 * mm:.0f}% in all; 6 x {res['workload']['params']:,} parameters x "
            f"{res['comparison']['speed']['ours']:,.0f} tokens/s is {gflops:,.0f} GFLOP/s of model matmul work{of_peak}. "
            + ("The step is bound by dtype copies, attention and elementwise kernels more than by matrix products: fusing "
               "them is what torch.compile does, which the section \"CPU levers\" measured slower on a CPU for LoRA; "
               if mm < 0.5 else "The matrix products bound the step: only fewer of them moves it; ")
            + "computing less (the output layer on supervised positions only) is what ours already does."]


REPORT = Comparison("bench_train", "bench_train: our loop vs HF Trainer (pretraining)", "pretraining",
                    "## Training loop vs HF Trainer: pretraining from scratch (`bench/bench_train.py`)", intro, report_rows, analyse,
                    summary)


# --------------------------------------------------------------------------------------------------
# main


def main(argv=None) -> None:
    p = comparison_parser(__doc__, DEFAULT_OUT, steps=20, warmup=5, repeats=2, profile_steps=4)
    p.add_argument("--size", default="small", choices=["tiny", "small"])
    p.add_argument("--no-variant", action="store_true", help="skip the extra run of ours with the 1 MB mmap threshold")
    args = REPORT.start(p, argv, child_prep, child_ours, child_trainer)
    if args is None:
        return
    from rich.console import Console

    console = Console()
    res: dict = {"machine": machine_info()}
    fingerprint = curate(CORPUS, args.workspace, CORPUS, format="text")
    tok_root = args.workspace / "bench-tokenizers"
    tok_root.mkdir(parents=True, exist_ok=True)
    spec = {"workspace": str(args.workspace), "dataset": fingerprint, "size": args.size, "seq_len": args.seq_len,
            "batch_size": args.batch_size, "steps": args.steps, "lr": 3e-3, "warmup_steps": 5, "seed": 0,
            "weight_decay": 0.0, "grad_clip": 1.0, "min_lr_ratio": 0.1,
            "tokenizer_dir": str(tok_root / f"{fingerprint}-{args.size}"), "threads": args.threads,
            "precision": resolved_precision(args.precision)}
    prep = run_child(Path(__file__), "prep", spec, f"tokenizer for '{args.size}' and packed windows")
    threads = args.threads
    res["workload"] = {"size": args.size, "vocab": prep["vocab"], "train_records": prep["train_records"],
                       "windows": prep["windows"], "seq_len": args.seq_len, "batch_size": args.batch_size, "steps": args.steps,
                       "warmup": args.warmup, "repeats": args.repeats, "lr": spec["lr"], "warmup_steps": spec["warmup_steps"],
                       "weight_decay": spec["weight_decay"], "grad_clip": spec["grad_clip"], "min_lr_ratio": spec["min_lr_ratio"],
                       "threads": threads, "dataset": fingerprint, "betas": [0.9, 0.95], "precision": spec["precision"]}
    last = args.steps - 1
    runs = run_pairs(Path(__file__), spec, args.repeats, "ours (training.loop.train)", "HF Trainer",
                     f"{args.steps} steps of '{args.size}'", args.quiet_wait_s, args.warmup, last, threads, console, "bench-train")
    res["workload"]["params"] = runs["ours"][0]["result"]["total_params"]
    record_comparison(res, runs, args.warmup, last, threads)
    res["loss_last_step"] = {k: [r["loss"][-1] for r in runs[k]] for k in ("ours",)}
    if not args.no_profile:
        res["profile"] = profiled_run(Path(__file__), spec, max(2, min(args.warmup, 4)), args.profile_steps, args.quiet_wait_s, "bench-train")
    if not (args.no_variant or args.quick):  # what the engine's LoRA malloc setting would cost a full-weight run
        res["variant"] = variant_run(Path(__file__), spec, VARIANT_ENV, "the 1 MB mmap threshold", args, last, console,
                                     "bench-train", res)
    REPORT.finish(res, runs, args, console)


if __name__ == "__main__":
    main()
