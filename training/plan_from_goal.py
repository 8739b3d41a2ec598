"""From a `Goal` (and what memory knows) to a `TrainPlan`: defaults chosen by code, never by an LLM.

The defaults are the ones measured on this project's machines (see training/recipes/): LoRA at lr
2e-4 with validation every 10 steps and keep-best, because at 1e-3 a 135M model peaks early and then
overfits. When memory holds a run on similar data, its learning rate, batch, sequence length and LoRA
settings are the starting point instead, and the plan says which run it came from. When that best earlier
run still missed its gate, the next learning rate not yet tried on that data is taken (x3 up to a cap,
else /3).

A retraining loop's later rounds take their learning rate from the loop's own earlier rounds, with memory on or
off (`lr_from_rounds`): after a miss the next rate not yet tried, once a round has passed the rate that passed.
Memory adds only what other runs on similar data know: the starting point of the first round, and the rates
they tried (which the loop does not try again).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from training.contracts import PREFERENCE_FORMATS, Budget, DatasetSummary, Goal, LoraSettings, TrainPlan
from training.errors import InputError

CPU_DEFAULT = Budget(steps=60, minutes=12)  # what a 2-core machine finishes in minutes
GPU_DEFAULT = Budget(steps=500, minutes=30)
PRETRAIN_LR = {"tiny": 3e-3, "small": 1e-3, "124m": 6e-4}
LR_STEP = 3.0
MAX_FINETUNE_LR = {"lora": 3e-3, "qlora": 3e-3, "full": 3e-4}


def budget_for(goal: Goal) -> Budget:
    default = GPU_DEFAULT if torch.cuda.is_available() else CPU_DEFAULT
    if goal.budget.steps or goal.budget.minutes:
        return Budget(steps=goal.budget.steps, minutes=goal.budget.minutes)
    return default


def plan_for(goal: Goal, summary: DatasetSummary, best=None,
             earlier: Sequence[tuple[float, bool]] = ()) -> tuple[TrainPlan, str | None]:
    """The plan for `goal` on the curated `summary`; `best` is memory's BestConfig (or None); `earlier` is what a
    retraining loop's own earlier rounds on this goal tried, oldest first: (learning rate, passed its gate).

    Returns (plan, reused) where `reused` names the earlier run whose settings were taken from memory, if any.
    """
    if goal.task == "evaluate":
        raise ValueError("an evaluate goal has no training plan")
    texty = summary.format == "text"
    seq_len = 512 if texty else 256
    if goal.task == "pretrain":
        size = goal.size or "tiny"
        fields = dict(task="pretrain", size=size, method="full", lr=PRETRAIN_LR.get(size, 1e-3), batch_size=8,
                      seq_len=64 if size == "tiny" else 256, warmup_steps=10)
    else:
        lora = goal.lora or LoraSettings(rank=8, alpha=16)
        fields = dict(task="finetune", base_model=goal.base_model, method=goal.method, lora=lora,
                      objective=objective_for(goal, summary),
                      lr=2e-4 if goal.method == "lora" else 5e-5, batch_size=8, seq_len=seq_len, warmup_steps=5)
    reused = None
    if (best is not None and goal.task == "finetune" and best.plan.task == "finetune" and best.plan.method == goal.method
            and best.plan.objective == fields["objective"]):
        fields.update(lr=best.plan.lr, batch_size=best.plan.batch_size, grad_accum=best.plan.grad_accum)
        if not best.passed:
            fields["lr"] = next_lr(best.plan.lr, best.tried_lrs, MAX_FINETUNE_LR[goal.method])
        if goal.lora is None and goal.method == "lora":
            fields["lora"] = best.plan.lora
        reused = best.run_id
    if earlier and goal.task == "finetune":
        fields["lr"] = lr_from_rounds(earlier, best.tried_lrs if reused else [], MAX_FINETUNE_LR[goal.method])
    if goal.processes or goal.strategy:  # a torchrun job; each process takes an equal share of the batch
        n = goal.processes
        fields.update(launcher="torchrun", nproc=n, strategy=goal.strategy or "ddp")
        if n and fields["batch_size"] % (n * fields.get("grad_accum", 1)):
            step = n * fields.get("grad_accum", 1)
            fields["batch_size"] = step * -(-fields["batch_size"] // step)
    return TrainPlan(dataset=summary.fingerprint, budget=budget_for(goal), eval_every=10, eval_batches=4,
                     checkpoint_every=10, patience=3, **fields), reused


def objective_for(goal: Goal, summary: DatasetSummary) -> str:
    """The goal's objective, checked against the data: preference pairs train by DPO (or ORPO) and rated answers by
    KTO, also when the goal names no objective (they hold nothing else to learn from); other data trains by sft."""
    by_data = {"preference": "dpo", "feedback": "kto"}.get(summary.format)
    if goal.objective == "sft":
        return by_data or "sft"
    needed = PREFERENCE_FORMATS[goal.objective]
    if summary.format != needed:
        what = "preference pairs (prompt, chosen, rejected)" if needed == "preference" else "rated answers (prompt, completion, label)"
        raise InputError(f"objective: {goal.objective.upper()} trains on {what}, but {summary.source} is "
                         f"{summary.format} data" + (f"; use {by_data.upper()}" if by_data else ""))
    return goal.objective


MAX_SEQ_LEN = {"cpu": 512, "cuda": 2048}  # longer records are cut in their input (training.batches.fit_record)


def seq_len_for(lengths: list[int], context: int | None = None) -> int:
    """The shortest multiple of 64 that holds the longest record whole, within what the device trains at a
    useful speed and the model's context. Batches are padded to their longest record, not to seq_len, so a
    generous seq_len costs only on the records that need it."""
    cap = MAX_SEQ_LEN["cuda" if torch.cuda.is_available() else "cpu"]
    if context:
        cap = min(cap, context)
    longest = max(lengths, default=64)
    return max(64, min(cap, -(-longest // 64) * 64))


FRACTION_METRICS = ("accuracy", "exact_match", "f1", "rougeL", "preference_accuracy")
DECIDABLE = 0.10  # a test split whose interval is wider than this (either side) cannot decide a fraction target
MIN_TEST = 30  # records below which a perplexity's interval is too wide to decide a target


def test_size_warning(goal: Goal, test_records: int, level: float = 0.9) -> str | None:
    """One line when the test split is too small for the goal's target to be decided at `level`, with what
    would settle it; None when it is large enough (or there is no target to decide)."""
    from training.stats import half_width_for

    if goal.target is None or goal.task == "evaluate":
        return None
    n = test_records
    if goal.metric in FRACTION_METRICS:
        p = goal.target.value if goal.target.kind == "absolute" else 0.5
        half = half_width_for(n, p, level)
        if half <= DECIDABLE:
            return None
        enough = math.ceil(n * (half / DECIDABLE) ** 2)
        return (f"the test split has {n} records: a {level:.0%} interval on {goal.metric} will be about ±{half:.2f} wide, "
                f"too wide to decide the target unless the model is far from it; about {enough} test records give "
                f"±{DECIDABLE:.2f} (curate with a larger test share, e.g. --split 0.7,0.1,0.2, or add data)")
    if n < MIN_TEST:
        return (f"the test split has {n} records: the interval on perplexity will be wide and a small effect will be "
                f"'not enough evidence'; at least {MIN_TEST} test records are advised (a larger test share or more data)")
    return None


def next_lr(lr: float, tried: list[float], cap: float) -> float:
    """After a miss: lr x3 (at most `cap`) unless tried already, else lr / 3 unless tried, else lr again."""
    for option in (min(lr * LR_STEP, cap), lr / LR_STEP):
        if not any(math.isclose(option, t, rel_tol=1e-6) for t in tried):
            return option
    return lr


def lr_from_rounds(earlier: Sequence[tuple[float, bool]], tried_elsewhere: Sequence[float], cap: float) -> float:
    """A retraining loop's next learning rate from its own rounds (oldest first: (lr, passed)). Once a round has
    passed, the rate of the latest that passed: a miss after that (a poisoned batch, production better) is the
    data's doing, not the rate's. Before any has, the next rate after the latest miss (`next_lr`: x3, else /3),
    skipping the rates tried in this loop and, with memory, on similar data (`tried_elsewhere`)."""
    passed = [lr for lr, ok in earlier if ok]
    if passed:
        return passed[-1]
    return next_lr(earlier[-1][0], [lr for lr, _ in earlier] + list(tried_elsewhere), cap)
