"""Estimate a plan before running it: parameters, memory (weights, gradients, optimizer, activations), time.

Memory is computed from the model's shapes; time comes from a few real optimizer steps on the real
data, so it reflects this machine. A plan that cannot fit the device's memory is refused.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from pydantic import BaseModel, Field

from training.batches import BatchStream
from training.contracts import TrainPlan
from training.errors import InputError
from training.objective import NextTokenLoss, autocast, supervised_tokens
from training.runs import Run
from training.setup import Distributed, prepare_run

GB = 1024**3


class Estimate(BaseModel):
    total_params: int
    trainable_params: int
    memory_gb: dict[str, float]  # weights, gradients, optimizer, activations, total
    device: str
    device_memory_gb: float
    seconds_per_step: float | None = Field(description="measured over a few real steps; None when none were measured")
    steps: int | None
    minutes: float | None
    tokens_per_step: int


def device_memory(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1] / GB
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB


def activation_bytes(config, micro_batch: int, seq_len: int, bytes_per_value: int, fused_attention: bool) -> float:
    """Stored activations for backward, per the usual transformer accounting (~34·h + 5·heads·s per token
    per layer, Korthikanti et al. 2022), plus the logits and their gradient in float32. With fused
    attention (SDPA's flash / cuDNN kernels on CUDA) the heads·s score matrix is never stored."""
    h, layers = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    scores = 0 if fused_attention else 5 * heads * seq_len
    per_layer = seq_len * micro_batch * (34 * h + scores) * bytes_per_value / 2
    logits = 2 * micro_batch * seq_len * config.vocab_size * 4
    return layers * per_layer + logits


def memory_need(plan: TrainPlan, run) -> dict[str, float]:
    """GB needed by weights, gradients, AdamW moments and stored activations (micro-batch)."""
    model = run.model
    config = getattr(model, "config", None) or model.base_model.config
    bytes_per_value = 2 if run.device.type == "cuda" else 4
    micro = plan.batch_size // plan.grad_accum
    memory = {
        "weights": run.total_params * (0.5 if plan.method == "qlora" else 4) / GB,  # qlora: NF4, ~4 bits a weight
        "gradients": run.trainable_params * 4 / GB,
        "optimizer": run.trainable_params * 8 / GB,  # AdamW: two float32 moments per trainable value
        "activations": activation_bytes(config, micro, plan.seq_len, bytes_per_value, run.device.type == "cuda") / GB,
    }
    memory["total"] = sum(memory.values())
    return memory


def check_memory(plan: TrainPlan, run) -> dict[str, float]:
    """Refuse a plan whose memory need exceeds 90% of the device's, naming a micro-batch that would fit."""
    memory = memory_need(plan, run)
    available = 0.9 * device_memory(run.device)
    if memory["total"] <= available:
        return memory
    micro = plan.batch_size // plan.grad_accum
    per_sequence = memory["activations"] / micro
    fits = int((available - memory["total"] + memory["activations"]) // per_sequence) if per_sequence else 0
    accum = next((g for g in range(1, plan.batch_size + 1) if plan.batch_size % g == 0 and plan.batch_size // g <= fits), None)
    hint = (f"micro-batches of {plan.batch_size // accum} fit: set grad_accum to {accum} (same batch_size)" if fits >= 1 and accum
            else f"even one sequence of {plan.seq_len} tokens does not fit: lower seq_len or use method=lora")
    raise InputError(f"plan needs about {memory['total']:.1f} GB on {run.device} but {available:.1f} GB are usable "
                     f"(batch_size {plan.batch_size} x seq_len {plan.seq_len}); {hint}")


def estimate(plan: TrainPlan, workspace: Path, measure_steps: int = 5) -> Estimate:
    """Build the plan's model and data in a throwaway run directory, account memory, and time
    `measure_steps` real steps (0: memory only, no step run)."""
    tmp = Path(tempfile.mkdtemp(prefix="modelcrew-estimate-"))
    try:
        run = prepare_run(plan, Path(workspace), Run.at(tmp / "run"), False, Distributed(), show_progress=False)
        memory = check_memory(plan, run)
        seconds = _time_steps(plan, run, measure_steps) if measure_steps else None
        horizon = plan.step_horizon()
        minutes = seconds * horizon / 60 if seconds and horizon else plan.budget.minutes
        if plan.budget.minutes and minutes:
            minutes = min(minutes, plan.budget.minutes)
        return Estimate(total_params=run.total_params, trainable_params=run.trainable_params,
                        memory_gb={k: round(v, 3) for k, v in memory.items()}, device=str(run.device),
                        device_memory_gb=round(device_memory(run.device), 1),
                        seconds_per_step=None if seconds is None else round(seconds, 3),
                        steps=horizon, minutes=None if minutes is None else round(minutes, 2),
                        tokens_per_step=plan.batch_size * plan.seq_len)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _time_steps(plan: TrainPlan, run, steps: int) -> float:
    """Seconds per optimizer step, from `steps` real steps after one untimed warm-up step."""
    micro = plan.batch_size // plan.grad_accum
    stream = BatchStream(run.train_examples, micro, plan.seed, run.tokenizer.pad_token_id)
    params = [p for p in run.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=plan.lr, fused=True)
    objective = NextTokenLoss(run.model, packed=plan.task == "pretrain")
    durations = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        for _ in range(plan.grad_accum):
            batch = {k: v.to(run.device) for k, v in stream.next().items()}
            with autocast(run.device):
                loss = objective(**batch) / max(supervised_tokens(batch), 1) / plan.grad_accum
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if run.device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            durations.append(time.perf_counter() - t0)
    return sum(durations) / len(durations)
