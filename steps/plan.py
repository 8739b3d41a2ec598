"""The training plan for a goal: code's defaults, memory's best config on similar data, bounded overrides."""

from __future__ import annotations

from pathlib import Path

from memory.store import MemoryStore
from training.contracts import DatasetSummary, Goal, TrainPlan
from training.plan_from_goal import plan_for


def plan_goal(workspace: Path, goal: Goal, summary: DatasetSummary, *, use_memory: bool = True,
              warm_start: str | None = None, lr: float | None = None, lora_rank: int | None = None,
              steps: int | None = None) -> tuple[TrainPlan, str | None]:
    """(plan, the earlier run whose settings it took). `lr`, `lora_rank` and `steps` are an agent's
    overrides, already bounded by its tool's schema; `steps` never goes beyond the goal's budget."""
    best = MemoryStore(workspace).best_known_config(summary) if goal.task == "finetune" and use_memory else None
    plan, reused = plan_for(goal, summary, best)
    update: dict = {"init_from": warm_start} if warm_start else {}
    if lr is not None:
        update["lr"] = lr
    if lora_rank is not None and plan.method == "lora":
        update["lora"] = plan.lora.model_copy(update={"rank": lora_rank, "alpha": 2 * lora_rank})
    if steps is not None:
        update["budget"] = plan.budget.model_copy(update={"steps": min(steps, plan.budget.steps or steps)})
    return TrainPlan.model_validate(plan.model_copy(update=update).model_dump()), reused  # re-check the plan's rules
