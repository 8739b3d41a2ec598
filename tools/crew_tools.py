"""The curator's, trainer's and evaluator's tools. Each answers with a short JSON object an agent can read.

What the user asked for (the `Goal`) and the run's id are given to the tools by code when the crew is
built; the LLM chooses only what the schemas allow (which data path named in the goal, a learning rate
within bounds, how many evaluation examples ...). Base model, budget and deploy policy are not its to change.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from memory.store import MemoryStore, load_run_artefacts
from tools.base import RUN_ID, ToolArgs, WorkspaceTool
from training.contracts import Goal
from training.errors import InputError

FINGERPRINT = r"^[0-9a-f]{16}$"


def short(payload: dict) -> str:
    return json.dumps(payload, ensure_ascii=False, default=str)


class GoalTool(WorkspaceTool):
    goal: Goal
    run_id: str = Field(pattern=RUN_ID)


# ---- curator --------------------------------------------------------------------------------------


class CurateArgs(ToolArgs):
    data: str = Field(min_length=1, max_length=500, description="the data the goal names: a path or bbc-news")
    format: Literal["text", "pairs", "chat", "classification"] | None = Field(None, description="force a format")


class CurateDatasetTool(GoalTool):
    related: list[str] = []  # set by code: earlier versions of this data, whose evaluation records are its own
    name: str = "curate_dataset"
    description: str = ("Read, clean, deduplicate, scrub personal data from, split and fingerprint the goal's data, "
                        "store it in the workspace and in memory. Returns the fingerprint, record counts, similar "
                        "datasets seen before and how many training records restate earlier evaluation records.")
    args_schema: type[BaseModel] = CurateArgs

    def act(self, data: str, format: str | None = None) -> str:
        from training.batches import read_split
        from training.data import curate_to_workspace
        from training.data.store import datasets_dir

        if data != self.goal.data:
            raise InputError(f"data: {data!r} is not the data the goal names ({self.goal.data})")
        roots = [Path(self.workspace).resolve()]
        if data not in ("bbc-news",):
            roots.append(Path(self.goal.data).expanduser().resolve())  # exactly what the user named, nothing beside it
        result = curate_to_workspace(data, self.workspace, format=format or self.goal.format, allowed_roots=roots)
        s = result.summary
        store = MemoryStore(self.workspace)
        store.add_dataset(s)
        similar = [x for x in store.similar_datasets(s, k=3) if x.similarity >= 0.5]
        train = read_split(datasets_dir(self.workspace) / s.fingerprint, "train")
        overlaps = store.contamination(train, exclude_dataset=[s.fingerprint, *self.related])
        (datasets_dir(self.workspace) / s.fingerprint / "contamination.json").write_text(
            json.dumps([o.model_dump() for o in overlaps], indent=2), encoding="utf-8")
        return short({"fingerprint": s.fingerprint, "format": s.format, "records_in": s.records_in,
                      "records_after": s.records_after, "removed": s.removed, "pii": s.pii, "splits": s.splits,
                      "description": s.description, "similar": [{"fingerprint": x.fingerprint, "similarity": x.similarity}
                                                               for x in similar], "contaminated": len(overlaps)})


# ---- memory ---------------------------------------------------------------------------------------


class SearchArgs(ToolArgs):
    query: str = Field(min_length=1, max_length=500)
    kind: Literal["datasets", "evaluations", "lessons", "eval_records"] = "evaluations"
    k: int = Field(5, ge=1, le=20)


class SearchMemoryTool(WorkspaceTool):
    name: str = "search_memory"
    description: str = ("Search the memory of earlier datasets, evaluations (runs and their results) and lessons by "
                        "meaning. Returns ids (fingerprint or run_id), similarity and a one-line summary.")
    args_schema: type[BaseModel] = SearchArgs

    def act(self, query: str, kind: str = "evaluations", k: int = 5) -> str:
        hits = MemoryStore(self.workspace).search(query, kind, k=k)
        return short({"hits": [{"id": h.id, "similarity": h.similarity, "summary": h.summary} for h in hits]})


# ---- trainer --------------------------------------------------------------------------------------


class PlanArgs(ToolArgs):
    fingerprint: str = Field(pattern=FINGERPRINT, description="the curated dataset")
    lr: float | None = Field(None, ge=1e-6, le=1e-2, description="learning rate; default from memory or the recipe")
    lora_rank: int | None = Field(None, ge=1, le=128)


class PlanningTool(GoalTool):
    use_memory: bool = True  # False: plan as if no earlier run existed (a baseline for the memory benchmark)
    warm_start: str | None = None  # set by code (the retraining loop): start from production's weights


def planned(tool: PlanningTool, fingerprint: str, lr: float | None, lora_rank: int | None, steps: int | None = None):
    """The plan code makes for the goal (memory's best config first), with the LLM's bounded overrides."""
    from training.data.store import load_summary
    from training.planning import plan_for

    summary = load_summary(tool.workspace, fingerprint)
    best = None
    if tool.goal.task == "finetune" and tool.use_memory:
        best = MemoryStore(tool.workspace).best_known_config(summary)
    plan, reused = plan_for(tool.goal, summary, best)
    update: dict = {"init_from": tool.warm_start} if tool.warm_start else {}
    if lr is not None:
        update["lr"] = lr
    if lora_rank is not None and plan.method == "lora":
        update["lora"] = plan.lora.model_copy(update={"rank": lora_rank, "alpha": 2 * lora_rank})
    if steps is not None:
        limit = plan.budget.steps or steps
        update["budget"] = plan.budget.model_copy(update={"steps": min(steps, limit)})  # never beyond the goal's budget
    plan = type(plan).model_validate(plan.model_copy(update=update).model_dump())  # re-check the plan's rules
    return plan, reused


class EstimatePlanTool(PlanningTool):
    name: str = "estimate_plan"
    description: str = ("Build the training plan for the goal on a curated dataset (starting from the best earlier "
                        "run on similar data when memory has one) and account its parameters and memory. Trains nothing.")
    args_schema: type[BaseModel] = PlanArgs

    def act(self, fingerprint: str, lr: float | None = None, lora_rank: int | None = None) -> str:
        import shutil
        import tempfile

        from training.estimate import check_memory, memory_need
        from training.setup import Distributed, prepare_run

        plan, reused = planned(self, fingerprint, lr, lora_rank)
        tmp = Path(tempfile.mkdtemp(prefix="modelcrew-plan-"))
        try:
            run = prepare_run(plan, Path(self.workspace), "estimate", False, Distributed(), show_progress=False, run_dir=tmp / "run")
            check_memory(plan, run)
            memory = memory_need(plan, run)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return short({"plan": plan.model_dump(mode="json", exclude_defaults=True), "reused_from": reused,
                      "trainable_params": run.trainable_params, "total_params": run.total_params,
                      "memory_gb": {k: round(v, 2) for k, v in memory.items()}})


class TrainArgs(PlanArgs):
    steps: int | None = Field(None, ge=1, le=100_000, description="fewer steps than the goal's budget, if wanted")


class TrainModelTool(PlanningTool):
    name: str = "train_model"
    description: str = ("Train (pretrain or fine-tune, as the goal says) on a curated dataset within the goal's "
                        "budget, validating as it goes and keeping the best checkpoint. Returns the run's result.")
    args_schema: type[BaseModel] = TrainArgs

    def act(self, fingerprint: str, lr: float | None = None, lora_rank: int | None = None, steps: int | None = None) -> str:
        from training.loop import train

        plan, reused = planned(self, fingerprint, lr, lora_rank, steps)
        run_dir = Path(self.workspace) / "runs" / self.run_id
        resume = (run_dir / "plan.json").exists()  # a retried call continues the run instead of refusing it
        if resume:
            from training.contracts import TrainPlan

            plan = TrainPlan.model_validate_json((run_dir / "plan.json").read_text(encoding="utf-8"))
        result = train(plan, Path(self.workspace), self.run_id, resume=resume, show_progress=True)  # a bar on stderr
        (run_dir / "memory_used.json").write_text(json.dumps({"reused_from": reused}), encoding="utf-8")
        return short({"run_id": result.run_id, "status": result.status, "message": result.message, "steps": result.steps,
                      "best_step": result.best_step, "best_val_loss": result.best_val_loss,
                      "tokens_per_second": result.tokens_per_second, "reused_from": reused})


# ---- evaluator ------------------------------------------------------------------------------------


class EvaluateArgs(ToolArgs):
    run_id: str = Field(pattern=RUN_ID)
    max_examples: int = Field(24, ge=1, le=256, description="test examples to answer")


class EvaluateModelTool(GoalTool):
    name: str = "evaluate_model"
    description: str = ("Evaluate a trained run beside its base model (and production when the goal compares with "
                        "it), then apply the goal's gate: target, forgetting and contamination. Returns the metrics "
                        "and the verdict with its reasons.")
    args_schema: type[BaseModel] = EvaluateArgs

    def act(self, run_id: str, max_examples: int = 24) -> str:
        from training.contracts import TrainPlan
        from training.data.store import datasets_dir
        from training.evaluate import evaluate_run, score_directory
        from training.gate import gate, metric_key

        if run_id != self.run_id:
            raise InputError(f"run_id: this crew's run is {self.run_id}, not {run_id}")
        run_dir = Path(self.workspace) / "runs" / run_id
        ev = evaluate_run(self.workspace, run_id, max_examples=max_examples)
        plan = TrainPlan.model_validate_json((run_dir / "plan.json").read_text(encoding="utf-8"))
        production = None
        if self.goal.model_name and self.goal.deploy != "never":  # production is scored on this evaluation set
            from serving.registry import Registry

            try:
                _, version, path = Registry(self.workspace).resolve(f"{self.goal.model_name}@production")
            except InputError:
                version = None  # nothing in production yet: the gate compares with the base and says so
            if version is not None:
                production = score_directory(self.workspace, path, plan.dataset, plan.seq_len, max_examples)
                key = metric_key(self.goal.metric, ev.metrics)
                if key in production:
                    ev.metrics[f"production_{key}"] = production[key]
                    (run_dir / "evaluation.json").write_text(ev.model_dump_json(indent=2), encoding="utf-8")
        contamination = datasets_dir(self.workspace) / plan.dataset / "contamination.json"
        contaminated = len(json.loads(contamination.read_text())) if contamination.exists() else 0
        verdict = gate(self.goal, ev, production, contaminated)
        (run_dir / "gate.json").write_text(verdict.model_dump_json(indent=2), encoding="utf-8")
        MemoryStore(self.workspace).add_evaluation(*load_run_artefacts(run_dir))
        shown = {k: v for k, v in ev.metrics.items() if not k.endswith("_loss")}
        return short({"run_id": run_id, "metrics": shown, "gate": verdict.model_dump()})


class HistoryArgs(ToolArgs):
    run_id: str = Field(pattern=RUN_ID)


class CompareWithHistoryTool(GoalTool):
    name: str = "compare_with_history"
    description: str = ("Compare an evaluated run with every earlier run on the same data (from memory): its rank "
                        "on the goal's metric, the best earlier run and the lessons recorded about this data.")
    args_schema: type[BaseModel] = HistoryArgs

    def act(self, run_id: str) -> str:
        from training.contracts import Evaluation
        from training.gate import lower_is_better, metric_key

        run_dir = Path(self.workspace) / "runs" / run_id
        if not (run_dir / "evaluation.json").exists():
            raise InputError(f"run {run_id}: not evaluated yet (evaluate_model first)")
        ev = Evaluation.model_validate_json((run_dir / "evaluation.json").read_text(encoding="utf-8"))
        key = metric_key(self.goal.metric, ev.metrics)
        store = MemoryStore(self.workspace)
        runs = [r for r in store.history(fingerprint=ev.dataset) if key in r.metrics]
        lower = lower_is_better(key)
        ranked = sorted(runs, key=lambda r: r.metrics[key], reverse=not lower)
        rank = next((i + 1 for i, r in enumerate(ranked) if r.run_id == run_id), None)
        best = next((r for r in ranked if r.run_id != run_id), None)
        lessons = store.search(f"lessons about {ev.dataset} {self.goal.metric}", "lessons", k=3) if store.count("lessons") else []
        return short({"metric": key, "value": ev.metrics.get(key), "rank": rank, "of": len(ranked),
                      "best_earlier": {"run_id": best.run_id, "value": best.metrics[key]} if best else None,
                      "lessons": [h.summary for h in lessons]})


class ReportArgs(ToolArgs):
    run_id: str = Field(pattern=RUN_ID)
    lesson: str | None = Field(None, max_length=300, description="one sentence learned from this run, for memory")
    narrative: str | None = Field(None, max_length=1500, description=(
        "optional account of the run in plain words; write numbers only as placeholders {metric} {value} {base} "
        "{threshold} {verdict} {steps} (code inserts them); it may not contradict the gate's verdict"))


class WriteReportTool(GoalTool):
    name: str = "write_report"
    description: str = ("Write the run's evaluation report (runs/<run_id>/report.md) from its artefacts, and store a "
                        "lesson about it in memory. Every number in it comes from the artefacts.")
    args_schema: type[BaseModel] = ReportArgs
    goal_text: str = ""

    def act(self, run_id: str, lesson: str | None = None, narrative: str | None = None) -> str:
        from tools.report import write_markdown_report

        path = write_markdown_report(Path(self.workspace), run_id, self.goal, self.goal_text, narrative)
        if lesson:
            from training.contracts import TrainPlan

            plan = TrainPlan.model_validate_json((Path(self.workspace) / "runs" / run_id / "plan.json").read_text(encoding="utf-8"))
            MemoryStore(self.workspace).add_lesson(lesson, run_id, plan.dataset)
        return short({"report": str(path), "lesson_stored": bool(lesson)})
