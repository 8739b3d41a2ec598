"""A run's own test split as an lm-evaluation-harness task, scored exactly as `modelcrew eval` scores it.

`write_task` turns the test records into a task directory (YAML, JSONL, utils.py) that lm-eval runs like
any of its own tasks; `run_harness` runs it, with any standard tasks the user names, against the run's
model in this process or through a served endpoint. The point is agreement: the same records, cut to the
plan's seq_len as in training (`training.batches.fit_record`) and rendered by the model's chat template,
so the harness's numbers are `training.evaluate`'s and anyone with lm-eval can reproduce them.

- classification: multiple choice over every label; a choice is the whole answer turn the template renders
  (label and end of turn), so acc_norm (log-likelihood per character) is our `accuracy` and acc (summed
  log-likelihood) our `accuracy_raw`;
- pairs / chat: greedy generation until the end of turn, within `modelcrew eval`'s token budget, scored by
  its exact match, token F1 and ROUGE-L (utils.py imports them from training.evaluate).

Pretraining runs (text data) pose no questions and are refused.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

from training.errors import InputError

SIDECAR = "modelcrew.json"  # what run_harness needs besides the task: its name, the model, the longest input

MC_UTILS = '''"""Scoring of a modelcrew classification task (written by serving/harness.py)."""

import numpy as np


def process_results(doc, results):
    lls = np.array([ll for ll, _ in results])
    # every choice starts with the prompt's trailing whitespace (lm-eval will not end a context with it), so its
    # score carries log p(whitespace | prompt): the last choice is that whitespace alone, taken out here
    if doc["whitespace"]:
        lls = lls[:-1] - lls[-1]
    gold = doc["gold"]
    return {"acc": float(np.argmax(lls) == gold),
            "acc_norm": float(np.argmax(lls / np.array(doc["chars"], dtype=float)) == gold)}
'''

GEN_UTILS = '''"""Scoring of a modelcrew generation task (written by serving/harness.py): modelcrew eval's metrics."""

from training.evaluate import exact_match, rouge_l, token_f1


def process_results(doc, results):
    answer, reference = results[0].strip(), doc["reference"]
    return {"exact_match": exact_match(answer, reference), "f1": token_f1(answer, reference),
            "rougeL": rouge_l(answer, reference)}
'''


def task_name(run_id: str) -> str:
    return "modelcrew_" + re.sub(r"\W", "_", run_id)


def _mean(*metrics: str) -> list[dict]:
    return [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in metrics]


def write_task(workspace: Path, run_id: str, out_dir: Path, max_examples: int | None = None) -> Path:
    """Write `out_dir/modelcrew_<run>/` (task YAML, test.jsonl, utils.py) from the run's test split (its first
    `max_examples` records when given); returns that directory."""
    from transformers import AutoTokenizer

    from training.batches import fit_record, read_split, render_chat, to_messages
    from training.data.store import datasets_dir, load_summary
    from training.evaluate import answer_budget, end_of_turn_ids, label_choices
    from training.runs import Run

    run = Run(workspace, run_id).require()
    plan, model_dir = run.plan(), run.model_dir("best")
    if not (model_dir / "lineage.json").exists():
        model_dir = run.model_dir("final")
    if plan is None or not (model_dir / "lineage.json").exists():
        raise InputError(f"{run_id}: no trained model in {run.dir} (train it first)")
    fmt = load_summary(workspace, plan.dataset).format
    if fmt == "text":
        raise InputError(f"{run_id}: a pretraining run (text data) poses no questions for a harness task; "
                         f"its measure is perplexity (modelcrew eval {run_id})")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    splits = {name: read_split(datasets_dir(workspace) / plan.dataset, name) for name in ("train", "val", "test")}
    test = splits["test"][:max_examples] if max_examples else splits["test"]

    def encode(text: str) -> list[int]:  # as lm-eval encodes a request (add_bos_token off: see run_harness)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    if fmt == "classification":
        labels = sorted({r["label"] for rows in splits.values() for r in rows})
        docs, longest, differ = [], 0, 0
        for record in test:
            fitted = label_choices(tokenizer, record, labels, plan.seq_len)
            if fitted is None:  # no room for an answer: modelcrew eval does not score it either
                continue
            context, choices = fitted
            text = tokenizer.decode(context)
            differ += any(encode(text + t) != context + c for c, t in [([], ""), *choices])  # lm-eval re-encodes text
            # lm-eval never ends a context with whitespace (TemplateLM._encode_pair moves it into the continuation)
            # and chat templates end the prompt with some (the newline after the assistant header): each choice
            # starts with it, and a last choice of it alone lets process_results take its log-likelihood out
            prompt = text.rstrip()
            whitespace = text[len(prompt):]
            options = [whitespace + t for _, t in choices] + ([whitespace] if whitespace else [])
            docs.append({"context": prompt, "choices": options, "chars": [len(t) for _, t in choices],
                         "whitespace": whitespace, "gold": labels.index(record["label"])})
            longest = max([longest] + [len(context) + len(c) for c, _ in choices])
        config = {"output_type": "multiple_choice", "doc_to_text": "context", "doc_to_choice": "choices",
                  "doc_to_target": "gold", "target_delimiter": "", "metric_list": _mean("acc", "acc_norm")}
        utils = MC_UTILS
    else:
        kept = [fit_record(tokenizer, r, fmt, plan.seq_len)[0] for r in test]
        conversations = [to_messages(r, fmt) for r in kept if r is not None]
        prompts = [render_chat(tokenizer, c[:-1], add_generation_prompt=True) for c in conversations]
        references = [c[-1]["content"] for c in conversations]
        budget = answer_budget(tokenizer, references)
        docs = [{"prompt": tokenizer.decode(p), "reference": r} for p, r in zip(prompts, references)]
        differ = sum(encode(d["prompt"]) != p for d, p in zip(docs, prompts))
        longest = max(map(len, prompts), default=0) + budget
        stop = end_of_turn_ids(tokenizer)
        # lm-eval's string stops end a batch only when every row has met one, and it decodes answers without
        # special tokens, so a row past its end of turn would run on: eos_token_id stops each row there, as
        # modelcrew eval does (model.generate takes it; a server ignores it and stops at its own end of turn)
        until = [s for s in (tokenizer.decode([t]) for t in stop) if s]
        config = {"output_type": "generate_until", "doc_to_text": "prompt", "doc_to_target": "reference",
                  "generation_kwargs": {"until": until, "max_gen_toks": budget, "do_sample": False,
                                        "eos_token_id": stop},
                  "metric_list": _mean("exact_match", "f1", "rougeL")}
        utils = GEN_UTILS

    if not docs:
        raise InputError(f"{run_id}: none of the {len(test)} test records fits seq_len {plan.seq_len} with its answer")
    name = task_name(run_id)
    task_dir = Path(out_dir) / name
    task_dir.mkdir(parents=True, exist_ok=True)
    data = (task_dir / "test.jsonl").resolve()
    data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    (task_dir / "utils.py").write_text(utils, encoding="utf-8")
    config = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
              "test_split": "test", **config, "metadata": {"version": 1, "run_id": run_id}}
    lines = [f"{key}: {json.dumps(value)}" for key, value in config.items()]  # JSON values are YAML
    lines.append("process_results: !function utils.process_results")
    (task_dir / f"{name}.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (task_dir / SIDECAR).write_text(json.dumps({"task": name, "run_id": run_id, "format": fmt, "docs": len(docs),
                                                "model_dir": str(model_dir.resolve()), "longest": longest,
                                                "retokenized_differently": differ}, indent=2),
                                    encoding="utf-8")
    return task_dir


def _check_standard(manager, names: Sequence[str]) -> None:
    """Each named standard task must exist and its data be at hand: one line if not, before a model is loaded."""
    from datasets import config

    for name in names:
        if name not in manager.all_tasks:
            raise InputError(f"harness task {name!r}: lm-eval has no task or group by that name")
        try:
            manager.load_task_or_group([name])
        except Exception as err:  # noqa: BLE001 - datasets and the hub raise many kinds; the user needs one line
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            if config.HF_HUB_OFFLINE:
                raise InputError(f"harness task {name!r}: not available offline: its data is not in the local Hugging "
                                 f"Face cache ({reason}); run it once with network access to cache it") from None
            raise InputError(f"harness task {name!r}: cannot load its data ({reason})") from None


def run_harness(task_dir: Path, model_dir: Path | None = None, served_url: str | None = None,
                model_name: str | None = None, standard_tasks: Sequence[str] = (), limit: int | None = None,
                per_record: bool = False) -> dict:
    """Run the task in `task_dir` and `standard_tasks` with lm-eval: {task: {metric: value, ..., "samples": n}},
    and with `per_record` each task's per-document values too ("per_record": {metric: [value per doc]}).

    In this process with lm-eval's `hf` model (the run's model unless `model_dir` names another), or, given
    `served_url`, through `local-completions` against that server's `model_name` (prompts sent as token ids
    of the run's tokenizer)."""
    import torch
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.tasks import TaskManager

    task_dir = Path(task_dir)
    meta = json.loads((task_dir / SIDECAR).read_text(encoding="utf-8"))
    model_dir = Path(model_dir or meta["model_dir"])
    manager = TaskManager(include_path=str(task_dir))
    _check_standard(manager, standard_tasks)
    if served_url:
        model = "local-completions"
        args = {"base_url": served_url.rstrip("/") + "/v1/completions", "model": model_name or model_dir.name,
                "tokenizer": str(model_dir), "tokenizer_backend": "huggingface", "max_retries": 1,
                "max_length": max(2048, meta["longest"])}
    else:
        model, weights = "hf", model_dir
        cuda = torch.cuda.is_available()
        args = {"pretrained": str(model_dir), "dtype": "float32", "device": "cuda" if cuda else "cpu",
                "add_bos_token": False}  # the prompts already hold whatever the chat template puts first
        if cuda and meta["format"] == "classification":  # as modelcrew eval scores labels on CUDA: under bf16
            args["mixed_precision_dtype"] = "bfloat16"     # autocast (it generates answers in float32)
        if (model_dir / "adapter_config.json").exists():  # base + adapter (lora.merge off)
            weights = Path(json.loads((model_dir / "lineage.json").read_text(encoding="utf-8"))["base_dir"])
            args.update(pretrained=str(weights), peft=str(model_dir), tokenizer=str(model_dir))
        # lm-eval cuts inputs to max_length (the model's context by default) less the tokens to generate; the
        # task's inputs already fit seq_len as modelcrew eval cut them, and it generates past the context if need be
        args["max_length"] = max(meta["longest"], _context(weights))
    out = simple_evaluate(model=model, model_args=args, tasks=[meta["task"], *standard_tasks], task_manager=manager,
                          batch_size=8, limit=limit, bootstrap_iters=0, log_samples=per_record)
    results = {}
    for name, values in out["results"].items():
        # keys are "<metric>,<filter>"; ours and most tasks have the one filter "none"
        metrics = {k.removesuffix(",none"): v for k, v in values.items() if "," in k and "_stderr," not in k}
        results[name] = {**metrics, "samples": out.get("n-samples", {}).get(name, {}).get("effective")}
        if per_record and name in out.get("samples", {}):
            docs = sorted((s for s in out["samples"][name] if s.get("filter", "none") == "none"),
                          key=lambda s: s["doc_id"])
            results[name]["per_record"] = {m: [d[m] for d in docs] for m in metrics if docs and m in docs[0]}
    return results


def _context(model_dir: Path) -> int:
    """The model's context in tokens, as lm-eval would take it from its config."""
    path = Path(model_dir) / "config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    return int(config.get("max_position_embeddings") or 2048)
