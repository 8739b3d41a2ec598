"""The engine's CUDA paths, run for real on a GPU machine (not a test: CI has no GPU).

    python3 bench/gpu_check.py [--workspace DIR] [--allow-dirty]

Pretrains a tiny model on the example FAQ, then fine-tunes it with LoRA and with QLoRA (4-bit NF4
base through bitsandbytes, when installed), evaluates each, and checks what must hold: bf16 autocast
on CUDA, the base's linear layers really 4-bit under QLoRA, only adapters trained, the merged export a
plain full-precision checkpoint that evaluates. Prints one line per check, writes bench/results/gpu_check.json and
the gpu_check section of bench/RESULTS.md, and exits 1 if any fails. Without a GPU it exits 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

from common import ROOT, parse, result_json, write_json, write_section

OUT = result_json("gpu_check")
FAQ = ROOT / "examples" / "data" / "support_faq.jsonl"
COMMON = dict(batch_size=8, lr=2e-3, warmup_steps=2, eval_every=5, eval_batches=2, checkpoint_every=5, device="cuda")


def main() -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workspace", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="(the same run: it is already short)")
    if not torch.cuda.is_available():
        print("gpu_check: needs a CUDA GPU (none here)", file=sys.stderr)
        return 2
    a = parse(ap)
    ws = a.workspace or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    from safetensors.torch import load_file

    from training.contracts import Budget, LoraSettings, TrainPlan
    from training.data import curate_to_workspace
    from training.evaluate import evaluate_run
    from training.loop import train

    failures, checks = [], []

    def check(ok: bool, what: str) -> None:
        print(("ok   " if ok else "FAIL ") + what, flush=True)
        checks.append({"ok": ok, "check": what})
        if not ok:
            failures.append(what)

    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    text = curate_to_workspace(str(FAQ), ws, format="text").summary.fingerprint
    pairs = curate_to_workspace(str(FAQ), ws).summary.fingerprint
    base = train(TrainPlan(task="pretrain", dataset=text, size="small", seq_len=128, budget=Budget(steps=20), **COMMON),
                 ws, "base", show_progress=False)
    check(base.status == "completed" and base.device.startswith("cuda"), f"pretrain on {base.device}: {base.status}, "
          f"{base.tokens_per_second:,.0f} tok/s, val loss {base.final_val_loss:.3f}, peak {base.peak_memory_mb:,.0f} MiB")
    methods = ["lora"] + (["qlora"] if importlib.util.find_spec("bitsandbytes") else [])
    if "qlora" not in methods:
        print("skip qlora: bitsandbytes is not installed")
    for method in methods:
        plan = TrainPlan(task="finetune", dataset=pairs, base_model=base.final_dir, method=method, seq_len=256,
                         lora=LoraSettings(rank=8, alpha=16, dropout=0.0), budget=Budget(steps=20), **COMMON)
        if method == "qlora":  # look inside the model the loop trains
            from training import setup

            original = setup.apply_lora
            seen = {}

            def spy(model, settings):
                seen["4bit"] = sum(type(m).__name__ == "Linear4bit" for m in model.modules())
                return original(model, settings)

            setup.apply_lora = spy
        result = train(plan, ws, method, show_progress=False)
        check(result.status == "completed", f"{method}: {result.status}, {result.trainable_params:,} of "
              f"{result.total_params:,} trainable, {result.tokens_per_second:,.0f} tok/s, peak {result.peak_memory_mb:,.0f} MiB")
        if method == "qlora":
            check(seen.get("4bit", 0) > 0, f"qlora: {seen.get('4bit', 0)} linear layers of the base loaded as bnb Linear4bit")
        before, after = load_file(Path(base.final_dir) / "model.safetensors"), load_file(Path(result.final_dir) / "model.safetensors")
        changed = sorted(n for n in before if not torch.equal(before[n], after[n]))
        check(bool(changed) and all(any(f".{p}." in n for p in ("q_proj", "k_proj", "v_proj", "o_proj")) for n in changed),
              f"{method}: merged export changes only attention projections ({len(changed)} tensors), dtype {after[changed[0]].dtype}")
        ev = evaluate_run(ws, method, max_examples=4)
        check(ev.metrics["val_perplexity"] < ev.metrics["base_val_perplexity"], f"{method}: val perplexity {ev.metrics['base_val_perplexity']:.2f} -> "
              f"{ev.metrics['val_perplexity']:.2f}")
    device = torch.cuda.get_device_name()
    out = {"device": device, "torch": torch.__version__, "methods": methods, "steps": 20, "checks": checks, "failures": failures,
           "bitsandbytes": importlib.util.find_spec("bitsandbytes") is not None,
           "summary": [{"target": "the CUDA fine-tuning paths end to end (pretrain, " + ", ".join(methods) + "): every check passes",
                        "figure": f"{len(checks) - len(failures)} of {len(checks)} checks passed", "met": not failures}]}
    write_json(OUT, out)
    write_section("gpu_check", ["", "## The CUDA paths end to end (`bench/gpu_check.py`)", "",
                                f"Generated by `bench/gpu_check.py` on {device} (torch {torch.__version__}) from "
                                "`bench/results/gpu_check.json`: a small model pretrained on the example FAQ, then "
                                + " and ".join(m.upper() if m == "qlora" else "LoRA" for m in methods)
                                + f" for {out['steps']} steps each, evaluated; each line one check.", "",
                                "| check | result |", "|---|---|",
                                *(f"| {c['check']} | {'ok' if c['ok'] else 'FAILED'} |" for c in checks), ""])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
