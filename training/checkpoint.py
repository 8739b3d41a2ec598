"""Atomic, pickle-free checkpoints: safetensors for every tensor, JSON for everything else.

A checkpoint directory `checkpoints/step-000120/` holds
  state.safetensors  trainable weights ("model.*"), optimizer moments ("optim.*"), RNG states ("rng.*")
  meta.json          step, data position, optimizer hyper-parameters, best-so-far, python RNG state
It is written under a temporary name and renamed into place; `checkpoints/latest` (a one-line file,
replaced atomically) names the newest complete one. Only the trainable tensors are stored: a LoRA
checkpoint is the adapter (a few MB), the frozen base is rebuilt from the plan on resume.
An FSDP run's checkpoint holds one `shard-RRR-of-WWW.safetensors` per process instead of state.safetensors
(`training.parallel.save_shards`), and meta.json says how many.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from training.atomic import atomic_dir, write_text_atomic

KEEP = 2  # complete checkpoints kept besides the newest best


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The trainable weights, whole, on the CPU. FSDP's sharded weights are gathered: under FSDP every process
    must call this (a collective)."""
    return {name: _whole(p.detach()).to("cpu").contiguous().clone() for name, p in model.named_parameters() if p.requires_grad}


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A tensor itself, or a sharded (DTensor) one gathered whole."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def load_trainable_state(model, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in tensors]
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} trainable tensors, e.g. {missing[0]}")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].device))


def save_checkpoint(run_dir: Path, step: int, model, optimizer, meta: dict) -> Path:
    root = Path(run_dir) / "checkpoints"
    target = root / f"step-{step:07d}"
    with atomic_dir(target) as tmp:
        tensors = {f"model.{k}": v for k, v in trainable_state(model).items()}
        opt = optimizer.state_dict()
        for idx, state in opt["state"].items():
            for key, value in state.items():
                tensors[f"optim.{idx}.{key}"] = value.detach().to("cpu").contiguous().clone()
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{i}"] = s
        save_file(tensors, tmp / "state.safetensors")
        py_version, py_state, py_gauss = random.getstate()
        full_meta = {**meta, "step": step, "param_groups": opt["param_groups"],
                     "python_rng": [py_version, list(py_state), py_gauss]}
        (tmp / "meta.json").write_text(json.dumps(full_meta, indent=1), encoding="utf-8")
    write_text_atomic(root / "latest", target.name + "\n")
    _prune(root)
    return target


def _prune(root: Path) -> None:
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)


def save_sharded_checkpoint(run_dir: Path, step: int, model, params, optimizer, meta: dict, dist) -> Path:
    """Every process of an FSDP job writes its shard into one temporary directory; the first then adds meta.json
    and renames it into place (so a kill at any point leaves the previous checkpoint as `latest`)."""
    from training.parallel import save_shards

    root = Path(run_dir) / "checkpoints"
    target = root / f"step-{step:07d}"
    tmp = root / f".tmp-{target.name}"
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    extra = save_shards(tmp, model, params, optimizer, dist)
    dist.barrier()
    if dist.is_main:
        (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, **extra}, indent=1), encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        write_text_atomic(root / "latest", target.name + "\n")
        _prune(root)
    dist.barrier()
    return target


def load_sharded_checkpoint(path: Path, model, params, optimizer, dist) -> dict:
    from training.parallel import load_shards

    meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    load_shards(path, model, params, optimizer, dist, meta)
    return meta


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / "meta.json").exists() else None


def load_checkpoint(path: Path, model, optimizer) -> dict:
    """Restore weights, optimizer and RNG states in place; returns the metadata."""
    meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    if "shards" in meta:
        from training.errors import InputError

        raise InputError(f"--resume: {path.name} is an FSDP checkpoint of {meta['shards']} processes; resume with "
                         f"launcher=torchrun, strategy=fsdp, nproc={meta['shards']}")
    tensors = load_file(str(path / "state.safetensors"))
    load_trainable_state(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    version, py_state, gauss = meta["python_rng"]
    random.setstate((version, tuple(py_state), gauss))
    return meta
