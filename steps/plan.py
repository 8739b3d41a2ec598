"""The training plan for a goal: code's defaults, memory's best config on similar data, bounded overrides,
and a sequence length measured on the data with the base's own tokenizer."""

from __future__ import annotations

from pathlib import Path

from memory.store import MemoryStore
from training.batches import Fit, fit_records, read_split, rendered_length
from training.contracts import DatasetSummary, Goal, TrainPlan
from training.data.store import datasets_dir
from training.errors import InputError
from training.models import check_chat_template
from training.plan_from_goal import plan_for, seq_len_for


def plan_goal(workspace: Path, goal: Goal, summary: DatasetSummary, *, use_memory: bool = True,
              earlier: list[tuple[float, bool]] | None = None,
              warm_start: str | None = None, lr: float | None = None, lora_rank: int | None = None,
              steps: int | None = None, train_records: list[dict] | None = None,
              convert: bool = True) -> tuple[TrainPlan, str | None, Fit | None]:
    """(plan, the earlier run whose settings it took from memory, how the training records fit its seq_len).
    `use_memory=False` plans without memory's earlier runs; `earlier` is a retraining loop's own earlier rounds
    (lr, passed), oldest first, which guide its plan either way (`plan_for`).
    `lr`, `lora_rank` and `steps` are an agent's overrides, already bounded by its tool's schema; `steps`
    never goes beyond the goal's budget. `train_records` default to the curated dataset's train split;
    `convert=False` measures only when the base is already a local checkpoint (nothing is written)."""
    best = MemoryStore(workspace).best_known_config(summary) if goal.task == "finetune" and use_memory else None
    plan, reused = plan_for(goal, summary, best, earlier or ())
    update: dict = {"init_from": warm_start} if warm_start else {}
    if lr is not None:
        update["lr"] = lr
    if lora_rank is not None and plan.method == "lora":
        update["lora"] = plan.lora.model_copy(update={"rank": lora_rank, "alpha": 2 * lora_rank})
    if steps is not None:
        update["budget"] = plan.budget.model_copy(update={"steps": min(steps, plan.budget.steps or steps)})
    fit = None
    tokenizer, context = _base_tokenizer(workspace, plan, convert) if summary.format != "text" else (None, None)
    if tokenizer is not None:
        check_chat_template(tokenizer, plan.base_model, summary.format)
        if train_records is None:
            train_records = read_split(datasets_dir(workspace) / summary.fingerprint, "train")
        lengths = [rendered_length(tokenizer, r, summary.format) for r in train_records]
        update["seq_len"] = seq_len_for(lengths, context)
        fit = fit_records(tokenizer, train_records, summary.format, update["seq_len"])[1]
    plan = TrainPlan.model_validate(plan.model_copy(update=update).model_dump())  # re-check the plan's rules
    if tokenizer is not None:
        check_relative_target(workspace, goal, plan, summary)
    return plan, reused, fit


ZERO_CHECK_RECORDS = 32  # validation records the base is scored on before a relative "higher" target is accepted


def check_relative_target(workspace: Path, goal: Goal, plan: TrainPlan, summary: DatasetSummary) -> None:
    """Refuse "x% above the base" when the base scores 0 on the metric: the threshold would be 0 and any
    model would pass. Scored on a few validation records (never the test split) before any training."""
    target = goal.target
    if target is None or target.kind != "relative" or target.direction != "higher" or not target.value:
        return
    import torch

    from training.evaluate import ANSWER_LOGPS, InProcess, preference_values, score_model
    from training.models import base_dir, load_base

    splits = {name: read_split(datasets_dir(workspace) / summary.fingerprint, name) for name in ("train", "val")}
    if not splits["val"]:
        return
    model, tokenizer = load_base(base_dir(plan.base_model, workspace))
    device = torch.device("cpu")
    scores = score_model(InProcess(model, tokenizer, device), tokenizer, summary.format,
                         {"train": splits["train"], "val": [], "test": splits["val"][:ZERO_CHECK_RECORDS]}, (), plan.seq_len)
    if ANSWER_LOGPS in scores.values:  # preference data: the base is its own reference
        logps = scores.values[ANSWER_LOGPS]
        scores.values.update(preference_values(plan.objective, plan.beta, logps, logps, scores.values.get("labels")))
    values = scores.values.get(goal.metric)
    if values and max(values) == 0:
        raise InputError(f"target: the base scores 0 on {goal.metric} ({len(values)} validation records), so "
                         f"'{target.value:.0%} above the base' asks for nothing; give an absolute target instead "
                         f"(e.g. '{goal.metric.replace('_', ' ')} at least 0.3')")


def _base_tokenizer(workspace: Path, plan: TrainPlan, convert: bool):
    """(tokenizer, context length) of a fine-tuning plan's base, or (None, None) when it is not at hand.
    The base's architecture is checked on the way (`base_dir`, `base_files_dir`); `convert=False` reads only
    config and tokenizer files: an embedded base not converted yet is skipped, a hub id's small files are
    fetched into (or found in) the Hugging Face cache without its weights."""
    if plan.task != "finetune":
        return None, None
    import json

    from transformers import AutoTokenizer

    from training.models import base_dir, base_files_dir

    path = base_dir(plan.base_model, workspace) if convert else base_files_dir(plan.base_model, workspace)
    if path is None:
        return None, None
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    return AutoTokenizer.from_pretrained(str(path)), config.get("max_position_embeddings")
