"""The memory estimate against measured peaks: tiny models trained for a few real steps on CPU, each in
a fresh process, and the refusal's one-line fixes.

Measured: the peak resident set (VmHWM, reset through /proc/self/clear_refs once the model and data
are loaded) minus the resident set at that moment, over two real optimizer steps. RSS rather than
torch's profiler because RSS is what the machine runs out of: it includes the heap that glibc keeps
after the step's tensors are freed (about half again the live bytes), which a tensor-level profile
never sees and the estimate has to carry. The weights are loaded before the baseline, so the estimate
compared is its total less its weights.

Two processes (a torchrun job of 2 gloo processes, DDP and then FSDP, as `launcher: torchrun` runs them) are
measured the same way in each process, from the moment its full model and data are loaded: the wrapping (DDP's
gradient buckets, FSDP's sharding) and two real steps of the loop's own sequence (gradient sync, clipping, fused
AdamW) come after the baseline. Every process loads the whole float32 model before sharding, so here too the
estimate compared is the process's total less the full model's weights.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FAQ = ROOT / "examples" / "data" / "support_faq.jsonl"
TOLERANCE = 0.20


def _rss_mb(field: str) -> float:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024


def measure(workspace: str, plan_json: str) -> dict:
    """In this (fresh) process: prepare the run, then train three real steps and report the peak RSS
    increase beside the estimate's parts (MB)."""
    import gc

    from training.contracts import TrainPlan
    from training.estimate import _time_steps, memory_need
    from training.runs import Run
    from training.setup import Distributed, prepare_run

    plan = TrainPlan.model_validate_json(plan_json)
    run = prepare_run(plan, Path(workspace), Run.at(Path(tempfile.mkdtemp()) / "run"), False, Distributed(),
                      show_progress=False)
    need = {k: v * 1024 for k, v in memory_need(plan, run).items()}
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from the current RSS
    baseline = _rss_mb("VmRSS")
    _time_steps(plan, run, 1)  # two steps: the second runs with the optimizer's moments allocated
    return {"measured": _rss_mb("VmHWM") - baseline, "need": need}


def measure_rank(workspace: str, plan_json: str, out: str) -> None:
    """In each process of a torchrun job: prepare the run as the loop does (full model and data loaded), then,
    from the baseline, wrap it (DDP or FSDP) and train two real steps the way `training.loop.train` does; write
    the peak RSS increase beside the estimate of this process's row (plan_layout: ddp or fsdp) to out/rank-N.json."""
    import gc

    import torch

    from training import parallel
    from training.batches import BatchStream
    from training.contracts import TrainPlan
    from training.estimate import devices_memory, memory_need, plan_row, read_shapes
    from training.objective import NextTokenLoss, autocast, supervised_tokens
    from training.runs import Run
    from training.setup import Distributed, prepare_run

    plan = TrainPlan.model_validate_json(plan_json)
    dist = Distributed.from_env()
    run = prepare_run(plan, Path(workspace), Run.at(Path(tempfile.mkdtemp()) / "run"), False, dist,
                      show_progress=False)
    need = {k: v * 1024 for k, v in memory_need(plan, run).items()}
    # the one-process row of the same plan; its weights are what is resident at the baseline: the whole float32
    # model, which every process loads before any sharding
    single = plan_row(plan, read_shapes(run.model, plan), run.device, devices_memory(run.device), layout="single",
                      devices=1)
    single = {k: getattr(single, k) * 1024 for k in ("weights", "gradients", "optimizer", "activations", "total")}
    model = run.model
    model.train()
    stream = BatchStream(run.train_examples, plan.batch_size // plan.grad_accum, plan.seed,
                         run.tokenizer.pad_token_id, dist.rank, dist.world)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    baseline = _rss_mb("VmRSS")
    wrapped = parallel.wrap(NextTokenLoss(model, packed=plan.task == "pretrain"), plan, dist, run.device)
    params = [p for p in model.parameters() if p.requires_grad]  # after wrap: FSDP's are its shards
    optimizer = torch.optim.AdamW(params, lr=plan.lr, weight_decay=plan.weight_decay, betas=(0.9, 0.95), fused=True)
    for _ in range(2):  # the second step runs with the optimizer's moments allocated
        micro_batches = [stream.next() for _ in range(plan.grad_accum)]
        targets = dist.sum(sum(supervised_tokens(b) for b in micro_batches))
        for micro, batch in enumerate(micro_batches):
            with parallel.gradient_sync(wrapped, micro == plan.grad_accum - 1), autocast(run.device, plan.precision):
                loss = wrapped(**batch) * dist.world / targets
            loss.backward()
        if plan.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, plan.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    measured = _rss_mb("VmHWM") - baseline
    Path(out, f"rank-{dist.rank}.json").write_text(json.dumps({"measured": measured, "need": need, "single": single}))
    dist.barrier()
    dist.close()


def _build_base(directory: Path, hidden: int, intermediate: int, vocab: int = 16384) -> Path:
    """A randomly initialised 2-layer Llama with a tokenizer trained on the FAQ; its vocabulary larger
    than the tokenizer's, like the real small models whose output layer is a large share of their memory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from training.tokenizer import train_bpe

    tokenizer = train_bpe(FAQ.read_text(encoding="utf-8").splitlines(), 2048)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("bases")
    return {"narrow": _build_base(directory / "narrow", hidden=128, intermediate=512),
            "wide": _build_base(directory / "wide", hidden=512, intermediate=2048)}


@pytest.fixture(scope="module")
def measured(tmp_path_factory, bases):
    """Three runs measured in parallel processes: full and LoRA at 8 x 256 tokens (activations and the
    output layer dominate), and full on a wider model at 2 x 64 (gradients and AdamW's moments dominate); beside
    them the wide model's 2 x 64 over two processes (1 x 64 each) with DDP and with FSDP, each process measured."""
    from training.contracts import Budget, TrainPlan
    from training.data import curate_to_workspace

    ws = tmp_path_factory.mktemp("estimate")
    fp = curate_to_workspace(str(FAQ), ws, format="text").summary.fingerprint
    narrow, wide = bases["narrow"], bases["wide"]

    def plan(base, method, seq_len, batch_size, **layout):
        return TrainPlan(task="finetune", dataset=fp, base_model=str(base), method=method, seq_len=seq_len,
                         batch_size=batch_size, budget=Budget(steps=3), device="cpu", **layout)

    plans = {"full 8x256": plan(narrow, "full", 256, 8), "lora 8x256": plan(narrow, "lora", 256, 8),
             "full wide 2x64": plan(wide, "full", 64, 2)}
    jobs = {strategy: plan(wide, "full", 64, 2, launcher="torchrun", nproc=2, strategy=strategy)
            for strategy in ("ddp", "fsdp")}
    procs = {name: subprocess.Popen([sys.executable, __file__, str(ws), p.model_dump_json()], cwd=ROOT,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, p in plans.items()}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}  # as training.launch runs 2 on 2 cores
    for strategy, p in jobs.items():
        (ws / strategy).mkdir()
        procs[strategy] = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__, "rank",
             str(ws), p.model_dump_json(), str(ws / strategy)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        if name in jobs:
            for rank in (0, 1):
                results[f"{name} rank {rank}"] = json.loads((ws / name / f"rank-{rank}.json").read_text())
        else:
            results[name] = json.loads(out.strip().splitlines()[-1])
    (ws / "measured.json").write_text(json.dumps(results, indent=2))
    return results


def _estimated(result: dict, drop: str | None = None) -> float:
    need = result["need"]
    estimated = need["total"] - need["weights"]  # the weights were resident before the baseline
    return estimated - (need[drop] if drop else 0)


def _error(result: dict, estimated: float) -> float:
    return abs(estimated - result["measured"]) / result["measured"]


@pytest.mark.parametrize("name", ["full 8x256", "lora 8x256", "full wide 2x64"])
def test_the_estimate_is_within_20_percent_of_the_measured_peak(measured, name):
    result = measured[name]
    print(f"{name}: measured {result['measured']:.1f} MB, estimated {_estimated(result):.1f} MB")
    assert _error(result, _estimated(result)) <= TOLERANCE, result


def test_an_accounting_without_the_output_layer_or_the_optimizer_would_miss(measured):
    """The check can fail: leaving out the logits' memory (most of the activations of a small model with a large vocabulary) or AdamW's
    moments misses the measured peak by more than the tolerance."""
    import math

    for name in ("full 8x256", "lora 8x256"):
        result = measured[name]
        vocab, tokens = 16384, 8 * 256
        logits_mb = 3 * 4 * vocab * tokens / 2**20  # log-probabilities and two gradients, float32
        assert _error(result, _estimated(result) - logits_mb) > TOLERANCE, name
    wide = measured["full wide 2x64"]
    assert _error(wide, _estimated(wide, drop="optimizer")) > TOLERANCE
    assert not math.isclose(wide["need"]["optimizer"], 0)


# Measured on 2 cores (2026-12-02): DDP processes (glibc's own malloc settings, as every full-weight run) 353-356 MB
# against 401 estimated; FSDP processes, which get the engine's 1 MB mmap threshold, 255-257 against 245 (under
# glibc's growing threshold they peaked at 416-458 MB: the full float32 model freed by sharding stayed in the heap).
# Leaving out DDP's second copy of the gradients (its buckets) would also land within 20%: this check cannot tell
# whether that term is right.
@pytest.mark.parametrize("name", ["ddp rank 0", "ddp rank 1", "fsdp rank 0", "fsdp rank 1"])
def test_each_process_of_a_two_process_job_is_within_20_percent_of_its_measured_peak(measured, name):
    result = measured[name]
    estimated = result["need"]["total"] - result["single"]["weights"]  # the full model was resident before
    print(f"{name}: measured {result['measured']:.1f} MB, estimated {estimated:.1f} MB")
    assert _error(result, estimated) <= TOLERANCE, result


# The refusal's one-line fixes: pure arithmetic over the shapes of real models' configurations (built on the meta
# device: no weights), on GPUs of a given size (GB each), each case sized so that exactly one fix is the first to fit.

def _shapes(hidden: int, intermediate: int, layers: int, tied: bool):
    """A Llama 3 (vocabulary 128,256, 32 heads, 8 key-value heads) of these dimensions, as the estimate reads it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from training.estimate import read_shapes

    config = LlamaConfig(vocab_size=128256, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8,
                         tie_word_embeddings=tied)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return read_shapes(model, _fix_plan())


def _fix_plan(**fields):
    from training.contracts import TrainPlan

    return TrainPlan(**{"task": "finetune", "dataset": "0123456789abcdef", "base_model": "meta-llama",
                        "method": "full", **fields})


@pytest.fixture(scope="module")
def llama():
    return {"1B": _shapes(2048, 8192, 16, tied=True), "8B": _shapes(4096, 14336, 32, tied=False)}


def _fix(shapes, room: list[float], device: str = "cuda", **fields) -> str:
    import torch

    from training.estimate import first_fix, plan_row

    plan, device = _fix_plan(**fields), torch.device(device)
    assert not plan_row(plan, shapes, device, room).fits  # the plan itself must not fit, or there is nothing to fix
    return first_fix(plan, shapes, device, room)


def test_a_smaller_micro_batch_is_the_first_fix_when_it_fits(llama):
    # 1B full fine-tune, 8 x 2048 in one micro-batch on a 48 GB GPU: 52 GB; micro-batches of 4 need 37
    assert _fix(llama["1B"], [48.0], batch_size=8, seq_len=2048) == (
        "micro-batches of 4 fit: set grad_accum to 2 (same batch_size)")


def test_activation_checkpointing_is_named_when_no_micro_batch_fits_but_it_does(llama):
    # 1B full, 2 x 4096 (37 GB): one sequence a micro-batch needs 29 GB, checkpointed 2 x 4096 need 24
    assert _fix(llama["1B"], [32.0], batch_size=2, seq_len=4096) == (
        "set activation_checkpointing: true (each layer recomputed in backward: less memory, more compute)")
    # with a little more room a micro-batch of one fits, and that (earlier in the order) is named instead
    assert _fix(llama["1B"], [36.0], batch_size=2, seq_len=4096) == (
        "micro-batches of 1 fit: set grad_accum to 2 (same batch_size)")


def test_lora_then_qlora_when_full_fine_tuning_cannot_fit(llama, monkeypatch):
    import training.estimate

    # 8B full, 1 x 512: 138 GB however it is cut; LoRA under bf16 (frozen matmul weights in bf16) 20.5 GB,
    # QLoRA's 4-bit ones 11.9
    assert _fix(llama["8B"], [80.0], seq_len=512, batch_size=1) == "use method=lora"
    # on 20 GB LoRA does not fit either; QLoRA is named where bitsandbytes works (this machine has no CUDA, so
    # qlora_problem stands in for a GPU where bitsandbytes loads)
    monkeypatch.setattr(training.estimate, "qlora_problem", lambda device: None)
    assert _fix(llama["8B"], [20.0], seq_len=512, batch_size=1) == "use method=qlora"
    assert _fix(llama["8B"], [24.0], seq_len=512, batch_size=1) == "use method=lora"  # 20.5 GB fit 90% of 24


def test_fsdp_over_the_fewest_gpus_that_fit_and_split_the_micro_batch(llama):
    # 8B full, 8 x 2048 on eight 80 GB GPUs: sharded over 5 it would fit (68 GB), but 8 sequences do not split
    # over 5 processes (the run refuses that), nor 6 or 7; over 8, 41 GB
    assert _fix(llama["8B"], [80.0] * 8, batch_size=8, seq_len=2048) == (
        "use 8 GPUs with strategy=fsdp (launcher=torchrun, nproc=8)")
    assert _fix(llama["8B"], [84.0] * 8, batch_size=8, seq_len=2048) == (
        "use 4 GPUs with strategy=fsdp (launcher=torchrun, nproc=4)")  # 75 GB fit 90% of 84
    # pretraining an 8B-sized model (no LoRA to fall back on), one sequence a micro-batch (grad_accum 8), which no
    # process count splits: micro-batches of 4, one sequence each over 4 GPUs (58 GB; 3 processes cannot split it)
    assert _fix(llama["8B"], [80.0] * 8, task="pretrain", method="full", base_model=None, size="tiny", batch_size=8,
                grad_accum=8, seq_len=2048) == "use 4 GPUs with strategy=fsdp (launcher=torchrun, nproc=4, grad_accum=2)"


def test_a_shorter_seq_len_when_nothing_else_fits_on_the_cpu(llama):
    """On the CPU (no QLoRA, no GPUs to shard over): a 1B LoRA, checkpointed, one sequence of 8192 tokens needs
    7.9 GB; with 8 GB of RAM (7.2 usable) the fix is the longest seq_len (a multiple of 8) that fits."""
    import torch

    from training.estimate import plan_row

    fields = dict(method="lora", batch_size=1, seq_len=8192, activation_checkpointing=True, precision="float32")
    fix = _fix(llama["1B"], [8.0], device="cpu", **fields)
    shorter = int(re.fullmatch(r"lower seq_len to (\d+)", fix).group(1))
    fits = [plan_row(_fix_plan(**fields), llama["1B"], torch.device("cpu"), [8.0], seq_len=s).fits
            for s in (shorter, shorter + 8)]
    assert shorter % 8 == 0 and 4096 < shorter < 8192 and fits == [True, False]



def test_plan_estimate_answers_memory_per_device_for_every_method_and_layout(cli, bases, tmp_path):
    """`modelcrew plan GOAL --estimate`: the plan (a LoRA fine-tune of the narrow base, one process) with its
    memory table: full / LoRA / QLoRA on one device and DDP / FSDP over 2, 4 and 8, each row the estimate's own
    arithmetic for the base's shapes; the table for people on stderr."""
    import torch
    from transformers import AutoModelForCausalLM

    from training.contracts import TrainPlan
    from training.estimate import devices_memory, memory_row, read_shapes

    done = cli("plan", f"fine-tune the model {bases['narrow']} on {FAQ} with LoRA rank 4 for 6 steps", "--estimate",
               "--json", "--workspace", tmp_path / "ws")
    assert done.exit_code == 0, done.stderr
    body = done.json()
    plan, est = TrainPlan.model_validate(body["plan"]), body["estimate"]
    rows = {(r["method"], r["layout"], r["devices"]): r for r in est["memory_table"]}
    assert sorted(rows) == sorted((m, layout, n) for m in ("full", "lora", "qlora")
                                  for layout, n in [("single", 1)] + [(lay, n) for lay in ("ddp", "fsdp") for n in (2, 4, 8)])
    own = rows["lora", "single", 1]
    assert own["fits"] and own["total"] == est["memory_gb"]["total"]
    assert not rows["qlora", "single", 1]["fits"] and rows["qlora", "single", 1]["note"] == "needs a CUDA GPU"
    shapes = read_shapes(AutoModelForCausalLM.from_pretrained(bases["narrow"]), plan)
    device, room = torch.device(est["device"]), devices_memory(torch.device(est["device"]))
    for (method, layout, n), row in rows.items():
        expected = memory_row(shapes, method, layout, n, plan.batch_size // plan.grad_accum, plan.seq_len, device,
                              room, plan.precision, plan.activation_checkpointing)
        assert row["total"] == round(expected.total, 3) and row["fits"] == expected.fits, (method, layout, n)
    assert rows["full", "fsdp", 8]["weights"] < rows["full", "fsdp", 2]["weights"]  # more shards, smaller each
    assert "memory per device, GB" in done.stderr and "fsdp" in done.stderr


if __name__ == "__main__":  # the measuring process: python tests/test_estimate.py WORKSPACE PLAN_JSON
    sys.path.insert(0, str(ROOT))  # or each process of a torchrun job: ... tests/test_estimate.py rank WS PLAN OUT
    if sys.argv[1] == "rank":
        measure_rank(*sys.argv[2:5])
    else:
        print(json.dumps(measure(sys.argv[1], sys.argv[2])))


def test_a_preference_pair_counts_two_sequences_in_the_micro_batch(llama):
    """DPO and ORPO put prompt + chosen and prompt + rejected in the micro-batch: the activations of 8 pairs are those of
    16 sequences; KTO's rated answers are one sequence each."""
    import torch

    from training.estimate import memory_row, plan_row

    device, room = torch.device("cuda"), [80.0]
    rows = {objective: plan_row(_fix_plan(objective=objective, method="lora", batch_size=8, seq_len=1024), llama["1B"],
                                device, room) for objective in ("sft", "dpo", "orpo", "kto")}
    sixteen = memory_row(llama["1B"], "lora", "single", 1, 16, 1024, device, room)
    assert rows["dpo"].activations == rows["orpo"].activations == sixteen.activations
    assert rows["kto"].activations == rows["sft"].activations < sixteen.activations
