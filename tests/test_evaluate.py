"""Evaluation: answer metrics, label ranking accuracy, and a full evaluation.json beside its baseline."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.helpers import write_jsonl
from training.contracts import Budget, TrainPlan
from training.data import curate_to_workspace
from training.evaluate import evaluate_run, exact_match, rouge_l, token_f1
from training.loop import train

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(seq_len=64, batch_size=8, lr=3e-3, warmup_steps=2, eval_every=10, eval_batches=2, checkpoint_every=100)


@pytest.mark.parametrize("pred,ref,em,f1,rl", [
    ("The answer is 42.", "the answer is 42", 1.0, 1.0, 1.0),
    ("the cat sat on the mat", "the cat is on the mat", 0.0, 0.75, 0.75),
    ("completely different", "nothing shared", 0.0, 0.0, 0.0),
    ("on mat the cat", "the cat on mat", 0.0, 1.0, 2 / 3),  # same bag of words, different order
])
def test_answer_metrics(pred, ref, em, f1, rl):
    assert exact_match(pred, ref) == em
    assert token_f1(pred, ref) == pytest.approx(f1)
    assert rouge_l(pred, ref) == pytest.approx(rl)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return tmp_path_factory.mktemp("eval-ws")


@pytest.fixture(scope="module")
def tiny_base(ws):
    fp = curate_to_workspace(str(ROOT / "examples/data/support_faq.jsonl"), ws, format="text").summary.fingerprint
    plan = TrainPlan(task="pretrain", dataset=fp, size="tiny", budget=Budget(steps=4), **TINY)
    return Path(train(plan, ws, "base", show_progress=False).final_dir)


def test_classification_is_learned_and_scored_by_label_likelihood(ws, tiny_base, tmp_path):
    rng = random.Random(0)
    fruits, vehicles = ["apple", "banana", "cherry", "mango", "peach"], ["truck", "bicycle", "tractor", "scooter", "van"]
    rows = []
    for i in range(240):
        label = "fruit" if i % 2 else "vehicle"
        word = rng.choice(fruits if label == "fruit" else vehicles)
        rows.append({"text": f"Item {i}: I saw a {word} near house {rng.randrange(1000)}.", "label": label})
    fp = curate_to_workspace(str(write_jsonl(tmp_path / "items.jsonl", rows)), ws).summary.fingerprint
    plan = TrainPlan(task="finetune", dataset=fp, base_model=str(tiny_base), method="full",
                     budget=Budget(steps=80), **TINY)
    train(plan, ws, "cls", show_progress=False)
    ev = evaluate_run(ws, "cls", max_examples=24)
    assert ev.format == "classification" and ev.examples["test"] >= 20
    assert ev.metrics["accuracy"] >= 0.9
    assert ev.metrics["accuracy"] > ev.metrics["base_accuracy"]
    assert json.loads((ws / "runs" / "cls" / "evaluation.json").read_text())["metrics"]["accuracy"] == ev.metrics["accuracy"]


def test_pairs_evaluation_has_every_metric_beside_its_baseline_and_is_deterministic(ws, tiny_base):
    fp = curate_to_workspace(str(ROOT / "examples/data/support_faq.jsonl"), ws).summary.fingerprint
    plan = TrainPlan(task="finetune", dataset=fp, base_model=str(tiny_base), method="lora",
                     budget=Budget(steps=3), **{**TINY, "seq_len": 128})
    train(plan, ws, "qa", show_progress=False)
    first = evaluate_run(ws, "qa", max_examples=4)
    for key in ("val_perplexity", "test_perplexity", "general_perplexity", "exact_match", "f1", "rougeL"):
        assert key in first.metrics and f"base_{key}" in first.metrics
    assert first.metrics["val_perplexity"] > 1 and first.metrics["general_perplexity"] > 1
    assert len(first.samples) == 5
    assert all(s["reference"] and s["base"] is not None and s["candidate"] is not None for s in first.samples)
    assert evaluate_run(ws, "qa", max_examples=4).metrics == first.metrics


def test_pretraining_run_has_no_baseline(ws, tiny_base):
    ev = evaluate_run(ws, "base", max_examples=2)
    assert ev.base_model is None and not any(k.startswith("base_") for k in ev.metrics)
    assert ev.samples == [] and "val_perplexity" in ev.metrics
