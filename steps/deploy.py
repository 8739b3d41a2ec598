"""Register a run's model once, and record what the deployer did in the run, in memory and in its report."""

from __future__ import annotations

from pathlib import Path

from memory.store import MemoryStore
from reports.run import render
from serving.registry import Registry, Version, register_run
from training.contracts import Deployment, Evaluation, GateVerdict, TrainPlan
from training.runs import Run


def register_once(workspace: Path, model_name: str, run_id: str) -> tuple[Version, bool]:
    """(version, registered now): a retried or resumed deploy step registers a run's best model once."""
    registry = Registry(workspace)
    if model_name in registry.names():
        done = next((v for v in registry.state(model_name).versions.values() if v.run_id == run_id), None)
        if done is not None:
            return done, False
    return register_run(workspace, model_name, run_id, "best"), True


def record_deployment(workspace: Path, run_id: str, deployment: Deployment, goal_text: str, evaluation: Evaluation,
                      plan: TrainPlan | None, verdict: GateVerdict | None) -> None:
    """After the deployer: the run keeps deployment.json, memory's entry for the run says whether it was
    deployed, and the report (written by the evaluator before the deployer acted) is rendered again."""
    Run(workspace, run_id).write_deployment(deployment)
    MemoryStore(workspace).add_evaluation(evaluation, plan, verdict, deployment.deployed)
    render(workspace, run_id, goal_text)
