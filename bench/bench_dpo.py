"""Benchmark of DPO with LoRA: our loop vs TRL's `DPOTrainer`, on preference pairs made from the shipped FAQ.

    .venv/bin/python bench/bench_dpo.py [--steps 10] [--warmup 2] [--repeats 1] [--threads 2] [--batch-size 4]
                                        [--pairs 80] [--beta 0.1] [--out FILE] [--results-md FILE] [--no-profile]

TRL is a bench-only dependency (`pip install trl==1.16.0`); nothing outside bench/ imports it.

What it does, all in one run:

1. Builds `--pairs` preference pairs from `examples/data/support_faq.jsonl` (prompt: a question; chosen: its own
   answer; rejected: the answer of another question, drawn with a fixed seed), writes them to the bench workspace
   (default `$TMPDIR/modelcrew-bench`, shared with bench_train.py and bench_lora.py) and curates them there (the
   default 80/10/10 split); the embedded base `smollm2-135m-instruct` is converted once into
   `<workspace>/models/base/` (cached between runs): its GGUF is Q4_1, dequantized to float32 on conversion, so
   both sides train the same dequantized weights, not the original checkpoint's.
2. Runs, each in a fresh subprocess (its own peak RSS), interleaved:
   - **ours**: `training.loop.train()` on a DPO plan (`objective="dpo"`, beta 0.1, LoRA r=8, alpha 16, the engine's
     default dropout, on q/k/v/o_proj); the reference log-probabilities are scored once before the first step, with
     the adapter disabled (the base), for the train and validation pairs;
   - **TRL**: `trl.DPOTrainer` with a `DPOConfig` on the same base loaded with `AutoModelForCausalLM.from_pretrained`
     (float32), a peft `LoraConfig` with the same rank, alpha, dropout and target modules passed as `peft_config`
     with `ref_model=None` (so its reference is the same base with the adapter disabled),
     `precompute_ref_log_probs=True` (scored once before training, as ours; TRL's default scores the reference with
     a second forward at every step), the same beta and sigmoid loss, `max_length` = our `seq_len`, the same AdamW
     betas / clipping / warmup + cosine schedule, the same precision (bf16 autocast where the engine picks it),
     `gradient_checkpointing=False` (TRL's default is True; ours does not checkpoint), no dropout on either side,
     no eval, no saving, `report_to=[]`, `dataloader_num_workers=0`. Its dataset is the pairs already tokenized by
     `training.batches` (prompt, chosen and rejected ids: TRL's own tokenization is skipped, so the token ids are
     identical), in the engine's `BatchStream` order (sequential sampler), collated by TRL's own
     `DataCollatorForPreference` (the chosen rows, then the rejected ones, padded to the longest: the engine's
     layout). Batches are checked to be identical by checksums.
   Tokens/s counts the non-pad tokens of both sequences (prompt + chosen, prompt + rejected) of every pair.
3. Steady-state tokens/s over steps `warmup+1 .. steps-1` (the last is left out: ours validates after it), with
   the same contention accounting as bench_train.py; the reference pass (before step 1) is in neither side's
   steady figure; peak RSS at the end of the last timed step (both sides have scored their reference by then).
4. A profiled run of ours (cProfile, then the torch profiler, over steady steps), the figures to `--out` (JSON)
   and the bench_dpo section of `--results-md` regenerated from it.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

from common import MB, ROOT, TORCH_PACKAGES, Comparison, StepClock, batch_checksum, batch_order, comparison_parser
from common import curate, fmt, free_cores_needed, machine_info, machine_rows, memory_rows, peak_rss_bytes, profile_parts, profiled_run
from common import record_comparison, resolved_precision, result_json, rss_bytes, run_child, run_ours, run_pairs
from common import speed_missed, speed_target_row, throughput_rows, trainer_args, trainer_clock_callback, verdict, write_jsonl
from common import LORA_BASE, LORA_TARGETS, default_dropout, ours_attention, spec_lora_plan

DEFAULT_OUT = result_json("bench_dpo")
TARGET_SPEED = 1.3  # ours / TRL DPOTrainer tokens/s
TARGET_MEMORY = 0.8  # ours / TRL DPOTrainer peak RSS, at most
BASE = LORA_BASE
DATA = ROOT / "examples" / "data" / "support_faq.jsonl"
TARGETS = LORA_TARGETS
PACKAGES = TORCH_PACKAGES + ("trl", "datasets")
QUICK_PAIRS = 60  # --quick: fewer pairs, so that both reference passes stay short
TRL = "TRL DPOTrainer"
OURS_LOSS = ("PreferenceLoss: the output layer on answer positions only, a float32 log-softmax over them, "
             "-log sigmoid(beta x margin) per pair")
TRL_LOSS = ("its fused LM head (trl.kernels.ChunkedLogProbFunction): the output layer in tiles over every position "
            "(on CPU it scores prompt and padding positions too: its compact path is for CUDA / XPU only), with each "
            "token's entropy, mean logit and top-1 for its metrics; sigmoid loss")


# --------------------------------------------------------------------------------------------------
# data


def faq_pairs(n: int, seed: int = 0) -> list[dict]:
    """`n` pairs over the FAQ's questions in order (then again, with other rejected answers): chosen is the
    question's own answer, rejected the answer of another question drawn with `seed`."""
    faq = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    rng, seen, out, i = random.Random(seed), set(), [], 0
    while len(out) < n:
        q = i % len(faq)
        i += 1
        j = rng.randrange(len(faq) - 1)
        j += j >= q
        if (q, j) in seen or faq[j]["answer"] == faq[q]["answer"]:
            continue
        seen.add((q, j))
        out.append({"prompt": faq[q]["question"], "chosen": faq[q]["answer"], "rejected": faq[j]["answer"]})
    return out


def prompt_length(example) -> int:
    """Where a pair's answers start: its first supervised position (the same in both rows)."""
    import numpy as np

    from training.batches import IGNORE

    chosen, rejected = example.rows
    start = int(np.argmax(chosen.labels != IGNORE))
    if not (np.array_equal(chosen.input_ids[:start], rejected.input_ids[:start])
            and int(np.argmax(rejected.labels != IGNORE)) == start
            and (chosen.labels[start:] != IGNORE).all() and (rejected.labels[start:] != IGNORE).all()):
        raise SystemExit("bench_dpo: a pair's rows do not share their prompt, or supervise more than the answer")
    return start


def trl_row(example) -> dict:
    """A pair as TRL's tokenized dataset holds it: prompt ids, then each answer's ids (everything after the prompt:
    what ours supervises, so TRL's completion mask is our labels' mask)."""
    start = prompt_length(example)
    chosen, rejected = example.rows
    return {"prompt_ids": chosen.input_ids[:start].tolist(), "chosen_ids": chosen.input_ids[start:].tolist(),
            "rejected_ids": rejected.input_ids[start:].tolist()}


def pair_tokens(example) -> int:
    return sum(len(r.input_ids) for r in example.rows)


# --------------------------------------------------------------------------------------------------
# children


def child_prep(spec: dict) -> dict:
    """Convert the embedded base once; describe the pairs both sides will train on."""
    import statistics

    from training.batches import fitted_examples, read_split
    from training.data.store import datasets_dir
    from training.models import base_dir, load_base

    t0 = time.perf_counter()
    path = base_dir(BASE, Path(spec["workspace"]))
    convert_s = time.perf_counter() - t0
    model, tok = load_base(path)
    where = datasets_dir(Path(spec["workspace"])) / spec["dataset"]
    records = read_split(where, "train")
    examples, fit = fitted_examples(tok, records, "preference", spec["seq_len"])
    val, _ = fitted_examples(tok, read_split(where, "val"), "preference", spec["seq_len"])
    rows = [len(r.input_ids) for e in examples for r in e.rows]
    prompts = [prompt_length(e) for e in examples]
    answers = [len(r.input_ids) - p for e, p in zip(examples, prompts) for r in e.rows]
    order = batch_order(len(examples), spec["batch_size"], spec["seed"], spec["steps"])
    widths = [max(len(r.input_ids) for i in b for r in examples[i].rows) for b in order]
    real = [sum(pair_tokens(examples[i]) for i in b) for b in order]
    return {"base_dir": str(path), "convert_or_lookup_s": convert_s, "params": sum(p.numel() for p in model.parameters()),
            "train_records": len(records), "pairs": len(examples), "val_pairs": len(val), "fit": fit.as_dict(),
            "len_min": min(rows), "len_mean": statistics.fmean(rows), "len_max": max(rows),
            "prompt_mean": statistics.fmean(prompts), "answer_mean": statistics.fmean(answers),
            "answer_fraction": sum(answers) / sum(rows), "tokens_per_step_mean": statistics.fmean(real),
            "pad_fraction": 1 - sum(real) / sum(w * 2 * spec["batch_size"] for w in widths)}


def child_ours(spec: dict, profile: bool = False) -> dict:
    """Our loop on the DPO plan; the reference pass (rows scored, seconds) timed from outside."""
    from training import loop

    timing: dict = {}
    real = loop.reference_logps

    def timed(*args, **kwargs):
        t = time.perf_counter()
        scored = real(*args, **kwargs)
        timing.update(reference_s=time.perf_counter() - t, reference_rows=scored)
        return scored

    loop.reference_logps = timed
    out = run_ours({**spec, "tokenizer_dir": None}, spec_lora_plan(spec, objective="dpo", beta=spec["beta"]), profile)
    return {**out, **timing}


def child_baseline(spec: dict) -> dict:
    import datasets
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401
    import trl  # noqa: F401
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from training.batches import build_examples, read_split
    from training.data.store import datasets_dir

    rss_imports = rss_bytes()
    t0 = time.perf_counter()
    clock = StepClock()
    path = spec["base_dir"]
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    records = read_split(datasets_dir(Path(spec["workspace"])) / spec["dataset"], "train")
    examples = build_examples(tok, records, "preference", spec["seq_len"])
    order = batch_order(len(examples), spec["batch_size"], spec["seed"], spec["steps"])
    used = [i for b in order for i in b]
    # the steps' pairs in the engine's order, then the train pairs no step reaches: TRL scores its reference over
    # its whole training dataset, as ours does over the train (and validation) pairs
    rest = sorted(set(range(len(examples))) - set(used))
    dataset = datasets.Dataset.from_list([trl_row(examples[i]) for i in used + rest])

    checksums: list = []

    class Recorded:
        """TRL's own collator, with a checksum of every training batch (not of the reference pass's)."""

        def __init__(self, collator) -> None:
            self.collator, self.on = collator, False

        def __call__(self, features, *args, **kwargs):
            batch = self.collator(features, *args, **kwargs)
            if self.on:
                checksums.append(batch_checksum(batch))
            return batch

    timing: dict = {}
    losses: list[float] = []

    class BenchDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # already tokenized by training.batches: the engine's token ids

        def _precompute_ref_logps(self, dataset, name, batch_size):
            t = time.perf_counter()
            out = super()._precompute_ref_logps(dataset, name, batch_size)
            timing.update(reference_s=time.perf_counter() - t, reference_rows=2 * len(dataset))
            return out

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            losses.append(float((out[0] if isinstance(out, tuple) else out).detach()))
            return out

    collator = Recorded(DataCollatorForPreference(pad_token_id=tok.pad_token_id, max_length=spec["seq_len"]))
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench_dpo_trl_") as out_dir:
        args = trainer_args(spec, out_dir, DPOConfig, gradient_checkpointing=False, beta=spec["beta"],
                            loss_type=["sigmoid"], max_length=spec["seq_len"], precompute_ref_log_probs=True,
                            disable_dropout=spec["lora_dropout"] == 0)
        lora = LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"], lora_dropout=spec["lora_dropout"],
                          target_modules=TARGETS, task_type="CAUSAL_LM")
        trainer = BenchDPOTrainer(model=model, ref_model=None, args=args, train_dataset=dataset, processing_class=tok,
                                  data_collator=collator, peft_config=lora, callbacks=[trainer_clock_callback(clock)])
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        setup_s = time.perf_counter() - t0
        collator.on = True
        trainer.train()
    wall = time.perf_counter() - t0
    opt = trainer.optimizer
    return {"rss_after_imports": rss_imports, "wall_s": wall, "setup_s": setup_s, "peak_rss_train": peak_rss_bytes(),
            "peak_rss_total": peak_rss_bytes(), "clock": clock.as_dict(),
            "tokens_per_step": [sum(pair_tokens(examples[i]) for i in b) for b in order], "checksums": checksums,
            "optim": str(trainer.args.optim.value), "optimizer_class": type(getattr(opt, "optimizer", opt)).__name__,
            "optimizer_fused": bool(opt.param_groups[0].get("fused")), "trainable_params": trainable, "loss": losses,
            "reference_adapter": "ref" in trainer.model.peft_config, **timing}


# --------------------------------------------------------------------------------------------------
# report


def reference_row(res: dict) -> tuple[str, str]:
    o, b = res["raw"]["ours"][0], res["raw"]["baseline"][0]
    say = lambda r: (f"{fmt(r['reference_rows'])} sequences in {r['reference_s']:.1f} s"
                     if r.get("reference_s") is not None else "n/a")
    return ("reference log-probs, scored once before step 1 (first run of each side; not in the steady figures): ours / TRL",
            f"{say(o)} (train + validation pairs) / {say(b)} (its training dataset)")


def report_rows(res: dict) -> list[tuple[str, list[tuple[str, str]]]]:
    m, w, c = res["machine"], res["workload"], res["comparison"]
    mem = c["memory_ratio"]
    short_mem = "" if mem <= TARGET_MEMORY else f" (over by {100 * (mem / TARGET_MEMORY - 1):.0f}%: {fmt(c['memory_over_target_mb'])} MB too many)"
    raw_o, raw_b = res["raw"]["ours"], res["raw"]["baseline"]
    first = lambda runs: ", ".join(f"{r['loss'][0]:.4f}" for r in runs if r.get("loss"))
    return [
        ("Machine", machine_rows(m, PACKAGES)),
        ("Workload", [
            ("base model", f"{BASE} ({fmt(w['params'])} parameters, float32), converted once from the embedded GGUF "
                           "(Q4_1, dequantized on conversion: both sides train the same dequantized weights)"),
            ("adapter", (f"LoRA r={w['rank']}, alpha {w['alpha']}, dropout {w['lora_dropout']} on {', '.join(TARGETS)}: "
                        f"{fmt(w['trainable_ours'])} trainable parameters (ours) / {fmt(w['trainable_baseline'])} (TRL)")),
            ("data", (f"{fmt(w['pairs_built'])} pairs built from {DATA.relative_to(ROOT)} (chosen: the question's answer; "
                      f"rejected: another question's), curated in the workspace: {fmt(w['train_records'])} train pairs -> "
                      f"{fmt(w['pairs'])} pairs trained ({fmt(w['val_pairs'])} validation pairs, which ours also scores "
                      f"for its reference); sequences {w['len_min']}-{w['len_max']} tokens (mean {w['len_mean']:.0f}: "
                      f"prompt {w['prompt_mean']:.0f}, answer {w['answer_mean']:.0f})")),
            ("batch / length cap", (f"{w['batch_size']} pairs = {2 * w['batch_size']} sequences (the chosen, then the "
                                    f"rejected) / seq_len {w['seq_len']} (TRL: max_length); each batch padded to its longest "
                                    f"sequence ({100 * w['pad_fraction']:.0f}% padding); tokens/s counts the non-pad tokens "
                                    f"of both sequences of every pair (mean {fmt(w['tokens_per_step_mean'], 0)} per step)")),
            ("objective", (f"DPO, sigmoid loss, beta {w['beta']}; reference: the base with the adapter disabled, scored once "
                           "before the first step on both sides (TRL: ref_model=None with peft_config, "
                           "precompute_ref_log_probs=True)")),
            ("steps per run / timed steps", f"{w['steps']} / {w['warmup'] + 1}-{w['steps'] - 1} (first {w['warmup']} are warm-up; the last is left out)"),
            ("runs per side (interleaved)", str(w["repeats"])),
            ("optimizer", f"AdamW betas ({w['betas'][0]}, {w['betas'][1]}), wd {w['weight_decay']}, clip {w['grad_clip']}, lr {w['lr']}, warmup {w['warmup_steps']}, cosine to {w['min_lr_ratio']:g}x"),
            ("optimizer implementation: ours / TRL", f"{ours_optimizer(res)} / {res['baseline_optim']}"),
            ("loss: ours / TRL", f"{res.get('ours_objective') or OURS_LOSS} / {res.get('baseline_objective') or TRL_LOSS}"),
            ("TRL settings that differ from its defaults", "gradient_checkpointing=False (ours does not checkpoint), "
                                                           "precompute_ref_log_probs=True, its tokenization skipped (the "
                                                           "engine's token ids), a sequential sampler; report_to=[], no eval, no saving"),
            ("loss at step 1 (the policy is its reference: ln 2 expected): ours / TRL", f"{first(raw_o)} / {first(raw_b)} (ln 2 = {w['ln2']:.4f})"),
            ("identical batches (checksums of every batch)", "yes" if c["identical_batches"] else "NO"),
            ("torch threads", str(w["threads"])),
            ("precision (both sides)", "bfloat16 autocast, float32 master weights" if w.get("precision") == "bfloat16" else "float32"),
        ]),
        ("Steady-state throughput", throughput_rows(c, TRL)),
        ("Memory and wall time (median of runs)", memory_rows(c, TRL, "setup, reference pass and train(); no saving")
         + [reference_row(res)]),
        ("Targets", [
            speed_target_row(c, TARGET_SPEED, TRL, w["threads"]),
            (f"peak RSS <= {TARGET_MEMORY}x the {TRL}'s", f"{mem:.2f}x -> {verdict(mem <= TARGET_MEMORY)}{short_mem}"),
        ]),
    ]


def ours_optimizer(res: dict) -> str:
    o = res.get("ours_optimizer") or {}
    path = "fused" if o.get("fused") else ("foreach" if o.get("foreach") else "single-tensor path")
    return f"{o.get('class', 'AdamW')} (fused={o.get('fused')}, foreach={o.get('foreach')}: {path})"


def summary(res: dict) -> list[dict]:
    c = res["comparison"]
    return [{"target": f"DPO (LoRA) tokens/s >= {TARGET_SPEED}x TRL DPOTrainer's (CPU, same model, data, threads)",
             "figure": f"{c['speed']['ratio']:.2f}x", "met": c["speed"]["ratio"] >= TARGET_SPEED},
            {"target": f"DPO (LoRA) peak RSS <= {TARGET_MEMORY}x TRL DPOTrainer's", "figure": f"{c['memory_ratio']:.2f}x",
             "met": c["memory_ratio"] <= TARGET_MEMORY}]


def analyse(res: dict) -> list[str]:
    out = []
    c, w = res["comparison"], res["workload"]
    o, b = c["ours"], c["baseline"]
    mem = c["memory_ratio"]
    c["memory_over_target_mb"] = (o["peak_rss_train"] - TARGET_MEMORY * b["peak_rss_train"]) / MB
    out += speed_missed(res, TARGET_SPEED, TRL, "Speed target")
    if mem > TARGET_MEMORY:
        out.append(f"Memory target missed: ours peaks at {fmt(o['peak_rss_train'] / MB)} MB through the last timed step, "
                   f"{mem:.2f}x the {TRL}'s {fmt(b['peak_rss_train'] / MB)} MB against at most {TARGET_MEMORY}x "
                   f"({fmt(TARGET_MEMORY * b['peak_rss_train'] / MB)} MB): over by {100 * (mem / TARGET_MEMORY - 1):.0f}%.")
    out.append(f"What differs between the sides is mostly around the decoder (both run transformers' LlamaForCausalLM "
               f"with peft's LoRA layers on the same batches; {ours_attention(res)}): ours applies the output layer to answer positions only "
               f"({100 * w['answer_fraction']:.0f}% of the tokens here) and computes just their log-probabilities; TRL's "
               "fused head scores every position on a CPU, prompt and padding included, and also computes each token's "
               "entropy, mean logit and top-1 for its metrics. "
               + ("Ours holds the frozen linear weights in bfloat16 once; TRL holds the float32 base and autocast casts "
                  "its weights to bfloat16 at every use, keeping the casts for backward."
                  if w.get("precision") == "bfloat16" else "Both hold the same float32 base."))
    if o["peak_rss_total"] > o["peak_rss_train"] * 1.02:
        out.append(f"The final export raises ours to {fmt(o['peak_rss_total'] / MB)} MB: `export_model` merges the adapter into "
                   "a fresh float32 base loaded from disk (`merged_copy`), a second copy of the base beside the trained one.")
    prof = res.get("profile")
    if prof and prof.get("split"):
        total, parts = profile_parts(prof)
        comp = sum(v for k, v in parts.items() if k.startswith(("forward", "backward")))
        opt = parts.get("optimizer.step (AdamW)", 0.0)
        out.append(f"In our profiled DPO steps forward + backward take {100 * comp / total:.0f}% of the step and the optimizer "
                   f"{100 * opt / total:.0f}% (it updates only the {fmt(w['trainable_ours'])} adapter parameters); the rest "
                   f"is {100 * max(0.0, total - comp - opt) / total:.0f}%.")
        ops = prof.get("torch_ops") or []
        if ops:
            top = ", ".join(f"`{x['op']}` {100 * x['self_cpu_s'] / max(prof.get('torch_profile_seconds') or 1, 1e-9):.0f}%"
                            for x in ops[:4])
            out.append(f"The step's time goes to the model's operators: {top} of the wall time in the torch profiler.")
    return out


def intro(w: dict, shown: Path) -> str:
    return (f"Generated by `bench/bench_dpo.py --steps {w['steps']} --warmup {w['warmup']} --repeats {w['repeats']} "
            f"--threads {w['threads']} --batch-size {w['batch_size']} --pairs {w['pairs_built']}` from `{shown}`. Our DPO "
            f"(`objective=\"dpo\"`, LoRA) against TRL's `DPOTrainer` (trl {w.get('trl_version', '?')}) on the same model, "
            "pairs, batches, threads and precision. Each run is a fresh subprocess (its own peak RSS); the two sides "
            "alternate. Tokens/s is steady state over the non-pad tokens of both sequences of every pair: the warm-up "
            "steps (the reference pass before step 1 included) and the last step (ours validates after it) are left out. "
            "Peak RSS is compared at the end of the last timed step, when both sides have scored their reference and run "
            "the same steps. MB are decimal (10^6 bytes).")


REPORT = Comparison("bench_dpo", "bench_dpo: our DPO vs TRL DPOTrainer (LoRA)", "DPO",
                    "## DPO (LoRA) vs TRL's DPOTrainer (`bench/bench_dpo.py`)", intro, report_rows, analyse, summary)


# --------------------------------------------------------------------------------------------------
# main


def main(argv=None) -> None:
    p = comparison_parser(__doc__, DEFAULT_OUT, steps=10, warmup=2, repeats=1, profile_steps=2)
    p.set_defaults(batch_size=4)  # pairs: 8 sequences a step, as bench_lora's batch of 8
    p.add_argument("--pairs", type=int, default=80, help=f"preference pairs built from the FAQ (--quick: {QUICK_PAIRS})")
    p.add_argument("--beta", type=float, default=0.1, help="DPO's beta, on both sides")
    p.add_argument("--profile", action="store_true", help="also profile ours (about 2 minutes more: off by default, "
                   "as both targets are met and make bench keeps to its time)")
    args = REPORT.start(p, argv, child_prep, child_ours, child_baseline)
    if args is None:
        return
    args.no_profile = args.no_profile or not args.profile
    if args.quick:
        args.pairs = min(args.pairs, QUICK_PAIRS)
    from importlib.metadata import version

    from rich.console import Console

    console = Console()
    res: dict = {"machine": machine_info(PACKAGES)}
    source = write_jsonl(args.workspace / f"bench_dpo_pairs_{args.pairs}.jsonl", faq_pairs(args.pairs))
    fingerprint = curate(str(source), args.workspace, source.name)
    spec = {"workspace": str(args.workspace), "dataset": fingerprint, "seq_len": args.seq_len, "batch_size": args.batch_size,
            "steps": args.steps, "lr": 1e-4, "warmup_steps": 2, "seed": 0, "weight_decay": 0.0, "grad_clip": 1.0,
            "min_lr_ratio": 0.1, "rank": 8, "alpha": 16, "lora_dropout": default_dropout(), "beta": args.beta,
            "threads": args.threads, "precision": resolved_precision(args.precision)}
    prep = run_child(Path(__file__), "prep", spec, f"{BASE}: converting once (about 35 s) or reusing; the pairs")
    spec["base_dir"] = prep["base_dir"]
    last = args.steps - 1
    runs = run_pairs(Path(__file__), spec, args.repeats, "ours (training.loop.train, DPO + LoRA)", TRL,
                     f"{args.steps} DPO steps", args.quiet_wait_s, args.warmup, last, args.threads, console, "bench-dpo")
    res["workload"] = {**{k: spec[k] for k in ("seq_len", "batch_size", "steps", "lr", "warmup_steps", "weight_decay", "grad_clip",
                                               "min_lr_ratio", "rank", "alpha", "lora_dropout", "beta", "threads", "dataset",
                                               "precision")},
                       **{k: prep[k] for k in ("params", "train_records", "pairs", "val_pairs", "fit", "len_min", "len_mean",
                                               "len_max", "prompt_mean", "answer_mean", "answer_fraction",
                                               "tokens_per_step_mean", "pad_fraction")},
                       "pairs_built": args.pairs, "warmup": args.warmup, "repeats": args.repeats, "betas": [0.9, 0.95],
                       "trainable_ours": runs["ours"][0]["result"]["trainable_params"],
                       "trainable_baseline": runs["baseline"][0]["trainable_params"], "ln2": math.log(2),
                       "trl_version": version("trl")}
    record_comparison(res, runs, args.warmup, last, args.threads)
    res["targets"] = {"speed": TARGET_SPEED, "memory": TARGET_MEMORY,  # and the contention note's thresholds
                      "uncontended_if_others_below_cores": {str(t): free_cores_needed(t) for t in (1, 2)}}
    res["ours_objective"], res["baseline_objective"] = OURS_LOSS, TRL_LOSS  # run_ours names the SFT objective
    if not args.no_profile:
        res["profile"] = profiled_run(Path(__file__), spec, args.warmup, args.profile_steps, args.quiet_wait_s, "bench-dpo")
    REPORT.finish(res, runs, args, console)


if __name__ == "__main__":
    main()
