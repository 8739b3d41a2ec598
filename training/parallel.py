"""One model on several processes: DDP replicas or FSDP2 shards (`torch.distributed.fsdp.fully_shard`).

The loop calls `wrap` once and then works the same for every strategy, through the few functions here:
- `wrap`: DDP around the loss module, or each decoder layer and then the loss module sharded with FSDP2 (the
  loss module as the root, so the embedding, final norm and output layer, tied or not, are gathered for its
  forward, which calls the decoder and the output layer apart). On CUDA, FSDP computes in bf16 and reduces
  gradients in float32; the float32 weights stay sharded.
- `gradient_sync`: accumulate micro-batches without communicating until the last one;
- `save_shards` / `load_shards`: FSDP checkpoints, one safetensors file per process holding its shards of the
  trainable weights and optimizer moments and its RNG state (resumable with the same number of processes).
"""

from __future__ import annotations

import json
import os
import random
from contextlib import nullcontext
from pathlib import Path

import torch

from training.errors import InputError


def under_accelerate(plan):
    """The plan as `accelerate launch` asks for it: its FSDP configuration means strategy fsdp (the engine shards
    with its own FSDP2 policy; the configuration's other FSDP settings are not read). DeepSpeed is refused."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        raise InputError("accelerate launch: a DeepSpeed configuration, which this engine does not run; launch with an FSDP "
                         "configuration (or set strategy: fsdp in the plan) to shard the model")
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and plan.strategy != "fsdp":
        return plan.model_copy(update={"strategy": "fsdp"})
    return plan


def sharded(plan, dist) -> bool:
    return dist.world > 1 and plan.strategy == "fsdp"


def wrap(objective: torch.nn.Module, plan, dist, device: torch.device) -> torch.nn.Module:
    """The module the loop calls for a micro-batch's loss; build the optimizer after this (FSDP replaces the
    parameters with sharded ones)."""
    if dist.world == 1:
        return objective
    if plan.strategy == "ddp":
        return torch.nn.parallel.DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda"
              else MixedPrecisionPolicy())
    layers = getattr(objective.decoder, "layers", None)
    if layers is None:
        raise InputError(f"strategy: fsdp shards a decoder's layers, and {type(objective.decoder).__name__} has none; use ddp")
    for layer in layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(objective, mp_policy=policy)
    return objective


def gradient_sync(module: torch.nn.Module, sync: bool):
    """A context for one micro-batch's forward: no gradient communication unless `sync` (the step's last)."""
    if isinstance(module, torch.nn.parallel.DistributedDataParallel):
        return nullcontext() if sync else module.no_sync()
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2 reads the flag in backward, after this context
        module.set_requires_gradient_sync(sync)
    return nullcontext()


def norm_value(norm: torch.Tensor) -> float:
    """The gradient norm clipping returned (a DTensor under FSDP) as a number."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def _shard_file(path: Path, rank: int, world: int) -> Path:
    return path / f"shard-{rank:03d}-of-{world:03d}.safetensors"


def save_shards(tmp: Path, model: torch.nn.Module, params: list[torch.Tensor], optimizer, dist) -> dict:
    """This process's shards of the trainable weights and optimizer moments, and its RNG state, into `tmp`
    (a directory every process writes into); returns what meta.json must add."""
    from safetensors.torch import save_file

    tensors = {f"model.{n}": _local(p) for n, p in model.named_parameters() if p.requires_grad}
    index = {id(p): i for i, p in enumerate(params)}
    for p, state in optimizer.state.items():
        for key, value in state.items():
            tensors[f"optim.{index[id(p)]}.{key}"] = _local(value)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    py_version, py_state, py_gauss = random.getstate()
    save_file(tensors, str(_shard_file(tmp, dist.rank, dist.world)),
              metadata={"python_rng": json.dumps([py_version, list(py_state), py_gauss])})
    return {"shards": dist.world, "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]}


def _local(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return (t.to_local() if hasattr(t, "to_local") else t).to("cpu").contiguous().clone()


def load_shards(path: Path, model: torch.nn.Module, params: list[torch.Tensor], optimizer, dist, meta: dict) -> None:
    """Put this process's shards back in place: weights, optimizer moments (as sharded tensors) and RNG state."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if meta.get("shards") != dist.world:
        raise InputError(f"--resume: checkpoint {path.name} holds {meta.get('shards')} FSDP shards; resume with nproc "
                         f"{meta.get('shards')} (this job has {dist.world} processes)")
    file = _shard_file(path, dist.rank, dist.world)
    tensors = load_file(str(file))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                target = p.to_local() if hasattr(p, "to_local") else p
                target.copy_(tensors[f"model.{name}"].to(target.device))
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            p = params[int(idx)]
            if hasattr(p, "device_mesh") and value.dim() > 0:  # a moment: sharded as its parameter is
                from torch.distributed.tensor import DTensor

                value = DTensor.from_local(value.to(p.to_local().device), p.device_mesh, p.placements,
                                           shape=p.shape, stride=p.stride())
            state.setdefault(int(idx), {})[name] = value
    # the saved hyper-parameters, on the parameter indices this optimizer numbers its groups with
    groups = [{**saved, "params": now["params"]}
              for saved, now in zip(meta["param_groups"], optimizer.state_dict()["param_groups"])]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    with safe_open(str(file), "pt") as f:
        version, py_state, gauss = json.loads(f.metadata()["python_rng"])
    random.setstate((version, tuple(py_state), gauss))
