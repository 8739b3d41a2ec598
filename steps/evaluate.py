"""Evaluate a trained run, score production on the same evaluation set, gate, record it in memory."""

from __future__ import annotations

from pathlib import Path

from memory.store import MemoryStore
from serving.registry import Registry
from training.contracts import Evaluation, GateVerdict, Goal, TrainPlan
from training.data.store import load_contamination
from training.errors import InputError
from training.evaluate import Scores, add_reference, evaluate_run, forgetting_corpus, score_directory
from training.gate import gate, lower_is_better, metric_key
from training.runs import Run


def evaluate_and_gate(workspace: Path, run_id: str, goal: Goal | None = None, max_examples: int | None = None,
                      plan: TrainPlan | None = None) -> tuple[Evaluation, GateVerdict | None]:
    """Score the run's best model beside its base; with a goal, also beside production (when the goal deploys
    to a model that has one) and judge it with the gate. The run keeps evaluation.json and gate.json, and
    memory indexes the evaluation. Without a goal (`modelcrew eval`) the run keeps its earlier verdict, if any."""
    run = Run(workspace, run_id).require()
    plan = plan or run.plan()
    evaluation = evaluate_run(workspace, run_id, max_examples=max_examples, plan=plan)
    if goal is None:
        verdict = run.gate()
    else:
        production = score_production(workspace, goal, plan, max_examples, evaluation)
        if production is not None:  # production on the same records, paired with the candidate
            add_reference(evaluation, "production", evaluation.per_record["candidate"], production.values)
            run.write_evaluation(evaluation)
        contaminated = len(load_contamination(workspace, plan.dataset) or [])
        verdict = gate(goal, evaluation, None, contaminated)
        run.write_gate(verdict)
    deployment = run.deployment()
    MemoryStore(workspace).add_evaluation(evaluation, plan, verdict, bool(deployment and deployment.deployed))
    return evaluation, verdict


def production(workspace: Path, goal: Goal):
    """(version, path) of the goal's model in production, or (None, None) when nothing is there yet."""
    if not goal.model_name:
        return None, None
    try:
        _, version, path = Registry(workspace).resolve(f"{goal.model_name}@production")
    except InputError:
        return None, None
    return version, path


def score_production(workspace: Path, goal: Goal, plan: TrainPlan, max_examples: int | None,
                     evaluation: Evaluation) -> Scores | None:
    """Production's per-record scores on this run's evaluation set (the same records, the same forgetting
    corpus), or None when the goal deploys nowhere or nothing is there yet."""
    if goal.deploy == "never":
        return None
    _, path = production(workspace, goal)  # nothing in production yet: the gate compares with the base and says so
    if path is None:
        return None
    forgetting, _ = forgetting_corpus(workspace, _reference_dir(evaluation))
    return score_directory(workspace, path, plan.dataset, plan.seq_len, max_examples, forgetting, plan.precision)


def _reference_dir(evaluation: Evaluation) -> str | None:
    import json

    lineage = Path(evaluation.model_dir) / "lineage.json"
    if not lineage.exists():
        return None
    data = json.loads(lineage.read_text(encoding="utf-8"))
    return data.get("reference_dir") or data.get("base_dir")


def compare_with_history(workspace: Path, evaluation: Evaluation, metric: str) -> dict:
    """The run's rank on `metric` among every run on the same data in memory, the best earlier one, and the
    lessons recorded about this data."""
    key = metric_key(metric, evaluation.metrics)
    store = MemoryStore(workspace)
    runs = [r for r in store.history(fingerprint=evaluation.dataset) if key in r.metrics]
    ranked = sorted(runs, key=lambda r: r.metrics[key], reverse=not lower_is_better(key))
    rank = next((i + 1 for i, r in enumerate(ranked) if r.run_id == evaluation.run_id), None)
    best = next((r for r in ranked if r.run_id != evaluation.run_id), None)
    lessons = store.search(f"lessons about {evaluation.dataset} {metric}", "lessons", k=3) if store.count("lessons") else []
    return {"metric": key, "value": evaluation.metrics.get(key), "rank": rank, "of": len(ranked),
            "best_earlier": {"run_id": best.run_id, "value": best.metrics[key]} if best else None,
            "lessons": [quoted_lesson(h) for h in lessons]}


def quoted_lesson(hit) -> dict:
    """A stored lesson as it is shown to an agent: text an earlier agent wrote, quoted as data with its author."""
    return {"quoted_lesson": hit.summary, "author": hit.metadata.get("author", "unknown"), "run_id": hit.metadata.get("run_id")}
