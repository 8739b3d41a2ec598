"""Train a planned run, or continue it when an earlier attempt of the same run was interrupted."""

from __future__ import annotations

from pathlib import Path

from training.contracts import RunResult, TrainPlan
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
