"""Evaluation: token-weighted loss and perplexity (more metrics build on these)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from training.batches import IGNORE, Example, collate


@torch.no_grad()
def mean_loss(model, examples: list[Example], batch_size: int, device, pad_id: int, max_batches: int | None = None) -> float:
    """Mean cross-entropy per target token over `examples` (in order: deterministic)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    for b, start in enumerate(range(0, len(examples), batch_size)):
        if max_batches is not None and b >= max_batches:
            break
        batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size], pad_id).items()}
        with autocast:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["labels"][:, 1:]
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=IGNORE, reduction="sum")
        total += float(loss)
        count += int((targets != IGNORE).sum())
    model.train(was_training)
    return total / max(count, 1)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
