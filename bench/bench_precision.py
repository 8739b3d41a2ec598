"""Benchmark of precision on the CPU, float32 against bfloat16 in one run: LoRA training, evaluation's scoring and
the server's decoding.

    .venv/bin/python bench/bench_precision.py [--steps 10] [--repeats 2] [--max-tokens 32] [--workspace DIR] [--quick]

The model throughout is the embedded SmolLM2-135M-Instruct (dequantized from its Q4_1 GGUF); the data the example
FAQ pairs, curated into the workspace as `common.faq_lora_plan` does.
1. training: the engine's own runs (`training.loop.train`), one after the other in this process: LoRA rank 8,
   batch 8, the same seed, data and order, `precision: float32` then `precision: bfloat16` (matmuls under CPU
   autocast; weights, optimizer and the loss's log-softmax stay float32). Tokens/s is the median of the engine's own
   per-step figure over steps 3 .. steps-1; the loss gap is the largest relative difference at any step.
2. evaluation: `training.evaluate.record_losses` (what evaluation's perplexities score) over the dataset's
   validation and test examples, built as evaluation builds them (`fitted_examples` at the plan's seq_len), with the
   base model's float32 weights, at precision float32 and bfloat16 (autocast). Tokens/s: the examples' tokens
   (padding left out) over the pass's time, median of --repeats passes, the two precisions alternating which goes
   first; the gap is the largest relative difference of any record's summed loss.
3. serving: the server's own engine (`serving.engine.LoadedModel` and its `Batcher` thread, in this process) loads
   the base with float32 and with bfloat16 weights (the bench overrides `LoadedModel._dtype`) and generates exactly
   --max-tokens tokens greedily (temperature 0, ignore_eos) for 1 request and for 8 concurrent ones (FAQ questions in
   the chat template, submitted together). Tokens/s: generated tokens over the time from submission to the last
   finish (the prefill included), median of --repeats, alternating order; agreement: how many leading tokens of each
   prompt's greedy completion are the same in both.
Beside them, the machine's measured matmul peak (2048 x 2048, float32 and bfloat16), so a step can be read against
the physical limit. Decision rules the section applies (each "pays" or not):
training: bfloat16 >= 1.2x float32's tokens/s with the loss within 1% at every step; evaluation: >= 1.2x tokens/s
with every record's loss within 1%; serving: >= 1.2x tokens/s at both 1 and 8 requests, with the first 16 greedy
tokens the same as float32's on at least 7 of the 8 prompts.
Writes bench/results/bench_precision.json and its section of bench/RESULTS.md (`--quick`: 5 training steps, 1
repeat, 16 tokens, into bench/quick/).
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

from common import (DEFAULT_WORKSPACE, ROOT, faq_lora_plan, result_json, run_curve, stamp, stamp_rows, table,
                    write_json, write_section)
from common import parse

OUT = result_json("bench_precision")
FAQ = ROOT / "examples" / "data" / "support_faq.jsonl"
PAYS_SPEED, PAYS_LOSS = 1.2, 0.01  # training and evaluation: speed-up and the largest relative loss difference
SERVE_CONCURRENT = (1, 8)  # requests decoded at once
AGREE_TOKENS, AGREE_PROMPTS = 16, 7  # serving pays only if the first 16 greedy tokens agree on >= 7 of the 8 prompts
QUICK_SIZES = {"steps": 5, "repeats": 1, "max_tokens": 16}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="LoRA steps per training run (>= 4)")
    ap.add_argument("--repeats", type=int, default=2, help="timed passes of evaluation and serving per precision")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens each served request generates (>= 16)")
    ap.add_argument("--workspace", type=Path, default=DEFAULT_WORKSPACE)
    ap.add_argument("--quick", action="store_true", help="5 steps, 1 repeat, 16 tokens (bench/quick/)")
    a = parse(ap)
    if a.quick:
        a.steps, a.repeats, a.max_tokens = QUICK_SIZES["steps"], QUICK_SIZES["repeats"], QUICK_SIZES["max_tokens"]
    a.max_tokens = max(a.max_tokens, AGREE_TOKENS)
    import torch

    from common import matmul_gflops

    peaks = matmul_gflops()
    plan_of = lambda precision: faq_lora_plan(a.workspace, a.steps, precision=precision)  # noqa: E731
    training = bench_training(plan_of, a)
    evaluation = bench_evaluation(plan_of("float32"), a)
    serving = bench_serving(plan_of("float32"), a)
    out = {"steps": a.steps, "repeats": a.repeats, "max_tokens": a.max_tokens, "matmul_gflops": peaks,
           "training": training, "evaluation": evaluation, "serving": serving, "threads": torch.get_num_threads(),
           "rank": 8, "batch": 8, "seq_len": 256, "pays_speed": PAYS_SPEED, "pays_loss": PAYS_LOSS,
           "agree_tokens": AGREE_TOKENS, "agree_prompts": AGREE_PROMPTS, "concurrent": list(SERVE_CONCURRENT),
           "first_timed_step": 3, "engine_cpu_weights": engine_cpu_weights(), **stamp()}
    # figures kept at top level as before (bench/summary.py and older readers)
    out["runs"], out["speedup"], out["max_relative_loss_gap"], out["pays"] = (
        training["runs"], training["speedup"], training["max_relative_loss_gap"], training["pays"])
    n = len(serving["agreement"])
    out["summary"] = [
        {"target": f"bfloat16 autocast pays for LoRA training on this CPU (>= {PAYS_SPEED}x tokens/s, loss within "
                   f"{PAYS_LOSS:.0%} of float32)",
         "figure": f"{training['speedup']:.2f}x, loss gap {training['max_relative_loss_gap']:.2%}", "met": training["pays"]},
        {"target": f"bfloat16 autocast pays for evaluation's scoring on this CPU (>= {PAYS_SPEED}x tokens/s, every "
                   f"record's loss within {PAYS_LOSS:.0%})",
         "figure": f"{evaluation['speedup']:.2f}x, loss gap {evaluation['max_relative_loss_gap']:.2%}",
         "met": evaluation["pays"]},
        {"target": f"bfloat16 weights pay for serving on this CPU (>= {PAYS_SPEED}x tokens/s at 1 and 8 requests, first "
                   f"{AGREE_TOKENS} greedy tokens as float32's on >= {AGREE_PROMPTS} of {n} prompts)",
         "figure": ", ".join(f"{c} req {serving['speedup'][str(c)]:.2f}x" for c in SERVE_CONCURRENT)
                   + f", {serving['agree_prompts']}/{n} agree", "met": serving["pays"]}]
    write_json(OUT, out)
    lines = section(out, a)
    write_section("bench_precision", lines)
    print("\n".join(lines[5:-1]))
    print(json.dumps({k: out[k]["speedup"] for k in ("training", "evaluation", "serving")}))


# --------------------------------------------------------------------------------------------------
# 1. training


def bench_training(plan_of, a) -> dict:
    from training.loop import train

    runs = {}
    for precision in ("float32", "bfloat16"):
        run_id = f"precision-{precision}-{int(time.time())}"
        print(f"training, {precision}: {a.steps} steps ...", flush=True)
        result = train(plan_of(precision), a.workspace, run_id, show_progress=False)
        runs[precision] = {"run_id": run_id, "recorded_precision": result.precision,
                           **run_curve(a.workspace, run_id, a.steps)}
    f32, b16 = runs["float32"], runs["bfloat16"]
    speedup = b16["tokens_per_s"] / f32["tokens_per_s"]
    gap = max(abs(b16["losses"][s] - f32["losses"][s]) / f32["losses"][s] for s in f32["losses"])
    return {"runs": runs, "speedup": speedup, "max_relative_loss_gap": gap,
            "pays": speedup >= PAYS_SPEED and gap <= PAYS_LOSS}


# --------------------------------------------------------------------------------------------------
# 2. evaluation's scoring


def bench_evaluation(plan, a) -> dict:
    import torch

    from training.batches import fitted_examples, read_split
    from training.data.store import datasets_dir, load_summary
    from training.evaluate import record_losses
    from training.models import base_dir, load_base

    device = torch.device("cpu")
    model, tok = load_base(base_dir(plan.base_model, a.workspace))
    model.to(device).eval()
    fmt = load_summary(a.workspace, plan.dataset).format
    examples = []
    for split in ("val", "test"):
        examples += fitted_examples(tok, read_split(datasets_dir(a.workspace) / plan.dataset, split), fmt, plan.seq_len)[0]
    tokens = sum(len(e.input_ids) for e in examples)
    print(f"evaluation: {len(examples)} examples ({tokens:,} tokens), {a.repeats} passes per precision ...", flush=True)
    score = lambda precision: record_losses(model, examples, device, tok.pad_token_id, precision=precision)  # noqa: E731
    for precision in ("float32", "bfloat16"):  # warm-up: oneDNN's kernels for each precision
        record_losses(model, examples[:8], device, tok.pad_token_id, precision=precision)
    times: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    losses = {}
    for rep in range(a.repeats):
        for precision in (("float32", "bfloat16") if rep % 2 == 0 else ("bfloat16", "float32")):
            t0 = time.perf_counter()
            losses[precision] = score(precision)
            times[precision].append(time.perf_counter() - t0)
    tps = {p: tokens / statistics.median(t) for p, t in times.items()}
    gaps = [abs(b[0] - f[0]) / f[0] for f, b in zip(losses["float32"], losses["bfloat16"]) if f[0] > 0]
    speedup = tps["bfloat16"] / tps["float32"]
    gap = max(gaps)
    return {"examples": len(examples), "tokens": tokens, "batch": 8, "seconds": times, "tokens_per_s": tps,
            "speedup": speedup, "max_relative_loss_gap": gap, "median_relative_loss_gap": statistics.median(gaps),
            "pays": speedup >= PAYS_SPEED and gap <= PAYS_LOSS}


# --------------------------------------------------------------------------------------------------
# 3. the server's decoding


def bench_serving(plan, a) -> dict:
    import torch

    from serving.engine import Batcher, LoadedModel, Request
    from training.batches import render_chat
    from training.models import base_dir

    model_dir = base_dir(plan.base_model, a.workspace)

    class Recording(Batcher):
        """The engine's batcher, keeping each request's generated token ids (its events carry text)."""

        def __init__(self, loaded) -> None:
            super().__init__(loaded, max_batch=32)
            self.generated: dict[int, list[int]] = {}

        def _next(self, row, logits, logp) -> None:
            super()._next(row, logits, logp)
            self.generated[id(row.req)] = row.generated

    engines = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        loaded = type(f"Loaded_{name}", (LoadedModel,), {"_dtype": lambda self, d=dtype: d})(model_dir, name, "cpu")
        assert next(loaded.model.parameters()).dtype == dtype
        batcher = Recording(loaded)
        batcher.start()
        engines[name] = batcher
    tok = engines["float32"].loaded.tokenizer
    questions = [json.loads(line)["question"] for line in FAQ.read_text(encoding="utf-8").splitlines() if line.strip()]
    prompts = [render_chat(tok, [{"role": "user", "content": q}], add_generation_prompt=True)
               for q in questions[:max(SERVE_CONCURRENT)]]

    def generate(batcher, group: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
        """Submit `group` together; seconds until the last finished, and each request's token ids."""
        done, errors = threading.Semaphore(0), []

        def emit(event: dict) -> None:
            if event["type"] == "error":
                errors.append(event["message"])
            if event["type"] in ("finish", "error"):
                done.release()

        reqs = [Request(prompt_ids=p, max_tokens=max_tokens, temperature=0.0, ignore_eos=True, emit=emit) for p in group]
        t0 = time.perf_counter()
        batcher.submit(*reqs)
        for _ in reqs:
            done.acquire()
        seconds = time.perf_counter() - t0
        if errors:
            raise SystemExit(f"serving failed: {errors[0]}")
        out = [batcher.generated.pop(id(r)) for r in reqs]
        assert all(len(g) == max_tokens for g in out), [len(g) for g in out]
        return seconds, out

    for batcher in engines.values():  # warm-up
        generate(batcher, prompts[:2], 4)
    tps: dict[str, dict[str, float]] = {}
    seconds: dict[str, dict[str, list[float]]] = {}
    outputs: dict[str, list[list[int]]] = {}
    for c in SERVE_CONCURRENT:
        print(f"serving: {c} request(s) x {a.max_tokens} tokens, {a.repeats} repeats per precision ...", flush=True)
        times: dict[str, list[float]] = {"float32": [], "bfloat16": []}
        for rep in range(a.repeats):
            for name in (("float32", "bfloat16") if rep % 2 == 0 else ("bfloat16", "float32")):
                t, generated = generate(engines[name], prompts[:c], a.max_tokens)
                times[name].append(t)
                if c == max(SERVE_CONCURRENT):
                    outputs[name] = generated
        seconds[str(c)] = times
        tps[str(c)] = {name: c * a.max_tokens / statistics.median(t) for name, t in times.items()}
    for batcher in engines.values():
        batcher.stop()
        batcher.join()
    agreement = [common_prefix(f, b) for f, b in zip(outputs["float32"], outputs["bfloat16"])]
    agree = sum(n >= AGREE_TOKENS for n in agreement)
    speedup = {c: t["bfloat16"] / t["float32"] for c, t in tps.items()}
    return {"prompt_tokens": [len(p) for p in prompts], "seconds": seconds, "tokens_per_s": tps, "speedup": speedup,
            "agreement": agreement, "agree_prompts": agree,
            "pays": all(s >= PAYS_SPEED for s in speedup.values()) and agree >= AGREE_PROMPTS}


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def engine_cpu_weights() -> str:
    """The dtype the server's engine, as it is in this tree, loads weights in on this machine's CPU."""
    from types import SimpleNamespace

    import torch

    from serving.engine import LoadedModel

    return str(LoadedModel._dtype(SimpleNamespace(device=torch.device("cpu")))).removeprefix("torch.")


# --------------------------------------------------------------------------------------------------
# the section


def section(out: dict, a) -> list[str]:
    peaks, tr, ev, sv = out["matmul_gflops"], out["training"], out["evaluation"], out["serving"]
    f32, b16 = tr["runs"]["float32"], tr["runs"]["bfloat16"]
    yes = lambda met: "yes" if met else "no"  # noqa: E731
    n = len(sv["agreement"])
    serve_rows = [(f"serving, {c} request{'s' if c > 1 else ''} x {a.max_tokens} tokens: float32 / bfloat16 weights",
                   f"{sv['tokens_per_s'][str(c)]['float32']:.1f} / {sv['tokens_per_s'][str(c)]['bfloat16']:.1f} tokens/s "
                   f"(**{sv['speedup'][str(c)]:.2f}x**)") for c in SERVE_CONCURRENT]
    engine = out["engine_cpu_weights"]
    verdict_text = ("bfloat16 weights paid for serving here" if sv["pays"] else
                    "bfloat16 weights did not pay for serving here")
    if (engine == "bfloat16") == sv["pays"]:
        engine_text = (f"{verdict_text}, and the server's engine as measured (`serving/engine.py`, `LoadedModel._dtype`) "
                       f"loads {engine} weights on this CPU, as the measurement says it should.")
    else:
        engine_text = (f"{verdict_text}, but the server's engine as measured (`serving/engine.py`, `LoadedModel._dtype`) "
                       f"loads {engine} weights on this CPU: the measurement says it should not.")
    return [
        "", "## Precision on the CPU: training, evaluation, serving (`bench/bench_precision.py`)", "",
        f"Generated by `bench/bench_precision.py --steps {a.steps} --repeats {a.repeats} --max-tokens {a.max_tokens}` from "
        "`bench/results/bench_precision.json`. SmolLM2-135M-Instruct, dequantized from its Q4_1 GGUF, and the example "
        "FAQ pairs, float32 against bfloat16. Training: the engine's LoRA run (rank 8, batch 8) with `precision: "
        "float32` and `precision: bfloat16` (CPU autocast; float32 master weights), the same seed and data; tokens/s is "
        f"the median of the engine's per-step figure over steps 3 to {a.steps - 1}. Evaluation: "
        f"`training.evaluate.record_losses` over the {ev['examples']} validation and test examples "
        f"({ev['tokens']:,} tokens, batch 8) with float32 weights under each precision, median of {a.repeats} passes. "
        "Serving: the server's engine (`LoadedModel` and its `Batcher`) with float32 and with bfloat16 weights, "
        f"greedy, exactly {a.max_tokens} tokens per request, for 1 request and for {max(SERVE_CONCURRENT)} submitted "
        f"together; tokens/s from submission to the last finish, median of {a.repeats}. Each pays when bfloat16 is "
        f">= {PAYS_SPEED}x float32's tokens/s and its quality holds: training and evaluation losses within "
        f"{PAYS_LOSS:.0%}, serving's first {AGREE_TOKENS} greedy tokens the same on >= {AGREE_PROMPTS} of {n} prompts.", "",
        *table([*stamp_rows(out, f"torch threads {out['threads']}, "),
                (f"matmul {peaks['n']} x {peaks['n']}: float32 / bfloat16",
                 f"{peaks['float32']:.0f} / {peaks['bfloat16']:.0f} GFLOP/s ({peaks['bfloat16'] / peaks['float32']:.2f}x)"),
                ("training, LoRA step: float32 / bfloat16 autocast",
                 f"{f32['tokens_per_s']:.0f} / {b16['tokens_per_s']:.0f} tokens/s (**{tr['speedup']:.2f}x**)"),
                ("training: largest relative loss gap at any step", f"{tr['max_relative_loss_gap']:.2%}"),
                (f"training: bfloat16 pays (>= {PAYS_SPEED}x, loss within {PAYS_LOSS:.0%})", yes(tr["pays"])),
                ("evaluation, record_losses: float32 / bfloat16 autocast",
                 f"{ev['tokens_per_s']['float32']:.0f} / {ev['tokens_per_s']['bfloat16']:.0f} tokens/s "
                 f"(**{ev['speedup']:.2f}x**)"),
                ("evaluation: largest / median relative per-record loss gap",
                 f"{ev['max_relative_loss_gap']:.2%} / {ev['median_relative_loss_gap']:.2%}"),
                (f"evaluation: bfloat16 pays (>= {PAYS_SPEED}x, every record within {PAYS_LOSS:.0%})", yes(ev["pays"])),
                *serve_rows,
                (f"serving: greedy tokens the same as float32's from the start, per prompt ({max(SERVE_CONCURRENT)} "
                 "requests)", ", ".join(str(x) for x in sv["agreement"])
                 + f" (first {AGREE_TOKENS} the same on {sv['agree_prompts']} of {n})"),
                (f"serving: bfloat16 weights pay (>= {PAYS_SPEED}x at 1 and {max(SERVE_CONCURRENT)} requests, "
                 f">= {AGREE_PROMPTS} of {n} agree)", yes(sv["pays"]))]),
        "", engine_text, ""]


if __name__ == "__main__":
    main()
