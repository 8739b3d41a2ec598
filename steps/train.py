"""Train a planned run, or continue it when an earlier attempt of the same run was interrupted."""

from __future__ import annotations

from pathlib import Path

from training.contracts import Budget, RunResult, TrainPlan
from training.loop import train
from training.runs import Run


def train_planned(workspace: Path, run_id: str, plan: TrainPlan, reused_from: str | None = None,
                  show_progress: bool = True) -> tuple[TrainPlan, RunResult]:
    """Train `plan` as `run_id` and record which earlier run's settings it took. A run that already started
    (a retried tool call, a loop resumed after a kill) continues from its checkpoint with the plan it
    started with; returns that plan and the result."""
    run = Run(workspace, run_id)
    started = run.plan()
    if started is not None:
        plan = started
    result = train(plan, Path(workspace), run_id, resume=started is not None, show_progress=show_progress)
    run.write_memory_used(reused_from)
    return plan, result


# ---- attempts: another configuration while the target is missed on validation and the budget has room ----

MIN_STEPS = 5  # an attempt shorter than this learns nothing worth judging


def attempt_run_id(run_id: str, number: int) -> str:
    """The first attempt is the crew's run; later ones are `<run_id>-a2`, `-a3` ..."""
    return run_id if number == 1 else f"{run_id}-a{number}"


def on_validation(workspace: Path, goal, plan: TrainPlan, result: RunResult, base_ppl: float | None
                  ) -> tuple[float | None, float | None, float | None]:
    """(the attempt's validation perplexity, the base's, the threshold the goal's target sets on it).

    Attempts are judged on the validation split only, so the test split stays for the gate's one verdict.
    Only perplexity targets (absolute, or relative to the base model) are judged here; for others the
    threshold is None and the crew makes one attempt."""
    import json

    from training.batches import read_split
    from training.data.store import datasets_dir, load_summary
    from training.evaluate import perplexity_on

    model_dir = Path(result.best_dir or result.final_dir)
    records = read_split(datasets_dir(workspace) / plan.dataset, "val")
    fmt = load_summary(workspace, plan.dataset).format
    ppl = perplexity_on(model_dir, records, fmt, plan.seq_len)
    if base_ppl is None:
        reference = json.loads((model_dir / "lineage.json").read_text(encoding="utf-8")).get("reference_dir")
        base_ppl = perplexity_on(Path(reference), records, fmt, plan.seq_len) if reference else None
    target = goal.target
    if goal.metric != "perplexity" or (target is not None and target.baseline == "production"):
        return ppl, base_ppl, None
    if target is None:
        threshold = base_ppl  # no target: no worse than the base
    elif target.kind == "absolute":
        threshold = target.value
    else:
        threshold = None if base_ppl is None else base_ppl * (1 - target.value)
    return ppl, base_ppl, threshold


def budget_left(budget: dict, attempts: list[dict]) -> dict:
    """Steps and minutes of the budget (the first attempt's plan: the goal's) not yet spent by the attempts so far."""
    steps = None if budget.get("steps") is None else budget["steps"] - sum(a["steps"] for a in attempts)
    minutes = None if budget.get("minutes") is None else budget["minutes"] - sum(a["minutes"] for a in attempts)
    return {"steps": steps, "minutes": None if minutes is None else round(minutes, 2)}


def attempts_left(goal, max_attempts: int, attempts: list[dict]) -> tuple[dict, str | None]:
    """(the goal's budget not yet spent by the attempts, why no further attempt is allowed or None)."""
    from training.plan_from_goal import budget_for

    left = budget_left(budget_for(goal).model_dump(), attempts)
    return left, why_stop(max_attempts, attempts, left) if attempts else "one training run per crew run"


def within(budget: Budget, left: dict) -> Budget:
    """`budget` cut down to what is left of the goal's."""
    steps = budget.steps if left["steps"] is None else min(budget.steps or left["steps"], left["steps"])
    minutes = budget.minutes if left["minutes"] is None else min(budget.minutes or left["minutes"], left["minutes"])
    return Budget(steps=steps, minutes=minutes, tokens=budget.tokens)


def why_stop(max_attempts: int, attempts: list[dict], left: dict) -> str | None:
    """Why no further attempt is allowed (None: one is)."""
    last = attempts[-1]
    if last["threshold"] is None:
        return "attempts are judged on validation perplexity against a target on the base or an absolute value; this goal's is judged by the gate alone"
    if last["met_on_validation"]:
        return "the target is met on the validation split"
    if left["steps"] is not None and left["steps"] < MIN_STEPS:
        return f"the step budget is spent ({left['steps']} left)"
    if left["minutes"] is not None and left["minutes"] < 0.5:
        return "the time budget is spent"
    if len(attempts) >= max_attempts:
        return f"the goal allows {max_attempts} configuration{'s' if max_attempts > 1 else ''}"
    return None


def attempt_record(number: int, run_id: str, plan: TrainPlan, result: RunResult, ppl, threshold, why: str) -> dict:
    """What the report's attempts table and the next decision need about one attempt."""
    curve = ("overfitting: validation loss was best early and then rose" if result.status == "early_stopped"
             else "still improving at the end" if result.best_step == result.steps else "levelled off")
    return {"attempt": number, "run_id": run_id, "lr": plan.lr, "steps": result.steps, "best_step": result.best_step,
            "minutes": round(result.wall_seconds / 60, 3), "status": result.status, "curve": curve,
            "val_perplexity": ppl, "threshold": threshold,
            "met_on_validation": threshold is not None and ppl is not None and ppl <= threshold, "why": why}


def record_tried(workspace: Path, run_id: str, plan: TrainPlan, result: RunResult, ppl: float | None,
                 base_ppl: float | None, val_records: int, fmt: str) -> None:
    """An attempt enters memory as tried: a validation-only evaluation (no test metrics, no gate) in its run, so
    later plans on similar data know this configuration and its validation perplexity. The attempt the gate
    judges is evaluated in full later and replaces it."""
    from datetime import datetime, timezone

    from memory.store import MemoryStore
    from training.contracts import Evaluation
    from training.runs import Run

    metrics = {k: v for k, v in (("val_perplexity", ppl), ("base_val_perplexity", base_ppl)) if v is not None}
    evaluation = Evaluation(run_id=run_id, dataset=plan.dataset, format=fmt, base_model=plan.base_model or None,
                            model_dir=result.best_dir or result.final_dir, metrics=metrics, examples={"val": val_records},
                            samples=[], general_corpus="", seconds=0.0,
                            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    Run(workspace, run_id).write_evaluation(evaluation)
    MemoryStore(workspace).add_evaluation(evaluation, plan)
