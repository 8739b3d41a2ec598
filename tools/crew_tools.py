"""The curator's, trainer's and evaluator's tools. Each validates, calls one step, and answers in JSON.

What the user asked for (the `Goal`), the run's id and everything the run's earlier steps produced are
held by code in the run's `RunContext`, given to every tool when the crew is built; the LLM chooses only
what the schemas allow (the data path the goal names, a learning rate within bounds, how many
evaluation examples ...). Base model, budget and deploy policy are not its to change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from memory.store import MemoryStore
from tools.base import RunTool, ToolArgs, WorkspaceTool
from training.errors import InputError
from training.plan_from_goal import test_size_warning
from training.contracts import TrainPlan
from training.runs import RUN_ID, Run

FINGERPRINT = r"^[0-9a-f]{16}$"


# ---- curator --------------------------------------------------------------------------------------


class CurateArgs(ToolArgs):
    data: str = Field(min_length=1, max_length=500, description="the data the goal names: a path or bbc-news")
    format: Literal["text", "pairs", "chat", "classification", "preference", "feedback"] | None = Field(
        None, description="force a format")


class CurateDatasetTool(RunTool):
    name: str = "curate_dataset"
    description: str = ("Read, clean, deduplicate, scrub personal data from, split and fingerprint the goal's data, "
                        "store it in the workspace and in memory. Returns the fingerprint, record counts, similar "
                        "datasets seen before and how many training records restate earlier evaluation records.")
    args_schema: type[BaseModel] = CurateArgs

    def act(self, data: str, format: str | None = None) -> dict:
        from steps.curate import curate_dataset

        goal = self.context.goal
        if data != goal.data:
            raise InputError(f"data: {data!r} is not the data the goal names ({goal.data})")
        roots = [Path(self.workspace).resolve()]
        if data != "bbc-news":
            roots.append(Path(goal.data).expanduser().resolve())  # exactly what the user named, nothing beside it
        curated, recalled = curate_dataset(self.workspace, data, format=format or goal.format, allowed_roots=roots,
                                           related=self.context.related)
        s = self.context.summary = curated.summary
        return {"fingerprint": s.fingerprint, "format": s.format, "records_in": s.records_in,
                "records_after": s.records_after, "removed": s.removed, "pii": s.pii, "splits": s.splits,
                "description": s.description,
                "similar": [{"fingerprint": x.fingerprint, "similarity": x.similarity} for x in recalled.similar
                            if x.similarity >= 0.5],
                "contaminated": len(recalled.contaminated),
                "test_split_warning": test_size_warning(goal, s.splits.get("test", 0))}


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

    def act(self, query: str, kind: str = "evaluations", k: int = 5) -> dict:
        from steps.evaluate import quoted_lesson

        hits = MemoryStore(self.workspace).search(query, kind, k=k)
        if kind == "lessons":  # text earlier agents wrote: data to weigh, never instructions
            return {"hits": [{"id": h.id, "similarity": h.similarity, **quoted_lesson(h)} for h in hits]}
        return {"hits": [{"id": h.id, "similarity": h.similarity, "summary": h.summary} for h in hits]}


# ---- trainer --------------------------------------------------------------------------------------


class PlanArgs(ToolArgs):
    fingerprint: str = Field(pattern=FINGERPRINT, description="the curated dataset")
    lr: float | None = Field(None, ge=1e-6, le=1e-2, description="learning rate; default from memory or the recipe")
    lora_rank: int | None = Field(None, ge=1, le=128)


class PlanningTool(RunTool):
    def plan(self, fingerprint: str, lr: float | None, lora_rank: int | None, steps: int | None = None):
        """The plan for this run's dataset; what the goal fixed is not the agent's to change."""
        from steps.plan import plan_goal

        ctx = self.context
        summary = self.need("summary")
        if fingerprint != summary.fingerprint:
            raise InputError(f"fingerprint: this run curated {summary.fingerprint} and trains on it only, not {fingerprint}")
        if lora_rank is not None and ctx.goal.lora is not None and lora_rank != ctx.goal.lora.rank:
            raise InputError(f"lora_rank: the goal fixed rank {ctx.goal.lora.rank}; it is not the agent's to change")
        return plan_goal(self.workspace, ctx.goal, summary, use_memory=ctx.use_memory, earlier=ctx.earlier,
                         warm_start=ctx.warm_start, lr=lr, lora_rank=lora_rank, steps=steps)


class EstimatePlanTool(PlanningTool):
    name: str = "estimate_plan"
    description: str = ("Build the training plan for the goal on a curated dataset (starting from the best earlier "
                        "run on similar data when memory has one) and account its parameters and memory. Trains nothing.")
    args_schema: type[BaseModel] = PlanArgs

    def act(self, fingerprint: str, lr: float | None = None, lora_rank: int | None = None) -> dict:
        from training.estimate import estimate

        plan, reused, fit = self.plan(fingerprint, lr, lora_rank)
        est = estimate(plan, Path(self.workspace), measure_steps=0)
        return {"plan": plan.model_dump(mode="json", exclude_defaults=True), "reused_from": reused,
                "records_fit": fit.sentence("training", plan.seq_len) if fit else None,
                "test_split_warning": test_size_warning(self.context.goal, self.need("summary").splits.get("test", 0)),
                "trainable_params": est.trainable_params, "total_params": est.total_params,
                "memory_gb": {k: round(v, 2) for k, v in est.memory_gb.items()}}


class TrainArgs(PlanArgs):
    steps: int | None = Field(None, ge=1, le=100_000, description="fewer steps than the goal's budget, if wanted")
    reason: str | None = Field(None, max_length=200, description="why this configuration (shown in the report)")


class TrainModelTool(PlanningTool):
    name: str = "train_model"
    description: str = ("Train (pretrain or fine-tune, as the goal says) on a curated dataset within the goal's "
                        "budget, validating as it goes and keeping the best checkpoint. Returns the run's result.")
    args_schema: type[BaseModel] = TrainArgs

    def act(self, fingerprint: str, lr: float | None = None, lora_rank: int | None = None, steps: int | None = None,
            reason: str | None = None) -> dict:
        from steps import train as attempts

        ctx = self.context
        left = None
        if ctx.result is not None:  # a further configuration: only while the target is missed and the budget has room
            left, stop = attempts.attempts_left(ctx.goal, ctx.max_attempts, ctx.attempts)
            if stop:
                return {**self.answer(), "already_trained": True, "may_try_again": False, "why_not": stop}
        plan, reused, _ = self.plan(fingerprint, lr, lora_rank, steps)
        if left is not None:
            plan = TrainPlan.model_validate({**plan.model_dump(), "budget": attempts.within(plan.budget, left).model_dump()})
        number = len(ctx.attempts) + 1
        run_id = attempts.attempt_run_id(ctx.run_id, number)
        plan, result = attempts.train_planned(self.workspace, run_id, plan, reused)  # a bar on stderr
        ctx.trained[run_id] = (plan, result)
        ctx.reused_from = ctx.reused_from or reused
        if ctx.max_attempts > 1:
            self.record_attempt(number, run_id, plan, result, reason)
        else:
            ctx.plan, ctx.result = plan, result
        return self.answer()

    def record_attempt(self, number: int, run_id: str, plan, result, reason: str | None) -> None:
        """Judge the attempt on validation and pick the best so far (the evaluator gates that one, on test)."""
        from steps import train as attempts

        ctx = self.context
        ppl, ctx.base_val_perplexity, threshold = attempts.on_validation(self.workspace, ctx.goal, plan, result,
                                                                         ctx.base_val_perplexity)
        why = f"{reason} (the agent, {ctx.author})" if reason else "the plan code made for the goal"
        attempts.record_tried(self.workspace, run_id, plan, result, ppl, ctx.base_val_perplexity,
                              ctx.summary.splits.get("val", 0), ctx.summary.format)
        ctx.attempts.append(attempts.attempt_record(number, run_id, plan, result, ppl, threshold, why))
        best = min(ctx.attempts, key=lambda a: (a["val_perplexity"] is None, a["val_perplexity"] or 0.0))
        ctx.picked = None if best["run_id"] == ctx.run_id else best["run_id"]
        ctx.plan, ctx.result = ctx.trained[best["run_id"]]
        Run(self.workspace, ctx.trained_run_id).write_attempts([{**a, "picked": a is best} for a in ctx.attempts])

    def answer(self) -> dict:
        from steps import train as attempts

        ctx = self.context
        r = ctx.result
        out = {"run_id": r.run_id, "status": r.status, "message": r.message, "steps": r.steps, "best_step": r.best_step,
               "records": r.records,
               "best_val_loss": r.best_val_loss, "tokens_per_second": r.tokens_per_second, "reused_from": ctx.reused_from,
               "already_trained": False}
        if ctx.attempts:
            last = ctx.attempts[-1]
            left, stop = attempts.attempts_left(ctx.goal, ctx.max_attempts, ctx.attempts)
            out.update(attempt=last["attempt"], of=ctx.max_attempts, lr=last["lr"], curve=last["curve"],
                       val_perplexity=last["val_perplexity"], threshold=last["threshold"],
                       met_on_validation=last["met_on_validation"], budget_left=left, may_try_again=stop is None, why_not=stop,
                       picked=ctx.trained_run_id)
            if stop is None:
                out.update(self.what_else_is_known(last, left))
        return out

    def what_else_is_known(self, last: dict, left: dict) -> dict:
        """For choosing the next configuration: the learning rates memory knows were tried on this (or the same)
        data, its lessons (quoted data), and how many steps fit the budget left at the measured speed."""
        from steps.evaluate import quoted_lesson

        ctx = self.context
        store = MemoryStore(self.workspace)
        best = store.best_known_config(ctx.summary)
        lessons = store.search(f"lessons about {ctx.summary.fingerprint}", "lessons", k=3) if store.count("lessons") else []
        seconds_per_step = last["minutes"] * 60 / max(last["steps"], 1)
        fits = [x for x in (left["steps"], int(left["minutes"] * 60 / seconds_per_step) if left["minutes"] else None)
                if x is not None]
        return {"tried_lrs": best.tried_lrs if best else [], "lessons": [quoted_lesson(h) for h in lessons],
                "seconds_per_step": round(seconds_per_step, 3), "steps_that_fit": min(fits) if fits else None}


# ---- evaluator ------------------------------------------------------------------------------------


class RunArgs(ToolArgs):
    run_id: str = Field(pattern=RUN_ID)


class EvaluateModelTool(RunTool):
    name: str = "evaluate_model"
    description: str = ("Evaluate the trained run beside its base model (and production when the goal compares with "
                        "it), then apply the goal's gate: target, forgetting and contamination. Returns the metrics "
                        "and the verdict with its reasons. A run is evaluated and gated once.")
    args_schema: type[BaseModel] = RunArgs

    def act(self, run_id: str) -> dict:
        from steps.evaluate import evaluate_and_gate

        ctx = self.context
        self.this_run(run_id)
        already = ctx.evaluation is not None and ctx.verdict is not None  # a second call cannot re-draw the sample
        if not already:
            ctx.evaluation, ctx.verdict = evaluate_and_gate(self.workspace, ctx.trained_run_id, ctx.goal, ctx.eval_examples,
                                                            plan=self.need("plan"))
        shown = {k: v for k, v in ctx.evaluation.metrics.items() if not k.endswith("_loss")}
        return {"run_id": run_id, "evaluated_run": ctx.trained_run_id, "metrics": shown, "gate": ctx.verdict.model_dump(),
                "already_evaluated": already}


class CompareWithHistoryTool(RunTool):
    name: str = "compare_with_history"
    description: str = ("Compare an evaluated run with every earlier run on the same data (from memory): its rank "
                        "on the goal's metric, the best earlier run and the lessons recorded about this data.")
    args_schema: type[BaseModel] = RunArgs

    def act(self, run_id: str) -> dict:
        from steps.evaluate import compare_with_history

        self.this_run(run_id)
        return compare_with_history(self.workspace, self.need("evaluation"), self.context.goal.metric)


class ReportArgs(RunArgs):
    lesson: str | None = Field(None, max_length=300, description="one sentence learned from this run, for memory")
    narrative: str | None = Field(None, max_length=1500, description=(
        "optional account of the run in plain words; write numbers only as placeholders {metric} {value} {base} "
        "{threshold} {verdict} {steps} (code inserts them); it may not contradict the gate's verdict"))


class WriteReportTool(RunTool):
    name: str = "write_report"
    description: str = ("Write the run's evaluation report (report.md and report.html) from its artefacts, and store "
                        "a lesson about it in memory. Every number in it comes from the artefacts.")
    args_schema: type[BaseModel] = ReportArgs

    def act(self, run_id: str, lesson: str | None = None, narrative: str | None = None) -> dict:
        from steps.report import write_report

        self.this_run(run_id)
        path = write_report(self.workspace, self.context.trained_run_id, self.context.goal_text, self.need("plan").dataset,
                            narrative, lesson, author=self.context.author)
        self.context.reported = True
        return {"report": str(path), "lesson_stored": bool(lesson)}
