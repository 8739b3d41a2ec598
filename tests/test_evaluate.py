"""Evaluation: answer metrics, label ranking accuracy, and a full evaluation.json beside its baseline."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.helpers import pretrain_tiny_base, write_jsonl
from training.contracts import Budget, TrainPlan
from training.data import curate_to_workspace
from training.batches import IGNORE, read_split
from training.data.store import datasets_dir
from training.errors import InputError
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
    return pretrain_tiny_base(ws)


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
    ev = evaluate_run(ws, "cls")
    test_records = len(read_split(datasets_dir(ws) / fp, "test"))
    assert ev.format == "classification" and ev.examples["test"] == test_records >= 20  # the whole test split
    assert ev.metrics["accuracy"] >= 0.9
    assert ev.metrics["accuracy"] > ev.metrics["base_accuracy"]
    saved = json.loads((ws / "runs" / "cls" / "evaluation.json").read_text())
    assert saved["metrics"]["accuracy"] == ev.metrics["accuracy"]
    # every number with its sample size and interval, and the paired change over the base
    interval = saved["intervals"]["accuracy"]
    assert interval["n"] == test_records and interval["low"] <= ev.metrics["accuracy"] <= interval["high"] < 1.0 + 1e-9
    change = saved["comparisons"]["base"]["accuracy"]
    assert change["kind"] == "difference" and change["low"] > 0  # better than the base, and sure of it
    assert len(saved["per_record"]["candidate"]["accuracy"]) == len(saved["per_record"]["base"]["accuracy"]) == test_records


def test_pairs_evaluation_has_every_metric_beside_its_baseline_and_is_deterministic(ws, tiny_base):
    fp = curate_to_workspace(str(ROOT / "examples/data/support_faq.jsonl"), ws).summary.fingerprint
    plan = TrainPlan(task="finetune", dataset=fp, base_model=str(tiny_base), method="lora",
                     budget=Budget(steps=3), **{**TINY, "seq_len": 128})
    train(plan, ws, "qa", show_progress=False)
    first = evaluate_run(ws, "qa", max_examples=4)
    for key in ("val_perplexity", "test_perplexity", "general_perplexity", "exact_match", "f1", "rougeL"):
        assert key in first.metrics and f"base_{key}" in first.metrics
    assert first.metrics["val_perplexity"] > 1 and first.metrics["general_perplexity"] > 1
    # forgetting is measured on what this workspace's base knew: its own pretraining validation split, not news text
    pretrain_val = read_split(datasets_dir(ws) / json.loads((tiny_base / "lineage.json").read_text())["dataset"], "val")
    assert first.general_corpus.startswith("the base's own competence") and f"{len(pretrain_val)} records" in first.general_corpus
    assert len(first.samples) == 5
    assert all(s["reference"] and s["base"] is not None and s["candidate"] is not None for s in first.samples)
    assert evaluate_run(ws, "qa", max_examples=4).metrics == first.metrics


def test_pretraining_run_has_no_baseline(ws, tiny_base):
    ev = evaluate_run(ws, "base", max_examples=2)
    assert ev.base_model is None and not any(k.startswith("base_") for k in ev.metrics)
    assert ev.samples == [] and "val_perplexity" in ev.metrics


def test_texts_longer_than_seq_len_are_cut_never_dropped_and_every_record_trains(ws, tiny_base, tmp_path):
    rng = random.Random(1)
    words = ["rain", "station", "market", "river", "garden", "engine", "letter", "window", "winter", "ticket", "bridge",
             "candle", "forest", "harbour", "pencil", "valley", "bottle", "meadow", "castle", "lantern"]
    rows = [{"text": f"Note {i}: a {'cat' if i % 2 else 'dog'} was seen. " + " ".join(rng.choices(words, k=rng.randrange(10, 120))),
             "label": "cat" if i % 2 else "dog"} for i in range(120)]
    curated = curate_to_workspace(str(write_jsonl(tmp_path / "long.jsonl", rows)), ws)
    plan = TrainPlan(task="finetune", dataset=curated.summary.fingerprint, base_model=str(tiny_base), method="full",
                     budget=Budget(steps=2), **TINY)  # seq_len 64: most texts are several times longer
    result = train(plan, ws, "long-cls", show_progress=False)
    fit = result.records["train"]
    assert fit["records"] == curated.summary.splits["train"] and fit["dropped"] == 0
    assert fit["cut"] >= fit["records"] // 2 and fit["whole"] + fit["cut"] == fit["records"] and fit["cut_tokens"] > 0
    from training.batches import fitted_examples
    from training.models import load_base

    _, tok = load_base(tiny_base)
    examples, _ = fitted_examples(tok, read_split(datasets_dir(ws) / plan.dataset, "train"), "classification", 64)
    assert len(examples) == fit["records"] and all(len(e.input_ids) <= 64 for e in examples)
    for e, record in zip(examples, read_split(datasets_dir(ws) / plan.dataset, "train")):
        answer = tok.decode(e.input_ids[e.labels != IGNORE])
        assert answer.startswith(record["label"])  # the label survives every cut
    # the evaluation scores the test split cut the same way, and the verdict says what it rests on
    from training.contracts import Goal
    from training.gate import gate

    ev = evaluate_run(ws, "long-cls")
    assert ev.records["train"] == fit and ev.records["test"]["dropped"] == 0 and ev.records["test"]["cut"] > 0
    assert ev.examples["test"] == curated.summary.splits["test"]
    verdict = gate(Goal(task="finetune", data="x", base_model="b", method="full", metric="accuracy"), ev)
    assert f"records: train {fit['records']} of {fit['records']} used ({fit['cut']} cut to fit, 0 dropped)" in verdict.reasons[-1]


def test_answers_longer_than_seq_len_refuse_the_run_with_the_fix(ws, tiny_base, tmp_path):
    rows = [{"prompt": f"Question {i}?", "response": "A long answer that keeps going and going. " * 20} for i in range(40)]
    fp = curate_to_workspace(str(write_jsonl(tmp_path / "long-answers.jsonl", rows)), ws).summary.fingerprint
    plan = TrainPlan(task="finetune", dataset=fp, base_model=str(tiny_base), method="full", budget=Budget(steps=2), **TINY)
    with pytest.raises(InputError, match=r"training records \(100%\) have answers longer than seq_len 64 .* raise seq_len"):
        train(plan, ws, "long-answers", show_progress=False)


def test_exact_match_moves_for_a_model_trained_on_short_answers(ws, tiny_base, tmp_path):
    colours = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black"}
    rows = [{"prompt": f"Question {i}: what colour is the {thing}?", "response": colour}
            for i in range(160) for thing, colour in [list(colours.items())[i % 4]]]
    fp = curate_to_workspace(str(write_jsonl(tmp_path / "colours.jsonl", rows)), ws).summary.fingerprint
    plan = TrainPlan(task="finetune", dataset=fp, base_model=str(tiny_base), method="full",
                     budget=Budget(steps=60), **TINY)
    train(plan, ws, "colours", show_progress=False)
    ev = evaluate_run(ws, "colours")
    assert ev.metrics["base_exact_match"] == 0.0
    assert ev.metrics["exact_match"] >= 0.5 and ev.intervals["exact_match"].low > 0
    assert "stopped at the end of turn" in ev.scoring["answers"]


BUSINESS = ["Shares in the bank fell sharply after it reported lower quarterly profits.",
            "The central bank raised interest rates to curb inflation.",
            "The company's annual revenue grew by ten percent, beating analysts' forecasts.",
            "Oil prices rose as investors worried about supply from the Gulf.",
            "The retailer will cut two thousand jobs after weak Christmas sales.",
            "The merger of the two airlines was approved by regulators."]


def test_length_normalised_accuracy_picks_the_long_right_label_where_the_raw_sum_picks_the_shortest(tmp_path):
    """The embedded SmolLM2 (a real base, dequantized from its GGUF), zero-shot: summed log-likelihood charges a
    long label for every extra token, so it answers 'sport' to business news; per character it does not."""
    import torch

    from training.evaluate import InProcess, score_model
    from training.models import base_dir, base_source, load_base

    path = base_dir("smollm2-135m-instruct", tmp_path)
    assert "dequantized from a 4-bit Q4_1 GGUF" in base_source(path)  # the base is what it is, and says so
    model, tok = load_base(path)
    long_label = "business, finance and the economy"
    records = [{"text": t, "label": long_label} for t in BUSINESS] + [{"text": "The striker scored twice.", "label": "sport"}]
    splits = {"train": records, "val": records[:1], "test": records[:-1]}  # every test record's truth is the long label
    scores = score_model(InProcess(model, tok, torch.device("cpu")), tok, "classification", splits, ("General text.",), 256)
    assert scores.values["accuracy_raw"] == [0.0] * len(BUSINESS)  # the raw sum picked the shortest label each time
    assert scores.values["accuracy"] == [1.0] * len(BUSINESS)
    assert "divided by the answer's length in characters" in scores.notes["accuracy"]


def test_a_relative_target_over_a_base_that_scores_zero_is_refused_at_planning(ws, tiny_base):
    from steps.plan import plan_goal
    from training.contracts import Goal, Target
    from training.data.store import load_summary

    fp = curate_to_workspace(str(ROOT / "examples/data/support_faq.jsonl"), ws).summary.fingerprint
    summary = load_summary(ws, fp)

    def goal(kind: str, value: float) -> Goal:
        target = Target(metric="exact_match", direction="higher", kind=kind, value=value,
                        baseline="base" if kind == "relative" else "none")
        return Goal(task="finetune", data="faq", base_model=str(tiny_base), method="full", metric="exact_match", target=target)

    with pytest.raises(InputError, match=r"the base scores 0 on exact_match \(\d+ validation records\), so '20% above the base' "
                                         r"asks for nothing; give an absolute target"):
        plan_goal(ws, goal("relative", 0.2), summary, use_memory=False)
    plan, _, fit = plan_goal(ws, goal("absolute", 0.3), summary, use_memory=False)  # an absolute target is fine
    assert fit.records == summary.splits["train"] and fit.dropped == 0 and plan.seq_len % 64 == 0


def test_a_lora_run_in_bfloat16_holds_its_frozen_decoder_weights_in_bfloat16(ws, tiny_base, tmp_path):
    """What the loop trains: under bf16 the frozen linear layers and the frozen (tied) embedding are stored in
    bfloat16 (half their bytes, no cast per use), the adapters in float32; under float32 nothing changes."""
    import torch

    from training.runs import Run
    from training.setup import Distributed, build_model

    import gc

    fp = curate_to_workspace(str(ROOT / "examples/data/support_faq.jsonl"), ws).summary.fingerprint
    dtypes, mapped = {}, {}
    for precision in ("bfloat16", "float32"):
        plan = TrainPlan(task="finetune", dataset=fp, base_model=str(tiny_base), method="lora", precision=precision,
                         budget=Budget(steps=1), **TINY)
        model = build_model(plan, ws, Run.at(tmp_path / precision), Distributed(), torch.device("cpu"))[0]
        dtypes[precision] = {n: p.dtype for n, p in model.named_parameters()}
        weights_file = str(next(Path(tiny_base).glob("*.safetensors")).resolve())
        ranges = [tuple(int(x, 16) for x in line.split()[0].split("-"))
                  for line in Path("/proc/self/maps").read_text().splitlines() if line.endswith(weights_file)]
        mapped[precision] = any(lo <= p.data_ptr() < hi for p in model.parameters() for lo, hi in ranges)
        del model
        gc.collect()
    held = dtypes["bfloat16"]
    frozen = [n for n in held if n.endswith(("proj.weight", "base_layer.weight"))]
    assert frozen and {held[n] for n in frozen} == {torch.bfloat16}
    assert {held[n] for n in held if "embed_tokens" in n} == {torch.bfloat16}
    assert {held[n] for n in held if "lora_" in n} == {torch.float32}
    assert set(dtypes["float32"].values()) == {torch.float32}
    # transformers maps the checkpoint file and float32 weights view it; the bf16 model's weights are all copies, so
    # it holds no page of the mapping (which goes once nothing else views it)
    assert mapped == {"bfloat16": False, "float32": True}, mapped


def test_precision_auto_is_bfloat16_in_training_and_evaluation_where_the_cpu_multiplies_it(ws, tiny_base, monkeypatch):
    """`auto` follows the CPU (MODELCREW_CPU_BF16 stands in for /proc/cpuinfo's flags): where bf16 is native the
    run, its validation and its evaluation (candidate and base alike, so their comparison stays paired) run under
    bf16 autocast and say so; elsewhere float32. The same base scored on the same records moves only by rounding."""
    fp = curate_to_workspace(str(ROOT / "examples/data/support_faq.jsonl"), ws).summary.fingerprint
    plan = TrainPlan(task="finetune", dataset=fp, base_model=str(tiny_base), method="lora",
                     budget=Budget(steps=2), **{**TINY, "seq_len": 128, "eval_every": 2})
    runs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("MODELCREW_CPU_BF16", flag)
        result = train(plan, ws, f"auto-{flag}", show_progress=False)
        runs[flag] = (result, evaluate_run(ws, f"auto-{flag}", max_examples=2))
    (bf16, bf16_ev), (fp32, fp32_ev) = runs["1"], runs["0"]
    assert (bf16.precision, bf16_ev.precision, fp32.precision, fp32_ev.precision) == ("bfloat16",) * 2 + ("float32",) * 2
    assert json.loads((ws / "runs" / "auto-1" / "evaluation.json").read_text())["precision"] == "bfloat16"
    assert bf16.final_val_loss != fp32.final_val_loss
    base_bf16, base_fp32 = bf16_ev.metrics["base_val_perplexity"], fp32_ev.metrics["base_val_perplexity"]
    assert base_bf16 != base_fp32 and abs(base_bf16 - base_fp32) / base_fp32 < 0.02
