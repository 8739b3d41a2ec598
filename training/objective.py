"""The training objective: next-token cross-entropy, with the output layer applied only where it counts.

A causal LM's output layer is its largest matmul (SmolLM2: 576 x 49,152). Fine-tuning on pairs and
chat supervises only the answers (often half the tokens or fewer), so computing logits for every
position and then masking most of them away wastes that matmul and its backward. `NextTokenLoss`
runs the decoder, keeps the hidden states of supervised positions, and applies the output layer to
those alone: the same loss as `model(**batch).loss`, for less compute and memory. It is an
`nn.Module`, so DDP and `torch.compile` wrap it like the model itself.

Packed pretraining windows supervise every position and have no padding: there `packed=True` skips
the selection (a data-dependent shape, which would force a host sync and a graph break under
`torch.compile`) and the attention mask (so SDPA takes its causal flash kernel).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from training.batches import IGNORE


class NextTokenLoss(torch.nn.Module):
    def __init__(self, model, packed: bool = False) -> None:
        super().__init__()
        self.model, self.packed = model, packed
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps the model
        self.decoder = base.get_decoder()
        self.head = base.get_output_embeddings()
        self.softcap = getattr(base.config, "final_logit_softcapping", None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The summed loss over supervised tokens: the caller divides by the step's token count, so
        micro-batches and processes with different numbers of answer tokens weigh each token the same."""
        if self.packed:
            hidden = self.decoder(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1]
            targets = labels[:, 1:].flatten()
        else:
            hidden = self.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            keep = labels[:, 1:] != IGNORE
            hidden, targets = hidden[:, :-1][keep], labels[:, 1:][keep]
        return F.cross_entropy(self.logits(hidden).flatten(0, -2), targets, ignore_index=IGNORE, reduction="sum")

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden).float()
        return torch.tanh(logits / self.softcap) * self.softcap if self.softcap else logits

    def per_row(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss, supervised tokens) of each row: per-record scores for evaluation's intervals."""
        hidden = self.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        keep = labels[:, 1:] != IGNORE
        losses = F.cross_entropy(self.logits(hidden[:, :-1][keep]), labels[:, 1:][keep], reduction="none")
        rows = keep.nonzero()[:, 0]
        sums = torch.zeros(len(input_ids), device=losses.device, dtype=losses.dtype).index_add_(0, rows, losses)
        return sums, keep.sum(1)


def compute_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """What matmuls run in under a plan's `precision`: bf16 autocast on CUDA unless float32 is asked for; on CPU
    float32 unless bfloat16 is asked for (it pays on CPUs with AMX, `bench/bench_precision.py`); None: float32."""
    if precision == "float32":
        return None
    if device.type == "cuda" or precision == "bfloat16":
        return torch.bfloat16
    return None


def autocast(device: torch.device, precision: str = "auto"):
    """The autocast context of `compute_dtype` (float32 weights stay the master copy), or none."""
    dtype = compute_dtype(device, precision)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def supervised_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE).sum())
