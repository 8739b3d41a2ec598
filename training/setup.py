"""Everything a run needs before its first step: processes, device, run directory, model, tokenizer, data.

This is where pretraining and fine-tuning differ (a tokenizer trained on the corpus and a fresh model,
or a base model and maybe LoRA); the loop itself treats both the same.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from training.attention import cpu_attention

from training.batches import Example, Fit, fitted_examples, read_split
from training.contracts import TrainPlan
from training.data.store import datasets_dir, load_summary
from training.errors import InputError
from training.objective import compute_dtype
from training.progress import Bar
from training.runs import Run
from training.models import (apply_lora, base_dir, base_source, build_scratch, check_chat_template, check_qlora,
                             count_params, hold_frozen_matmuls_in, load_base, resolve_size)
from training.tokenizer import train_bpe


@dataclass
class Distributed:
    """rank / world of a torchrun or `accelerate launch` job (WORLD_SIZE > 1), or a single process."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "Distributed":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _all_reduce(self, value: float) -> float:
        if self.world == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item())

    def sum(self, value: float) -> float:
        return self._all_reduce(value)

    def mean(self, value: float) -> float:
        return self._all_reduce(value) / self.world

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def pick_device(choice: str, dist: Distributed) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise InputError("device: cuda was asked for but no CUDA device is available")
        torch.cuda.set_device(dist.local_rank)
        torch.backends.cuda.matmul.allow_tf32 = True  # what stays in float32 under bf16 autocast runs on tensor cores
        torch.backends.cudnn.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats(dist.local_rank)  # a run's peak is its own, also when a process runs several
        return torch.device("cuda", dist.local_rank)
    return torch.device("cpu")


class MetricsLog:
    """metrics.jsonl, appended and flushed per row (a killed run keeps every row it logged)."""

    def __init__(self, path: Path, after_step: int, enabled: bool) -> None:
        self.enabled = enabled
        if not enabled:
            return
        rows = []
        if path.exists():  # resuming: keep only the rows up to the checkpoint the run restarts from
            rows = [r for r in path.read_text(encoding="utf-8").splitlines() if r.strip() and json.loads(r)["step"] <= after_step]
        path.write_text("".join(r + "\n" for r in rows), encoding="utf-8")
        self.file = open(path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        if self.enabled:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.enabled:
            self.file.close()


@dataclass
class PreparedRun:
    """A run ready for its first step: what `training.loop.train` and `training.estimate` work on."""

    plan: TrainPlan
    artefacts: Run  # its directory and files
    device: torch.device
    model: torch.nn.Module
    tokenizer: object
    train_examples: list[Example]
    val_examples: list[Example]
    lineage: dict
    dist: Distributed
    show_progress: bool
    fits: dict[str, Fit] = field(default_factory=dict)  # how train and val fit seq_len (whole / cut / dropped)
    trainable_params: int = 0
    total_params: int = 0
    _rss_start: float = field(default=0.0)

    @property
    def run_dir(self) -> Path:
        return self.artefacts.dir

    def open_metrics(self, after_step: int) -> MetricsLog:
        return MetricsLog(self.artefacts.metrics_path, after_step, self.dist.is_main)

    def progress(self, total: int | None, done: int) -> Bar:
        return Bar("train", total, done, enabled=self.show_progress and self.dist.is_main, eta=True,
                   fields="loss {task.fields[loss]}  {task.fields[tps]} tok/s", loss="-", tps="-")

    def save_best(self, state: dict, step: int, val_loss: float) -> None:
        from safetensors.torch import save_file

        tmp = self.artefacts.checkpoints_dir / ".best.tmp"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(tmp), metadata={"step": str(step), "val_loss": repr(val_loss)})
        os.replace(tmp, self.artefacts.checkpoints_dir / "best.safetensors")

    def load_best(self) -> dict:
        from safetensors.torch import load_file

        return load_file(str(self.artefacts.checkpoints_dir / "best.safetensors"))

    def peak_memory_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process's peak RSS (KiB on Linux)


def warm_start_dir(path: str) -> Path:
    """The full model directory a warm start begins from (adapters are merged into what they export)."""
    init = Path(path)
    if (init / "adapter_config.json").exists():
        raise InputError(f"init_from: {init} holds only a LoRA adapter; warm-start from a merged export (lora.merge)")
    if not (init / "config.json").is_file() or not list(init.glob("*.safetensors")):
        raise InputError(f"init_from: {init} is not a model directory with safetensors weights")
    return init


MMAP_THRESHOLD = 1 << 20  # bytes: glibc maps allocations from this size up on their own, and unmaps them when freed
LORA_MMAP_THRESHOLD = 2 << 20  # a LoRA run's: bench_lora measured 1 MB faulting in too many fresh pages every step


def engine_mmap_threshold(method: str, strategy: str | None) -> int:
    """The mmap threshold the engine gives a CPU run (`cpu_malloc`), 0 for glibc's default: 2 MB for LoRA and QLoRA
    runs, 1 MB for FSDP processes (measured: under glibc's default each FSDP process of tests/test_estimate.py peaked
    at 428-458 MB, the full model freed by sharding kept in the heap, against 255-257 MB with the threshold)."""
    if method in ("lora", "qlora"):
        return LORA_MMAP_THRESHOLD
    return MMAP_THRESHOLD if strategy == "fsdp" else 0


def cpu_malloc(device: torch.device, method: str, strategy: str | None = None) -> int | None:
    """On a CPU with glibc, for a LoRA or QLoRA run (or an FSDP process: `engine_mmap_threshold`), have malloc map every
    allocation of 2 MB (FSDP: 1 MB) and more on its own (mallopt M_MMAP_THRESHOLD), returned to the system when freed.
    glibc's default threshold grows with each large block freed, up to 32 MB, so a step's activations come from the
    heap, where freed blocks stay resident and fragment it around the frozen weights: bench_lora measured a lower peak
    with a fixed threshold in every run (0.74x the peft + Trainer's under glibc's default, 0.65x with 1 MB), and 1 MB
    at 0.88x the tokens/s of glibc's default, 2 MB between the two on both (quick runs, d7158ee). Other full-weight runs keep glibc's default: each mapped
    block is fresh pages the kernel faults in and zeroes, every step, and pretraining ran at 0.6x the tokens/s with
    1 MB (measured with bench_train's workload). A user's own MALLOC_MMAP_THRESHOLD_ is left alone;
    MODELCREW_MMAP_THRESHOLD sets another size for any run, 0 keeps glibc's default. Returns the threshold set, or
    None."""
    import ctypes
    import ctypes.util

    chosen = os.environ.get("MODELCREW_MMAP_THRESHOLD", "").strip()
    size = int(chosen) if chosen.isdigit() else engine_mmap_threshold(method, strategy)
    if device.type != "cpu" or size == 0 or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return None
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to set
        return None
    return size if mallopt(-3, size) == 1 else None  # -3: M_MMAP_THRESHOLD; mallopt returns 1 on success


def build_model(plan: TrainPlan, workspace: Path, run: Run, dist: Distributed, device: torch.device,
                train_records: list[dict] | None = None):
    """(model, tokenizer, base directory, weights directory) as the plan starts from, on `device`: a fresh model
    (its tokenizer trained on `train_records` by the first process, once) or a base, maybe with LoRA. The loop
    also builds a plain copy to export an FSDP run's gathered weights into."""
    if plan.task == "pretrain":
        spec = resolve_size(plan.size)
        tok_dir = run.tokenizer_dir
        if dist.is_main and not (tok_dir / "tokenizer.json").exists():
            texts = [r.get("text") or json.dumps(r, ensure_ascii=False) for r in train_records or []]
            tokenizer = train_bpe(texts, spec.vocab_size)
            tokenizer.save_pretrained(str(tok_dir))
        dist.barrier()
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
        model = build_scratch(spec, tokenizer, plan.seq_len, plan.dropout)
        base = weights = None
    else:
        if plan.method == "qlora":
            check_qlora(device)
        base = base_dir(plan.base_model, workspace)
        weights = warm_start_dir(plan.init_from) if plan.init_from else base
        model, tokenizer = load_base(weights, quantize_on=device if plan.method == "qlora" else None)
        if plan.method in ("lora", "qlora"):
            model = apply_lora(model, plan.lora)
        dtype = compute_dtype(device, plan.precision)
        # FSDP2 gathers a unit's parameters in one dtype: there the frozen weights stay float32
        if plan.method == "lora" and dtype is not None and not (dist.world > 1 and plan.strategy == "fsdp"):
            hold_frozen_matmuls_in(model, dtype)
        attention = cpu_attention(device, plan.method, model.config, plan.seq_len)
        if attention:
            (model.get_base_model() if hasattr(model, "get_base_model") else model).set_attn_implementation(attention)
    if plan.method != "qlora":  # a 4-bit model is placed on its device while loading and cannot move
        model.to(device)
    return model, tokenizer, base, weights


def prepare_run(plan: TrainPlan, workspace: Path, run: Run, resume: bool, dist: Distributed,
                show_progress: bool = True) -> PreparedRun:
    """Build everything for `run` (in the workspace's runs/, or a throwaway `Run.at(directory)`)."""
    run_id = run.run_id
    saved = run.plan()
    if resume:
        if saved is None:
            raise InputError(f"--resume: no run {run_id!r} to continue in {run.dir.parent}")
        if saved != plan:
            raise InputError(f"--resume: the plan differs from the one run {run_id} started with")
    elif saved is not None:
        raise InputError(f"run {run_id!r} already exists in {run.dir.parent}; pass --resume to continue it")
    summary = load_summary(workspace, plan.dataset)
    check_objective(plan, summary.format)
    device = pick_device(plan.device, dist)
    cpu_malloc(device, plan.method, plan.strategy if plan.launcher == "torchrun" else None)  # before the model and data: their allocations follow it
    torch.manual_seed(plan.seed)
    data_dir = datasets_dir(workspace) / plan.dataset
    train_records, val_records = read_split(data_dir, "train"), read_split(data_dir, "val")

    model, tokenizer, base, weights = build_model(plan, workspace, run, dist, device, train_records)
    check_chat_template(tokenizer, plan.base_model, summary.format)  # planning checked it too; a plan file may not have
    train_examples, train_fit = fitted_examples(tokenizer, train_records, summary.format, plan.seq_len)
    val_examples, val_fit = fitted_examples(tokenizer, val_records, summary.format, plan.seq_len)
    check_fit(train_fit, plan)
    micro = plan.batch_size // plan.grad_accum
    if micro % dist.world:
        raise InputError(f"batch_size: the micro-batch ({micro}) must split evenly over {dist.world} processes")
    if not train_examples:
        raise InputError(f"dataset {plan.dataset}: no training sequence of {plan.seq_len} tokens; lower seq_len or add data")
    if not val_examples:
        raise InputError(f"dataset {plan.dataset}: the validation split is empty at seq_len {plan.seq_len}; "
                         "curate with a larger val fraction or add data")
    trainable, total = count_params(model)
    lineage = {"run_id": run_id, "dataset": plan.dataset, "dataset_description": summary.description,
               "base_model": plan.base_model, "base_dir": str(weights) if base else None, "task": plan.task,
               "reference_dir": str(base) if base else None, "init_from": plan.init_from,
               "method": plan.method, "objective": plan.objective, "base_source": base_source(base) if base else None, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if dist.is_main:
        run.dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            run.write_plan(plan)
            if run.checkpoints_dir.exists():
                shutil.rmtree(run.checkpoints_dir)
    dist.barrier()
    return PreparedRun(plan, run, device, model, tokenizer, train_examples, val_examples, lineage, dist,
                       show_progress, {"train": train_fit, "val": val_fit}, trainable, total)


def check_objective(plan: TrainPlan, fmt: str) -> None:
    """A preference objective trains on preference data, and preference data needs one (one sentence each way)."""
    from training.contracts import PREFERENCE_FORMATS

    needed = PREFERENCE_FORMATS.get(plan.objective)
    if needed and fmt != needed:
        what = "pairs (prompt, chosen, rejected)" if needed == "preference" else "rated answers (prompt, completion, label)"
        raise InputError(f"objective: {plan.objective} needs {what}, but dataset {plan.dataset} is {fmt} data")
    if not needed and fmt in ("preference", "feedback"):
        raise InputError(f"objective: dataset {plan.dataset} is {fmt} data, which trains with objective "
                         f"{'dpo or orpo' if fmt == 'preference' else 'kto'}, not {plan.objective}")


MAX_DROPPED = 0.05  # a larger share of training records lost to seq_len refuses the run


def check_fit(fit: Fit, plan: TrainPlan) -> None:
    """Refuse a run that would silently train on a fraction of its data (answers longer than seq_len)."""
    if fit.records and fit.dropped / fit.records > MAX_DROPPED:
        raise InputError(f"dataset {plan.dataset}: {fit.dropped} of {fit.records} training records "
                         f"({fit.dropped / fit.records:.0%}) have answers longer than seq_len {plan.seq_len} and would "
                         f"be dropped; raise seq_len (e.g. {plan.seq_len * 2}) or shorten the answers")
