"""The training objective: next-token cross-entropy, with the output layer applied only where it counts.

A causal LM's output layer is its largest matmul (SmolLM2: 576 x 49,152). Fine-tuning on pairs and
chat supervises only the answers (often half the tokens or fewer), so computing logits for every
position and then masking most of them away wastes that matmul and its backward. `NextTokenLoss`
runs the decoder, keeps the hidden states of supervised positions, and applies the output layer to
those alone: the same loss as `model(**batch).loss`, for less compute and memory. It is an
`nn.Module`, so DDP and `torch.compile` wrap it like the model itself.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from training.batches import IGNORE


class NextTokenLoss(torch.nn.Module):
    def __init__(self, model) -> None:
        super().__init__()
        self.model = model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps the model
        self.decoder = base.get_decoder()
        self.head = base.get_output_embeddings()
        self.softcap = getattr(base.config, "final_logit_softcapping", None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The summed loss over supervised tokens: the caller divides by the step's token count, so
        micro-batches and processes with different numbers of answer tokens weigh each token the same."""
        hidden = self.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != IGNORE
        logits = self.head(hidden[:, :-1][keep]).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return F.cross_entropy(logits, targets[keep], reduction="sum")


def autocast(device: torch.device):
    """bf16 autocast on CUDA; full precision on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def supervised_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE).sum())
