"""The chunked output layer + cross-entropy: the same loss and gradients as the unfused head, without keeping
[positions, vocabulary] float32 tensors for backward."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.batches import IGNORE
from training.objective import chunked_linear_cross_entropy


def _inputs(n=300, d=32, vocab=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, requires_grad=True)
    weight = (torch.randn(vocab, d, generator=g) * 0.2).requires_grad_()
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[::7] = IGNORE  # prompt positions
    return hidden, weight, targets


def _saved_bytes(fn) -> int:
    """Bytes autograd keeps for backward while `fn` builds its graph (what the peak of a training step holds)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total[0], out


def test_chunks_give_the_unfused_loss_and_gradients():
    hidden, weight, targets = _inputs()
    ref = F.cross_entropy(hidden @ weight.T, targets, ignore_index=IGNORE, reduction="sum")
    ref_h, ref_w = torch.autograd.grad(ref, (hidden, weight))
    # 64 rows per chunk: 5 chunks, the last one short
    loss = chunked_linear_cross_entropy(hidden, weight, targets, chunk_elements=64 * 1000)
    got_h, got_w = torch.autograd.grad(loss * 0.5, (hidden, weight))  # backward scales by the incoming gradient
    assert abs(float(loss) - float(ref)) <= 1e-5 * float(ref)
    assert torch.allclose(got_h, 0.5 * ref_h, atol=1e-6) and torch.allclose(got_w, 0.5 * ref_w, atol=1e-5)
    # a frozen output layer (LoRA) gets no gradient and costs none
    frozen = weight.detach()
    h_only = torch.autograd.grad(chunked_linear_cross_entropy(hidden, frozen, targets, chunk_elements=64 * 1000), hidden)[0]
    assert torch.allclose(h_only, ref_h, atol=1e-6)


def test_under_bfloat16_autocast_the_loss_and_gradients_are_the_unfused_heads():
    """Under bf16 autocast the fused head (its matmuls and the weight's gradient in bfloat16, the softmax in
    float32) gives the unfused head's loss and gradients (F.linear under autocast) to bfloat16's rounding."""
    hidden, weight, targets = _inputs(n=256, d=64, vocab=2048)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=IGNORE, reduction="sum")
        loss = chunked_linear_cross_entropy(hidden, weight, targets, chunk_elements=64 * 2048)  # 4 chunks
    ref_h, ref_w = torch.autograd.grad(ref, (hidden, weight))
    got_h, got_w = torch.autograd.grad(loss, (hidden, weight))
    assert abs(float(loss) - float(ref)) <= 1e-3 * float(ref)
    for got, want in ((got_h, ref_h), (got_w, ref_w)):
        assert float((got - want).norm() / want.norm()) < 5e-3


def test_backward_keeps_no_vocabulary_sized_tensor():
    hidden, weight, targets = _inputs(n=512, d=32, vocab=8192)
    frozen = weight.detach()
    unfused, _ = _saved_bytes(lambda: F.cross_entropy(hidden @ frozen.T, targets, ignore_index=IGNORE, reduction="sum"))
    fused, _ = _saved_bytes(lambda: chunked_linear_cross_entropy(hidden, frozen, targets))
    logits_bytes = 512 * 8192 * 4
    assert unfused >= logits_bytes  # the log-softmax of every position is kept
    assert fused <= hidden.numel() * 4  # only the gradient w.r.t. the hidden states


def test_without_gradients_it_only_scores():
    hidden, weight, targets = _inputs()
    with torch.no_grad():
        saved, loss = _saved_bytes(lambda: chunked_linear_cross_entropy(hidden, weight, targets))
        ref = F.cross_entropy(hidden @ weight.T, targets, ignore_index=IGNORE, reduction="sum")
    assert saved == 0 and not loss.requires_grad and abs(float(loss) - float(ref)) <= 1e-5 * float(ref)


def test_cpu_bf16_reads_the_cpus_own_flags(monkeypatch):
    """AMX or AVX512-BF16 in /proc/cpuinfo's flags (lines as Linux writes them) make `auto` bfloat16 on the CPU;
    AVX-512 alone does not (oneDNN would emulate bf16 there); MODELCREW_CPU_BF16 overrides either way."""
    from training.objective import compute_dtype, cpu_bf16

    monkeypatch.delenv("MODELCREW_CPU_BF16", raising=False)
    epyc = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
    xeon = "processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_bf16 amx_tile amx_int8\n"
    older = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512bw avx512_vnni\n"
    assert cpu_bf16(epyc) and cpu_bf16(xeon)
    assert not cpu_bf16(older) and not cpu_bf16("")
    monkeypatch.setenv("MODELCREW_CPU_BF16", "1")
    assert cpu_bf16(older) and compute_dtype(torch.device("cpu")) == torch.bfloat16
    assert compute_dtype(torch.device("cpu"), "float32") is None
    monkeypatch.setenv("MODELCREW_CPU_BF16", "0")
    assert not cpu_bf16(epyc) and compute_dtype(torch.device("cpu")) is None


def _tiny_lora(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    from training.contracts import LoraSettings
    from training.models import apply_lora

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    model = apply_lora(LlamaForCausalLM(config), LoraSettings(rank=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():  # B starts at zero; a random B makes the adapters' gradients non-trivial
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model


def test_frozen_matmuls_held_in_bfloat16_give_autocasts_loss_and_adapter_gradients():
    """LoRA under bf16 autocast: the frozen decoder weights stored in bfloat16 are exactly what autocast casts the
    float32 ones to; the frozen embedding (and its tied head) is held in bfloat16 too, its lookup upcast so the
    residual stream stays float32: the loss and adapter gradients move by bfloat16's rounding of the embedding only.
    The adapters stay float32."""
    from training.models import hold_frozen_matmuls_in
    from training.objective import NextTokenLoss

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 500, (4, 24), generator=g)
    labels = ids.clone()
    labels[:, :10] = IGNORE
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    results = []
    for hold in (False, True):
        model = _tiny_lora(seed=0)
        saved = hold_frozen_matmuls_in(model, torch.bfloat16) if hold else 0
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = NextTokenLoss(model)(**batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((model, saved, loss.detach(), grads))
    (_, _, ref_loss, ref_grads), (model, saved, loss, grads) = results
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    frozen_linear = [n for n in dtypes if n.endswith("proj.weight") or n.endswith("base_layer.weight")]
    assert frozen_linear and all(dtypes[n] == torch.bfloat16 for n in frozen_linear)
    embed = "base_model.model.model.embed_tokens.weight"
    assert dtypes[embed] == torch.bfloat16 and model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert all(dtypes[n] == torch.float32 for n in grads) and len(grads) == 2 * 2 * 2  # A and B, q and v, 2 layers
    assert saved == 2 * sum(dict(model.named_parameters())[n].numel() for n in [*frozen_linear, embed])
    # the decoder's matmuls get the same operands; only the embedding's rounding moves anything (a residual stream in
    # bfloat16, without the upcast, moved the loss by 1e-2 here)
    assert abs(float(loss - ref_loss)) < 2e-3, (loss, ref_loss)
    worst = max(float((grads[n] - ref_grads[n]).norm() / ref_grads[n].norm()) for n in grads)
    assert 0 < worst < 2e-2, worst  # measured 0.9%: bf16 autocast's own order (lean vs eager attention: ~1%)
