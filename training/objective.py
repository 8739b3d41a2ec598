"""The training objective: next-token cross-entropy, with the output layer applied only where it counts.

A causal LM's output layer is its largest matmul (SmolLM2: 576 x 49,152). Fine-tuning on pairs and
chat supervises only the answers (often half the tokens or fewer), so computing logits for every
position and then masking most of them away wastes that matmul and its backward. `NextTokenLoss`
runs the decoder, keeps the hidden states of supervised positions, and applies the output layer to
those alone: the same loss as `model(**batch).loss`, for less compute and memory. It is an
`nn.Module`, so DDP and `torch.compile` wrap it like the model itself.

The loss itself is taken chunk by chunk (`chunked_linear_cross_entropy`): a chunk of positions gets its logits,
their log-sum-exp and, when training, its gradients at once, so the full [positions, vocabulary] float32 logits,
their log-softmax and its gradient (three copies, 200 MB each for 1,000 SmolLM2 answer tokens; a chunk is 64 MB, large enough that the output layer's weight is read a few times, not dozens) never exist at the
same time; the matmuls are the same.

Packed pretraining windows supervise every position and have no padding: there `packed=True` skips
the selection (a data-dependent shape, which would force a host sync and a graph break under
`torch.compile`) and the attention mask (so SDPA takes its causal flash kernel).
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from training.batches import IGNORE


class NextTokenLoss(torch.nn.Module):
    def __init__(self, model, packed: bool = False) -> None:
        super().__init__()
        self.model, self.packed = model, packed
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps the model
        self.decoder = base.get_decoder()
        self.head = base.get_output_embeddings()
        self.softcap = getattr(base.config, "final_logit_softcapping", None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                **preference: torch.Tensor) -> torch.Tensor:
        """The summed loss over supervised tokens: the caller divides by the step's token count, so
        micro-batches and processes with different numbers of answer tokens weigh each token the same.
        A preference batch's extra tensors (`ref_logps`, `desirable`) are ignored: its rows then cost what the
        preference loss costs (`training.estimate` times steps this way)."""
        if self.packed:
            hidden = self.decoder(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1]
            targets = labels[:, 1:].flatten()
        else:
            hidden = self.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            keep = labels[:, 1:] != IGNORE
            hidden, targets = hidden[:, :-1][keep], labels[:, 1:][keep]
        hidden = hidden.flatten(0, -2)
        if self.fusable():
            return chunked_linear_cross_entropy(hidden, self.head.weight, targets)
        return F.cross_entropy(self.logits(hidden), targets, ignore_index=IGNORE, reduction="sum")

    def fusable(self) -> bool:
        """A plain output layer (no bias, no logit softcap, not sharded by FSDP, not quantized) can be fused."""
        head = self.head
        return (type(head) is torch.nn.Linear and head.bias is None and not self.softcap
                and not isinstance(head.weight, DTensor))

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


class PreferenceLoss(NextTokenLoss):
    """The preference objectives over rows collated by `training.batches.collate_preference`: each row's summed
    log-probability of its answer tokens (the output layer applied on those positions alone, as in
    `NextTokenLoss`), then per pair or rated answer:

    - dpo (Rafailov et al. 2023): -log sigmoid(beta * ((pc - rc) - (pr - rr))), p the policy's and r the
      reference's log-probabilities of the chosen (c) and rejected (r) answers;
    - orpo (Hong et al. 2024; no reference): the chosen answer's mean token loss + beta * -log sigmoid(log odds
      ratio), odds of an answer = m / (1 - m) for m its mean per-token probability (in logs: lm - log(1 - e^lm));
    - kto (Ethayarajh et al. 2024; the losses as TRL's KTOTrainer.kto_loss computes them): r = p - ref; a desirable
      answer costs 1 - sigmoid(beta (r - z)), an undesirable one 1 - sigmoid(beta (z - r)), z the KL estimate
      (no gradient, at least 0). TRL estimates z on mismatched (prompt, another row's answer) pairs, a third
      forward pass; here it is the micro-batch's mean r, which needs none.

    Returns the SUM over pairs (or rated answers): the loop divides by the step's count of them (`units`), so
    micro-batches and processes weigh each pair the same."""

    def __init__(self, model, kind: str, beta: float) -> None:
        super().__init__(model)
        self.kind, self.beta = kind, beta

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                ref_logps: torch.Tensor, desirable: torch.Tensor | None = None) -> torch.Tensor:
        logps, tokens = self.row_logps(input_ids, attention_mask, labels)
        return preference_loss(self.kind, self.beta, logps, tokens, ref_logps.float(), desirable).sum()

    def row_logps(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed log-probability of the supervised tokens, their count) per row, in float32."""
        sums, counts = self.per_row(input_ids, attention_mask, labels)
        return -sums.float(), counts


def preference_loss(kind: str, beta: float, logps: torch.Tensor, tokens: torch.Tensor, ref: torch.Tensor,
                    desirable: torch.Tensor | None = None) -> torch.Tensor:
    """The per-pair (or per rated answer) loss of `PreferenceLoss`, from each row's summed log-probability."""
    if kind == "kto":
        r = logps - ref
        z = r.mean().detach().clamp(min=0)
        return torch.where(desirable, 1 - torch.sigmoid(beta * (r - z)), 1 - torch.sigmoid(beta * (z - r)))
    k = len(logps) // 2
    if kind == "dpo":
        return -F.logsigmoid(beta * ((logps[:k] - ref[:k]) - (logps[k:] - ref[k:])))
    if kind == "orpo":
        mean = logps / tokens.clamp(min=1)
        mean = mean.clamp(max=-1e-6)  # log(1 - e^m) is -inf at m = 0 (an answer of probability 1)
        log_odds = mean - torch.log1p(-torch.exp(mean))
        return -mean[:k] + beta * -F.logsigmoid(log_odds[:k] - log_odds[k:])
    raise ValueError(f"objective: {kind}")


def units(batch: dict[str, torch.Tensor]) -> int:
    """What a step's loss is averaged over: rated answers (KTO), pairs (DPO, ORPO), else supervised tokens."""
    if "desirable" in batch:
        return len(batch["desirable"])
    if "ref_logps" in batch:
        return len(batch["ref_logps"]) // 2
    return supervised_tokens(batch)


@torch.no_grad()
def reference_logps(model, examples: list, batch_size: int, device, pad_id: int, precision: str = "auto") -> int:
    """Fill each `PreferenceExample`'s `ref_logps` with its rows' answer log-probabilities under `model` as it is
    now (the run's starting weights; a LoRA model with its adapters disabled): DPO's and KTO's reference, computed
    once before the first step, so no second copy of the model is held. Returns the rows scored."""
    from training.batches import collate_preference

    was_training = model.training
    model.eval()
    objective = PreferenceLoss(model, "dpo", 1.0)
    off = model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
    scored = 0
    with off:
        for start in range(0, len(examples), batch_size):
            items = examples[start:start + batch_size]
            batch = {k: v.to(device) for k, v in collate_preference(items, pad_id).items()}
            with autocast(device, precision):
                logps, _ = objective.row_logps(batch["input_ids"], batch["attention_mask"], batch["labels"])
            width, k = len(items[0].rows), len(items)
            values = logps.tolist()
            for i, item in enumerate(items):
                item.ref_logps = tuple(values[j * k + i] for j in range(width))
            scored += len(values)
    model.train(was_training)
    return scored


CHUNK_ELEMENTS = 2**24  # logits per chunk: 64 MB of float32 (341 positions of SmolLM2's 49,152-entry vocabulary)


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """sum(cross_entropy(hidden @ weight.T, targets)) over positions whose target is not IGNORE, in float32,
    computed in chunks of positions. With gradients on, each chunk's gradients w.r.t. `hidden` and `weight` are
    made in the forward (softmax - one-hot, times the operands), so backward only scales them."""
    rows = max(16, chunk_elements // weight.shape[0])
    need = (hidden.requires_grad, weight.requires_grad) if torch.is_grad_enabled() else (False, False)
    return _ChunkedLinearCE.apply(hidden, weight, targets, rows, need)


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, rows, need):
        device = hidden.device.type
        # the matmuls in autocast's dtype when it is on (as the unfused head would run), the softmax in float32
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        with torch.autocast(device, enabled=False):
            w = weight.to(dtype)
            grad_h = torch.empty_like(hidden) if need[0] else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need[1] else None
            loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, len(hidden), rows):
                h, t = hidden[start:start + rows].to(dtype), targets[start:start + rows]
                logits = (h @ w.T).float()
                valid = t != IGNORE
                picked = t.clamp_min(0).unsqueeze(1)
                target_logit = logits.gather(1, picked).squeeze(1)
                # log-sum-exp in place: the chunk's logits become exp(logit - max), then the softmax (its gradient)
                top = logits.amax(-1, keepdim=True)
                total = logits.sub_(top).exp_().sum(-1, keepdim=True)
                loss += ((top + total.log()).squeeze(1) - target_logit).mul_(valid).sum()
                if need[0] or need[1]:
                    g = logits.div_(total)
                    g.scatter_add_(1, picked, torch.full(picked.shape, -1.0, device=g.device))
                    g.mul_(valid.unsqueeze(1))
                    if need[0]:
                        grad_h[start:start + rows] = g.to(dtype) @ w
                    if need[1]:
                        grad_w.addmm_(g.T, h.float())
        ctx.save_for_backward(*(x for x in (grad_h, grad_w) if x is not None))
        ctx.need, ctx.weight_dtype = need, weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        saved = iter(ctx.saved_tensors)
        grad_h = next(saved) * grad_loss if ctx.need[0] else None
        grad_w = (next(saved) * grad_loss).to(ctx.weight_dtype) if ctx.need[1] else None
        return grad_h, grad_w, None, None, None


CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of CPUs that multiply bfloat16 natively


def cpu_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies bfloat16 natively (AMX or AVX512-BF16), where bf16 autocast pays
    (`bench/bench_precision.py`); elsewhere oneDNN emulates it and float32 is faster. MODELCREW_CPU_BF16=0 or 1
    overrides the detection (the tests pin 0, so their figures do not depend on the machine CI draws)."""
    forced = os.environ.get("MODELCREW_CPU_BF16", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return False
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return any(flag in flags for flag in CPU_BF16_FLAGS)


def compute_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """What matmuls run in under a plan's `precision` (None: float32). `auto`: bf16 autocast on CUDA and on CPUs
    that multiply bf16 natively (`cpu_bf16`), float32 on other CPUs; `float32` and `bfloat16` say it outright."""
    if precision == "float32":
        return None
    if precision == "bfloat16" or device.type == "cuda" or (device.type == "cpu" and cpu_bf16()):
        return torch.bfloat16
    return None


def precision_name(device: torch.device, precision: str = "auto") -> str:
    """What a run records: the precision its matmuls ran in."""
    return "bfloat16" if compute_dtype(device, precision) is not None else "float32"


def autocast(device: torch.device, precision: str = "auto"):
    """The autocast context of `compute_dtype` (float32 weights stay the master copy), or none."""
    dtype = compute_dtype(device, precision)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def supervised_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE).sum())
