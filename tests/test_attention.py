"""training.attention: the lean attention a LoRA run trains with on the CPU gives eager attention's outputs and
gradients (float32 to rounding; under bf16 autocast no further from float32 than eager is), keeps less for
backward, and is what a CPU LoRA run's model uses."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from training.attention import NAME, register


def _loss_and_grads(impl: str, bf16: bool):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=6,
                         num_key_value_heads=2, max_position_embeddings=64, attn_implementation=impl)
    model = LlamaForCausalLM(config).train()
    ids = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, 14:] = 0  # right padding
    mask[1, :5] = 0  # left padding: its first queries see no key
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters()}


def _worst(got: dict, want: dict) -> float:
    return max(float((got[n] - want[n]).norm() / want[n].norm().clamp_min(1e-12)) for n in want)


def test_lean_attention_gives_eagers_loss_and_gradients():
    register()
    eager_loss, eager = _loss_and_grads("eager", bf16=False)
    lean_loss, lean = _loss_and_grads(NAME, bf16=False)
    assert abs(lean_loss - eager_loss) < 1e-5 and _worst(lean, eager) < 1e-5
    # under bf16 autocast: within bf16's rounding of float32's gradients, as eager is
    _, eager_bf16 = _loss_and_grads("eager", bf16=True)
    lean_bf16_loss, lean_bf16 = _loss_and_grads(NAME, bf16=True)
    assert abs(lean_bf16_loss - eager_loss) < 1e-3
    assert _worst(lean_bf16, eager) <= 1.5 * _worst(eager_bf16, eager) and _worst(lean_bf16, eager) < 0.05


def test_lean_attention_keeps_less_for_backward_than_eager():
    register()

    def saved(impl: str) -> int:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=96, num_hidden_layers=1, num_attention_heads=6,
                             num_key_value_heads=2, max_position_embeddings=256, attn_implementation=impl)
        model = LlamaForCausalLM(config).train()
        attention = model.model.layers[0].self_attn
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        hidden = torch.randn(2, 200, 96, requires_grad=True)
        positions = model.model.rotary_emb(hidden, torch.arange(200)[None])
        causal = torch.full((200, 200), torch.finfo(torch.float32).min).triu(1)[None, None]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            attention(hidden, positions, causal)
        return total[0]

    scores = 2 * 6 * 200 * 200 * 4  # one float32 softmax: batch x heads x queries x keys
    assert saved("eager") - saved(NAME) >= scores  # eager keeps that softmax and its copy; lean only its probabilities
