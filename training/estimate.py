"""Estimate a plan before running it: parameters, memory per device (weights, gradients, optimizer,
activations) for every method and layout, and time. A plan that cannot fit is refused with the fix.

Memory is counted from the model's shapes the way this engine trains (read `training.loop` and
`training.objective`): float32 weights, bf16 autocast where the plan's precision asks (CUDA by default; it keeps a bf16 copy of every matmul
weight until backward), AdamW's two float32 moments, no gradient checkpointing (every layer's
activations are held until backward), and the output layer applied to every supervised position at
once, in float32 (its log-probabilities are kept, and backward holds two more tensors of that size).
On CPU the step's transient tensors come back to glibc's heap, which keeps them resident: the peak
RSS is `CPU_HEAP_SLACK` (by the run's malloc setting) times the live bytes (measured: tests/test_estimate.py). Time comes from a
few real optimizer steps on the real data, so it reflects this machine.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, Field

from training.attention import lean_on
from training.batches import BatchStream
from training.contracts import TrainPlan
from training.errors import InputError
from training.models import LORA_TARGETS, check_qlora
from training.objective import CHUNK_ELEMENTS, NextTokenLoss, autocast, compute_dtype, supervised_tokens
from training.runs import Run
from training.setup import Distributed, engine_mmap_threshold, prepare_run

GB = 1024**3
USABLE = 0.9  # of a device's memory: the rest is the CUDA context, the allocator's cache, the OS
# peak RSS / live bytes of a CPU step's transient tensors: glibc keeps freed heap chunks. Measured by
# tests/test_estimate.py: 1.5 under glibc's own growing mmap threshold (up to 32 MB: full-weight runs), 1.2-1.25
# under the engine's fixed threshold for LoRA, QLoRA and FSDP (training.setup.cpu_malloc), which gives blocks from
# there up back when freed
CPU_HEAP_SLACK = {"glibc": 1.5, "mapped": 1.25}
GLIBC_MMAP_MAX = 32 * 1024**2  # glibc's own threshold grows to this; blocks this large go back to the OS when freed
CPU_FIXED_GB = 8 / 1024  # a CPU step's fixed cost beyond its tensors (thread pools, kernels' scratch), measured
NF4_BYTES = 0.5 + 0.127 / 8  # QLoRA: 4 bits a weight + double-quantized block scales (~0.127 bits)
TABLE_DEVICES = (1, 2, 4, 8)
MethodName = Literal["full", "lora", "qlora"]


class MemoryRow(BaseModel):
    """GB per device for one method on `devices` devices (one process each) laid out as `layout`."""

    method: MethodName
    layout: Literal["single", "ddp", "fsdp"]
    devices: int
    weights: float
    gradients: float
    optimizer: float
    activations: float = Field(description="stored activations and the output layer's log-probabilities and gradients")
    total: float
    fits: bool = Field(description="the devices exist and the total fits 90% of each (CPU: all processes share the RAM)")
    note: str | None = None


class Estimate(BaseModel):
    total_params: int
    trainable_params: int
    memory_gb: dict[str, float]  # the plan's own: weights, gradients, optimizer, activations, total (per device)
    device: str
    device_memory_gb: float
    devices_memory_gb: list[float] = Field(default_factory=list, description="each visible GPU's memory; CPU: the RAM")
    memory_table: list[MemoryRow] = Field(default_factory=list, description=(
        "GB per device for full / lora / qlora on 1 device and with ddp / fsdp over several"))
    seconds_per_step: float | None = Field(description="measured over a few real steps; None when none were measured")
    steps: int | None
    minutes: float | None
    tokens_per_step: int


def device_memory(device: torch.device) -> float:
    """GB of one device: a GPU's memory, or the RAM this process may use (the cgroup's limit when lower)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1] / GB
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        ram = min(ram, int(limit)) if limit.isdigit() else ram
    except OSError:
        pass
    return ram / GB


def devices_memory(device: torch.device) -> list[float]:
    """GB of each visible GPU (CUDA), or the RAM once (CPU: processes share it)."""
    if device.type == "cuda":
        return [torch.cuda.mem_get_info(i)[1] / GB for i in range(torch.cuda.device_count())]
    return [device_memory(device)]


@dataclass
class Shapes:
    """What memory depends on, read once from the loaded model (whatever method loaded it)."""

    hidden: int
    intermediate: int
    layers: int
    vocab: int
    params: int  # every weight, tied ones once
    matmul_params: int  # weights of the decoder's linear layers: what QLoRA stores in 4 bits
    largest_unit: int  # parameters of the largest FSDP unit (a decoder layer, or the embedding)
    adapter_params: int  # LoRA's A and B over the target modules at the plan's rank
    adapter_inputs: int  # values per token the adapters keep: their inputs (and dropout masks), and A's outputs
    softcap: bool
    fused_attention: bool  # SDPA: the heads x seq x seq scores are never stored
    heads: int


def read_shapes(model, plan: TrainPlan) -> Shapes:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    targets = plan.lora.target_modules or LORA_TARGETS.get(config.model_type, [])
    seen, params, matmul, adapter, inputs = set(), 0, 0, 0, 0
    layer_params: dict[str, int] = {}
    for name, module in base.named_modules():
        if "lora_" in name:
            continue
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen or "lora_" in pname:
                continue
            seen.add(id(p))
            quant_state = getattr(p, "quant_state", None)
            n = quant_state.shape.numel() if quant_state is not None else p.numel()
            params += n
            parts = name.split(".")
            unit = ".".join(parts[:parts.index("layers") + 2]) if "layers" in parts else name
            layer_params[unit] = layer_params.get(unit, 0) + n
        if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}":
            matmul += module.in_features * module.out_features
            if name.removesuffix(".base_layer").rsplit(".", 1)[-1] in targets:
                r = plan.lora.rank
                adapter += r * (module.in_features + module.out_features)
                inputs += module.in_features * (2 if plan.lora.dropout else 1) + r
    attn = getattr(config, "_attn_implementation", None) or "sdpa"
    return Shapes(config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size, params,
                  matmul, max(layer_params.values(), default=0), adapter, inputs,
                  bool(getattr(config, "final_logit_softcapping", None)), attn != "eager", config.num_attention_heads)


def activation_bytes(shapes: Shapes, method: str, micro_batch: int, seq_len: int, bf16: bool,
                     checkpointing: bool = False, fused_head: bool = True, lean: bool = False) -> tuple[float, float]:
    """Bytes held at the start of backward for one micro-batch: every layer's saved tensors and the
    output layer's. Per token and layer (counted from what autograd saves in a Llama block):
    full: each RMSNorm its input, normalised and scaled output (3h, x2), attention q, k, v and output
    (4h), the MLP's gate, up, activation and product (4i); LoRA over a frozen base: the norms' inputs
    (2h), attention (4h), the MLP without its frozen down projection's input (3i), and the adapters'
    inputs, dropout masks and A outputs. Under bf16 autocast (`bf16`) the residual stream and the norms'
    upcasts stay float32, the rest is bf16. Then the output layer: float32 log-probabilities of every
    position and, at the start of backward, their gradient and the logits' gradient (3 x 4 bytes) — unless the
    head is fused with the loss (`fused_head`, training/objective.py: no softcap, not FSDP): then one chunk of
    float32 logits at a time, and the gradient of the hidden states kept for backward. Eager attention keeps
    its float32 softmax per head and query; `lean` (training/attention.py, LoRA on the CPU) its probabilities in the
    matmuls' dtype.
    With activation checkpointing each layer keeps only its float32 input, and one layer's tensors exist
    at a time while it is recomputed in backward. Returns (the layers' bytes, the output layer's bytes)."""
    h, i = shapes.hidden, shapes.intermediate
    tokens = micro_batch * seq_len
    low = 2 if bf16 else 4  # bytes of a matmul output: bf16 under autocast, else float32
    if method == "full":
        per_token = 2 * (2 * h * 4 + h * low) + 4 * h * low + 4 * i * low
        final = 2 * h * 4 + h * low  # the last norm's input and output, the output layer's input
    else:
        per_token = 2 * h * 4 + 4 * h * low + 3 * i * low + shapes.adapter_inputs * 4 / shapes.layers
        final = h * 4
    scores = shapes.heads * seq_len * (low if lean else 0 if shapes.fused_attention else 4)
    if fused_head and not shapes.softcap:
        # a chunk's float32 logits and, measured (tests/test_estimate.py), about as much again that the allocator holds
        head = tokens * h * 4 + min(CHUNK_ELEMENTS, tokens * shapes.vocab) * (10 + (2 if bf16 else 0))
    else:
        head = tokens * (3 + shapes.softcap) * 4 * shapes.vocab
    if checkpointing:
        return tokens * (shapes.layers * h * 4 + per_token + scores + final), head
    return tokens * (shapes.layers * (per_token + scores) + final), head


def memory_row(shapes: Shapes, method: str, layout: str, devices: int, micro_batch: int, seq_len: int,
               device: torch.device, room: list[float], precision: str = "auto",
               checkpointing: bool = False) -> MemoryRow:
    """GB per device for `method` on `devices` processes (each takes its share of the micro-batch)."""
    cuda = device.type == "cuda"
    bf16 = compute_dtype(device, precision) is not None  # autocast: bf16 copies of the matmul weights, bf16 outputs
    p, a = shapes.params, shapes.adapter_params
    if method == "full":
        weights, trainable = 4 * p + (2 * shapes.matmul_params if bf16 else 0), p
    elif method == "lora":
        m = shapes.matmul_params
        if bf16 and layout != "fsdp":  # the frozen matmul weights and embedding held in bf16 (models.hold_frozen_matmuls_in)
            m += shapes.vocab * shapes.hidden
            weights, trainable = 4 * (p - m) + 2 * m + 4 * a, a
        else:
            weights, trainable = 4 * p + (2 * m if bf16 else 0) + 4 * a, a
    else:  # 4-bit decoder matmuls, float32 embeddings/norms (peft upcasts them), one layer's weights dequantized at a time
        weights = NF4_BYTES * shapes.matmul_params + 4 * (p - shapes.matmul_params) + 4 * a
        weights += 2 * shapes.largest_unit
        trainable = a
    gradients, optimizer = 4 * trainable, 8 * trainable  # float32 gradients, AdamW's two float32 moments
    note = None
    if layout == "ddp":
        gradients *= 2  # DDP's reduction buckets are a second copy of the gradients
    elif layout == "fsdp":  # sharded, plus the gathered current and prefetched unit and one unit's full gradient
        unit = shapes.largest_unit * 4
        weights, gradients, optimizer = weights / devices + 2 * unit, gradients / devices + unit, optimizer / devices
    per_device = math.ceil(micro_batch / devices)
    layers, logits = activation_bytes(shapes, "full" if method == "full" else "lora", per_device, seq_len, bf16,
                                      checkpointing, fused_head=layout != "fsdp", lean=lean_on(device, method, shapes.heads, shapes.hidden, seq_len))
    if method == "full":  # the embedding's lookup has its own dense gradient, added to the output layer's
        gradients += 4 * shapes.vocab * shapes.hidden
    if not cuda:  # glibc keeps freed heap chunks resident; chunks from its mmap threshold up go back when freed
        threshold = engine_mmap_threshold(method, layout)
        heap = "mapped" if threshold else "glibc"
        layers, gradients = layers * CPU_HEAP_SLACK[heap], gradients * CPU_HEAP_SLACK[heap]
        logits *= CPU_HEAP_SLACK[heap] if logits / 3 < (threshold or GLIBC_MMAP_MAX) else 1
    activations = layers + logits + (0 if cuda else CPU_FIXED_GB * GB)
    total = weights + gradients + optimizer + activations
    if cuda:
        fits = devices <= len(room) and total <= USABLE * min(room[:devices]) * GB
        if devices > len(room):
            note = f"{len(room)} GPU{'s' if len(room) != 1 else ''} visible"
        if method == "qlora" and note is None:
            note = qlora_problem(device)
            fits = fits and note is None
    else:  # processes on one machine share its RAM
        fits = devices * total <= USABLE * room[0] * GB
        if method == "qlora":
            fits, note = False, "needs a CUDA GPU"
    return MemoryRow(method=method, layout=layout, devices=devices, weights=weights / GB, gradients=gradients / GB,
                     optimizer=optimizer / GB, activations=activations / GB, total=total / GB, fits=fits, note=note)


def qlora_problem(device: torch.device) -> str | None:
    try:
        check_qlora(device)
    except InputError as err:
        return str(err).split(";")[0].removeprefix("method: ")
    return None


def plan_layout(plan: TrainPlan, device: torch.device) -> tuple[str, int]:
    """How the plan runs: one process, or torchrun's nproc (default: every visible GPU, 2 on CPU) as ddp/fsdp."""
    if plan.launcher != "torchrun":
        return "single", 1
    n = plan.nproc or (max(torch.cuda.device_count(), 1) if device.type == "cuda" else 2)
    return (plan.strategy, n) if n > 1 else ("single", 1)


def memory_table(plan: TrainPlan, shapes: Shapes, device: torch.device, room: list[float]) -> list[MemoryRow]:
    """full / lora / qlora (pretraining: full only) on 1 device, then ddp and fsdp over 2, 4, 8 and the plan's nproc."""
    micro = plan.batch_size // plan.grad_accum
    methods = ["full"] if plan.task == "pretrain" else ["full", "lora", "qlora"]
    counts = sorted({n for n in TABLE_DEVICES if n > 1} | {plan_layout(plan, device)[1]} - {1})
    return [memory_row(shapes, method, layout, n, micro * rows_per_record(plan), plan.seq_len, device, room,
                       plan.precision, plan.activation_checkpointing)
            for method in methods
            for layout, n in [("single", 1)] + [(layout, n) for layout in ("ddp", "fsdp") for n in counts]]


def plan_row(plan: TrainPlan, shapes: Shapes, device: torch.device, room: list[float], **change) -> MemoryRow:
    """The plan's own row (with `change`: micro_batch, seq_len, method, layout, devices)."""
    layout, devices = plan_layout(plan, device)
    args = {"method": plan.method, "layout": layout, "devices": devices,
            "micro_batch": plan.batch_size // plan.grad_accum, "seq_len": plan.seq_len,
            "checkpointing": plan.activation_checkpointing} | change
    return memory_row(shapes, args["method"], args["layout"], args["devices"], args["micro_batch"] * rows_per_record(plan),
                      args["seq_len"], device, room, plan.precision, args["checkpointing"])


def rows_per_record(plan: TrainPlan) -> int:
    """Sequences a record puts in a micro-batch: a DPO or ORPO pair is two (prompt + chosen, prompt + rejected)."""
    return 2 if plan.objective in ("dpo", "orpo") else 1


def memory_need(plan: TrainPlan, run) -> dict[str, float]:
    """GB per device the plan needs: weights, gradients, AdamW moments, activations (a micro-batch), total."""
    row = plan_row(plan, read_shapes(run.model, plan), run.device, devices_memory(run.device))
    return {k: getattr(row, k) for k in ("weights", "gradients", "optimizer", "activations", "total")}


def first_fix(plan: TrainPlan, shapes: Shapes, device: torch.device, room: list[float]) -> str:
    """The first change that fits, in order: a smaller micro-batch (same batch), activation checkpointing, LoRA,
    QLoRA, FSDP over more GPUs, a shorter seq_len."""
    micro = plan.batch_size // plan.grad_accum
    for accum in range(plan.grad_accum + 1, plan.batch_size + 1):
        if plan.batch_size % accum == 0 and plan_row(plan, shapes, device, room, micro_batch=plan.batch_size // accum).fits:
            return f"micro-batches of {plan.batch_size // accum} fit: set grad_accum to {accum} (same batch_size)"
    if not plan.activation_checkpointing and plan_row(plan, shapes, device, room, checkpointing=True).fits:
        return "set activation_checkpointing: true (each layer recomputed in backward: less memory, more compute)"
    if plan.task == "finetune":
        for method in ("lora", "qlora")[("full", "lora", "qlora").index(plan.method):]:
            if method != plan.method and plan_row(plan, shapes, device, room, method=method).fits:
                return f"use method={method}"
    if device.type == "cuda":
        for n in range(2, len(room) + 1):
            # the micro-batch must split evenly over the processes (prepare_run refuses it otherwise): when the plan's
            # does not, micro-batches of n (one sequence each) with the same batch_size, if n divides it
            if micro % n == 0:
                change, extra = {}, ""
            elif plan.batch_size % n == 0:
                change, extra = {"micro_batch": n}, f", grad_accum={plan.batch_size // n}"
            else:
                continue
            if plan_row(plan, shapes, device, room, layout="fsdp", devices=n, **change).fits:
                return f"use {n} GPUs with strategy=fsdp (launcher=torchrun, nproc={n}{extra})"
    for micro_batch, extra in ((micro, ""), (1, f" and set grad_accum to {plan.batch_size} (micro-batches of 1)")):
        fitting = [s for s in range(8, plan.seq_len, 8)
                   if plan_row(plan, shapes, device, room, micro_batch=micro_batch, seq_len=s).fits]
        if fitting:
            return f"lower seq_len to {fitting[-1]}{extra}"
    return "even one sequence of 8 tokens does not fit: use a smaller base model"


def check_memory(plan: TrainPlan, run) -> dict[str, float]:
    """Refuse a plan whose memory need exceeds 90% of the device's, naming the first fix that fits."""
    shapes, room = read_shapes(run.model, plan), devices_memory(run.device)
    row = plan_row(plan, shapes, run.device, room)
    if row.fits:
        return {k: getattr(row, k) for k in ("weights", "gradients", "optimizer", "activations", "total")}
    where = f"{row.devices} x {run.device.type}" if row.devices > 1 else str(run.device)
    usable = USABLE * (min(room[:row.devices]) if run.device.type == "cuda" else room[0] / row.devices)
    raise InputError(f"plan needs about {row.total:.3g} GB per device on {where} but {usable:.3g} GB are usable "
                     f"(method {plan.method}, batch_size {plan.batch_size} x seq_len {plan.seq_len}, micro-batch "
                     f"{plan.batch_size // plan.grad_accum}); {first_fix(plan, shapes, run.device, room)}")


def estimate(plan: TrainPlan, workspace: Path, measure_steps: int = 5) -> Estimate:
    """Build the plan's model and data in a throwaway run directory, account memory, and time
    `measure_steps` real steps (0: memory only, no step run)."""
    tmp = Path(tempfile.mkdtemp(prefix="modelcrew-estimate-"))
    try:
        run = prepare_run(plan, Path(workspace), Run.at(tmp / "run"), False, Distributed(), show_progress=False)
        memory = check_memory(plan, run)
        room = devices_memory(run.device)
        table = memory_table(plan, read_shapes(run.model, plan), run.device, room)
        seconds = _time_steps(plan, run, measure_steps) if measure_steps else None
        horizon = plan.step_horizon()
        minutes = seconds * horizon / 60 if seconds and horizon else plan.budget.minutes
        if plan.budget.minutes and minutes:
            minutes = min(minutes, plan.budget.minutes)
        return Estimate(total_params=run.total_params, trainable_params=run.trainable_params,
                        memory_gb={k: round(v, 3) for k, v in memory.items()}, device=str(run.device),
                        device_memory_gb=round(device_memory(run.device), 1),
                        devices_memory_gb=[round(g, 1) for g in room],
                        memory_table=[r.model_copy(update={k: round(getattr(r, k), 3) for k in
                                                           ("weights", "gradients", "optimizer", "activations", "total")})
                                      for r in table],
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
            with autocast(run.device, plan.precision):
                loss = objective(**batch) / max(supervised_tokens(batch), 1) / plan.grad_accum
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if run.device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            durations.append(time.perf_counter() - t0)
    return sum(durations) / len(durations)
