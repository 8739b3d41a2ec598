"""Atomic, pickle-free checkpoints: safetensors for every tensor, JSON for everything else.

A checkpoint directory `checkpoints/step-000120/` holds
  state.safetensors  trainable weights ("model.*"), optimizer moments ("optim.*"), RNG states ("rng.*")
  meta.json          step, data position, optimizer hyper-parameters, best-so-far, python RNG state
It is written under a temporary name and renamed into place; `checkpoints/latest` (a one-line file,
replaced atomically) names the newest complete one. Only the trainable tensors are stored: a LoRA
checkpoint is the adapter (a few MB), the frozen base is rebuilt from the plan on resume.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from training.atomic import atomic_dir, write_text_atomic

KEEP = 2  # complete checkpoints kept besides the newest best


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().to("cpu").contiguous().clone() for name, p in model.named_parameters() if p.requires_grad}


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
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / "meta.json").exists() else None


def load_checkpoint(path: Path, model, optimizer) -> dict:
    """Restore weights, optimizer and RNG states in place; returns the metadata."""
    tensors = load_file(str(path / "state.safetensors"))
    meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
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
