"""The attention a LoRA run trains with on the CPU: plain matmuls and a float32 softmax, as transformers' eager
attention computes them, keeping only what backward needs.

On the CPU, PyTorch's SDPA kernel (transformers' default) spent a quarter of a SmolLM2 LoRA step in its backward;
eager attention runs the same step faster (two batched matmuls and a softmax) but keeps each layer's float32
softmax, its bfloat16 copy and the key/value heads repeated for grouped-query attention for backward, which raised
the run's peak RSS by ~250 MB. `lean_attention` computes eager's forward (the scores' softmax in float32, then cast
to the query's dtype, as eager does) and saves the query, the unrepeated keys and values and the probabilities in
the query's dtype; its backward recomputes the rest (the softmax's gradient from those probabilities, in float32).
`bench/bench_lora.py` measures the step and the peak against peft + the HF Trainer; `tests/test_attention.py`
checks outputs and gradients against eager attention.
"""

from __future__ import annotations

import torch

NAME = "modelcrew_lean"  # registered with transformers' attention and mask interfaces by `register`


def _repeat(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[batch, kv_heads, seq, dim] -> [batch, kv_heads * groups, seq, dim] (grouped-query attention)."""
    if groups == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)


def _fold(x: torch.Tensor, groups: int) -> torch.Tensor:
    """The gradient of `_repeat`: each key/value head's query groups summed."""
    if groups == 1:
        return x
    b, h, s, d = x.shape
    return x.view(b, h // groups, groups, s, d).sum(2)


class _LeanAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, bias, scaling: float, groups: int):
        dtype = query.dtype
        with torch.autocast(query.device.type, enabled=False):
            key, value = key.to(dtype), value.to(dtype)
            scores = (query @ _repeat(key, groups).transpose(-1, -2)).float().mul_(scaling)
            if bias is not None:
                scores += bias
            probs = torch.softmax(scores, dim=-1).to(dtype)
            del scores
            out = probs @ _repeat(value, groups)
        ctx.save_for_backward(query, key, value, probs)
        ctx.scaling, ctx.groups = scaling, groups
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, probs = ctx.saved_tensors
        groups, dtype = ctx.groups, query.dtype
        with torch.autocast(query.device.type, enabled=False):
            grad_out = grad_out.to(dtype)
            grad_value = _fold(probs.transpose(-1, -2) @ grad_out, groups)
            grad_probs = (grad_out @ _repeat(value, groups).transpose(-1, -2)).float()
            p = probs.float()
            # softmax's gradient: p * (dp - sum(dp * p)), in float32 as eager's softmax backward
            grad_scores = grad_probs.sub_((grad_probs * p).sum(-1, keepdim=True)).mul_(p).mul_(ctx.scaling).to(dtype)
            del grad_probs, p
            grad_query = grad_scores @ _repeat(key, groups)
            grad_key = _fold(grad_scores.transpose(-1, -2) @ query, groups)
        return grad_query, grad_key, grad_value, None, None, None


def lean_attention(module, query, key, value, attention_mask, scaling: float, dropout: float = 0.0, **kwargs):
    """transformers' attention-function signature: (attn_output [batch, seq, heads, dim], None). `attention_mask`
    is eager's additive float mask. With attention dropout in training, transformers' eager attention itself."""
    if dropout and module.training:
        from transformers.models.llama.modeling_llama import eager_attention_forward

        return eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    bias = attention_mask[:, :, :, : key.shape[-2]] if attention_mask is not None else None
    groups = query.shape[1] // key.shape[1]
    out = _LeanAttention.apply(query, key, value, bias, scaling, groups)
    return out.transpose(1, 2).contiguous(), None


def cpu_attention(device, method: str, config, seq_len: int) -> str | None:
    """The attention a run trains with: this module's for LoRA on the CPU where its kept probabilities stay small
    (`lean_on`), registered under NAME; None (the model's own choice) elsewhere: GPUs, full-weight and scratch runs,
    where it was not measured to pay, and long sequences, where SDPA keeps memory linear in the length."""
    heads = getattr(config, "num_attention_heads", None)
    return register() if heads and lean_on(device, method, heads, config.hidden_size, seq_len) else None


def lean_on(device, method: str, heads: int, hidden: int, seq_len: int) -> bool:
    """LoRA on the CPU, with the probabilities kept per token (heads x seq_len) no more than attention's query, key,
    value and output take (4 x hidden): SmolLM2 up to seq_len 256. The estimate counts them where it is on."""
    return device.type == "cpu" and method == "lora" and heads * seq_len <= 4 * hidden


def register() -> str:
    """Make `lean_attention` a choice of `model.set_attn_implementation` (its mask: eager's); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(NAME, lean_attention)
    AttentionMaskInterface.register(NAME, eager_mask)
    return NAME
