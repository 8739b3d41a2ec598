"""LoRA step time on CPU of each base that resolves offline: the embedded GGUF bases and a hub-layout model.

    .venv/bin/python bench/bench_bases.py [--workspace DIR] [--steps 2] [--full-steps 1] [--warmup 1] [--batch 4] [--seq-len 256] [--quick]

For each base: resolve it as a goal naming it would (`training.models.base_dir`: the embedded
smollm2-135m-instruct and gemma3-270m are dequantized from their 4-bit GGUF into float32 safetensors once,
in the workspace; `tiny-org/tiny-llama` is a 2-layer Llama written here into a Hugging Face cache laid out
as the hub writes it, under a temporary HF_HOME with HF_HUB_OFFLINE=1, and found by huggingface_hub's own
`snapshot_download`), load it, add LoRA rank 8 to the attention projections, and time AdamW steps on a
fixed batch (batch x seq_len tokens of the example FAQ in the base's chat template) after a warm-up, on
2 torch threads. The baseline in the same run is the same step with every weight trainable (a full
fine-tune), on the same batch, so the table shows what LoRA saves per step. Writes the bench_bases
section of bench/RESULTS.md and bench/results/bench_bases.json. `--quick`: seq_len 64, one timed step of each.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from common import DEFAULT_WORKSPACE, ROOT, limit_cores, result_json, stamp, stamp_rows, system_busy_s, table, write_json, write_section
from common import load_json, parse

OUT = result_json("bench_bases")
FAQ = ROOT / "examples" / "data" / "support_faq.jsonl"
HUB_TINY = "tiny-org/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
THREADS = 2
TINY = {"layers": 2, "width": 64}  # the hub-layout Llama written here


def write_hub_cache(hf_home: Path) -> None:
    """A 2-layer, 64-wide Llama and a BPE tokenizer with a chat template, as `hf download` leaves a repo:
    content in blobs/, relative symlinks in snapshots/<commit>/, the commit in refs/main."""
    import hashlib

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from training.tokenizer import train_bpe

    rows = [json.loads(line) for line in FAQ.read_text(encoding="utf-8").splitlines()]
    tokenizer = train_bpe([f"{r['question']} {r['answer']}" for r in rows], 1024)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=TINY["width"], intermediate_size=4 * TINY["width"],
                         num_hidden_layers=TINY["layers"],
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    files = Path(tempfile.mkdtemp(prefix="bench-bases-files-"))
    LlamaForCausalLM(config).save_pretrained(files, safe_serialization=True)
    tokenizer.save_pretrained(files)
    repo = hf_home / "hub" / f"models--{HUB_TINY.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in sorted(files.iterdir()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)


def fixed_batch(tokenizer, batch: int, seq_len: int):
    """batch x seq_len tokens of the FAQ rendered in the base's chat template (as plain text when it has
    none: a step's time depends on the shape only), cut into rows."""
    import torch

    rows = [json.loads(line) for line in FAQ.read_text(encoding="utf-8").splitlines()]
    ids: list[int] = []
    for r in rows:
        if tokenizer.chat_template:
            ids += tokenizer.apply_chat_template([{"role": "user", "content": r["question"]},
                                                  {"role": "assistant", "content": r["answer"]}], tokenize=True, return_dict=False)
        else:
            ids += tokenizer(f"{r['question']}\n{r['answer']}\n")["input_ids"]
        if len(ids) >= batch * seq_len:
            break
    return torch.tensor(ids[:batch * seq_len]).view(batch, seq_len)


def time_steps(model, input_ids, warmup: int, steps: int) -> dict:
    """Seconds of each timed AdamW step on `input_ids` (after `warmup` untimed ones), with the CPU the rest
    of the machine used meanwhile (busy cores beyond this process's own)."""
    import torch

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    times, other = [], []
    for i in range(warmup + steps):
        t0, cpu0, busy0 = time.perf_counter(), time.process_time(), system_busy_s()
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        wall = time.perf_counter() - t0
        if i >= warmup:
            times.append(wall)
            other.append(max(0.0, (system_busy_s() - busy0) - (time.process_time() - cpu0)) / wall)
    return {"step_s": times, "median_s": statistics.median(times), "other_cores_busy": statistics.mean(other),
            "loss": float(loss)}


def bench_base(name: str, workspace: Path, a) -> dict:
    import torch

    from training.contracts import LoraSettings
    from training.models import apply_lora, base_dir, base_source, count_params, load_base

    t0 = time.perf_counter()
    path = base_dir(name, workspace)
    resolve_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model, tokenizer = load_base(path)
    load_s = time.perf_counter() - t0
    input_ids = fixed_batch(tokenizer, a.batch, a.seq_len)
    _, total = count_params(model)
    out = {"base": name, "path": str(path), "source": base_source(path), "model_type": model.config.model_type,
           "chat_template": bool(tokenizer.chat_template), "params": total, "vocab": model.get_input_embeddings().num_embeddings, "resolve_s": resolve_s, "load_s": load_s}
    torch.manual_seed(0)
    full = time_steps(model, input_ids, a.warmup, a.full_steps)  # baseline: every weight trainable
    lora = apply_lora(model, LoraSettings(rank=8, alpha=16))
    out["lora_trainable"] = count_params(lora)[0]
    out["lora"] = time_steps(lora, input_ids, a.warmup, a.steps)
    out["full"] = full
    out["tokens_per_step"] = a.batch * a.seq_len
    print(f"{name}: LoRA {out['lora']['median_s']:.2f} s/step, full {full['median_s']:.2f} s/step", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workspace", type=Path, default=DEFAULT_WORKSPACE, help="where embedded bases are converted (kept)")
    ap.add_argument("--steps", type=int, default=2, help="timed LoRA steps")
    ap.add_argument("--full-steps", type=int, default=1, help="timed full fine-tune steps (the baseline; slower)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--render", action="store_true", help="only rewrite the RESULTS.md section from the last JSON")
    ap.add_argument("--quick", action="store_true", help="seq_len 64, one timed step of each")
    a = parse(ap)
    if a.render:
        return render(load_json(OUT))
    if a.quick:
        a.seq_len, a.steps, a.full_steps = 64, 1, 1
    hf_home = Path(tempfile.mkdtemp(prefix="bench-bases-hf-"))
    os.environ.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")  # before huggingface_hub is imported: it reads them once
    os.environ.pop("HF_HUB_CACHE", None)
    limit_cores()
    import torch

    torch.set_num_threads(THREADS)
    load_start = os.getloadavg()[0]
    started = time.perf_counter()
    write_hub_cache(hf_home)
    bases = [bench_base(name, a.workspace, a) for name in ("smollm2-135m-instruct", "gemma3-270m", HUB_TINY)]
    out = {"bases": bases, "batch": a.batch, "seq_len": a.seq_len, "warmup": a.warmup, "steps": a.steps, "full_steps": a.full_steps,
           "threads": THREADS, "lora_rank": 8, "hub_tiny": TINY, "load_avg_start": load_start, "wall_s": time.perf_counter() - started, **stamp()}
    for b in bases:  # what the table shows of each, kept with the timings it comes from
        lo, fu = b["lora"]["median_s"], b["full"]["median_s"]
        b["shown"] = {"params_m": b["params"] / 1e6, "lora_tokens_per_s": b["tokens_per_step"] / lo,
                      "full_tokens_per_s": b["tokens_per_step"] / fu, "full_over_lora": fu / lo,
                      "other_cores_busy": (b["lora"]["other_cores_busy"] + b["full"]["other_cores_busy"]) / 2}
    out["summary"] = [{"target": f"{b['base']}: LoRA step time on CPU ({THREADS} threads, batch {a.batch} x {a.seq_len}), "
                                 "against a full fine-tune step (no target)",
                       "figure": f"LoRA {b['lora']['median_s']:.2f} s/step; full / LoRA step {b['shown']['full_over_lora']:.2f}x",
                       "met": None} for b in bases]
    write_json(OUT, out)
    render(out)


def render(out: dict) -> None:
    """The bench_bases section of RESULTS.md, from the figures of one run (`out`, as in the JSON)."""
    bases, threads, load_start = out["bases"], out["threads"], out["load_avg_start"]

    def origin(b: dict) -> str:
        if b["source"]:
            return "embedded, dequantized from its 4-bit GGUF to float32" + ("" if b["chat_template"] else "; no chat template")
        return "hub-layout cache, HF_HUB_OFFLINE=1 (huggingface_hub's snapshot_download)"

    lines = ["", "## Bases: LoRA step time on CPU (`bench/bench_bases.py`)", "",
             f"Generated by `bench/bench_bases.py` (`bench/results/bench_bases.json`). Each base resolved as a goal naming it "
             f"would (`training.models.base_dir`), LoRA rank 8 on the attention projections, AdamW, batch {out['batch']} x "
             f"seq_len {out['seq_len']} tokens of the example FAQ in the base's chat template (as plain text for a base without one), {out['warmup']} warm-up step then "
             f"{out['steps']} timed, {threads} torch threads; median step. Baseline in the same run: the same step with every "
             f"weight trainable (full fine-tune; {out['full_steps']} timed after the warm-up). The embedded bases are **dequantized from their 4-bit GGUF** "
             f"(SmolLM2 Q4_1, Gemma 3 Q4_K_M), not the original bf16 weights; `{HUB_TINY}` is a {out['hub_tiny']['layers']}-layer, "
             f"{out['hub_tiny']['width']}-wide Llama "
             "written into a hub-layout cache by the bench, there to time resolution and the real code path, not a model "
             "anyone would train: its step is mostly fixed overhead, so LoRA saves little there.", "",
             "| base | origin | parameters (vocab) | resolve / load | LoRA step (tokens/s) | full step (tokens/s) | full / LoRA step | other cores busy |",
             "|---|---|---|---|---|---|---|---|"]
    for b in bases:
        lo, fu, shown = b["lora"]["median_s"], b["full"]["median_s"], b["shown"]
        lines.append(f"| {b['base']} | {origin(b)} | {shown['params_m']:,.1f} M ({b['vocab']:,}) | {b['resolve_s']:.1f} s / "
                     f"{b['load_s']:.1f} s | {lo:.2f} s ({shown['lora_tokens_per_s']:,.0f}) | {fu:.2f} s "
                     f"({shown['full_tokens_per_s']:,.0f}) | {shown['full_over_lora']:.2f}x | {shown['other_cores_busy']:.2f} |")
    lines += ["", "'resolve' includes the one-time GGUF conversion when the workspace had not converted that base yet; "
              "'other cores busy' is the CPU other processes used during the timed steps (cores), which slows the figures.", "",
              *table([*stamp_rows(out, f"{threads} torch threads, "), ("load average (1 min) at start", f"{load_start:.2f}"),
                      ("bench wall time", f"{out['wall_s']:.0f} s")]), ""]
    write_section("bench_bases", lines)
    print("\n".join(lines[1:-1]))


if __name__ == "__main__":
    main()
