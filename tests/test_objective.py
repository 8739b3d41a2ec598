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
