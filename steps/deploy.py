"""Deploying a run: what the goal allows (checked in code, whoever asks), registering once, and recording
what happened, read from the registry (never from an agent's account of it).
"""

from __future__ import annotations

from pathlib import Path

from memory.store import MemoryStore
from reports.run import render
from serving.registry import Registry, Version, register_run
from training.contracts import Deployment, Evaluation, GateVerdict, Goal, TrainPlan
from training.errors import InputError
from training.runs import Run


def check_model_name(goal: Goal, model_name: str) -> None:
    if goal.deploy == "never":
        raise InputError("deploy: the goal says never deploy; nothing may be registered or promoted")
    if model_name != goal.model_name:
        raise InputError(f"model_name: this goal deploys as {goal.model_name}, not {model_name}")


def check_register(goal: Goal, verdict: GateVerdict | None, model_name: str) -> None:
    """May this run's model be registered under `model_name`? Raises with the reason when not."""
    check_model_name(goal, model_name)
    if verdict is None:
        raise InputError("register: the run has no gate verdict yet (evaluate_model first)")
    if goal.deploy == "if_passed" and not verdict.passed:
        raise InputError(f"register: the goal deploys only if the gate passes, and it failed: {verdict.reasons[0]}")


def check_promote(goal: Goal, registered: str | None, model_name: str, version: str, to: str) -> None:
    """May `version` move to `to`? Only this run's own version, and production only without required approval."""
    check_model_name(goal, model_name)
    if registered is None:
        raise InputError("promote: this run registered no version (register_model first)")
    if version != registered:
        raise InputError(f"version: this run registered {registered}; it may promote that version only, not {version}")
    if to == "production" and goal.approval == "required":
        raise InputError(f"to: the goal requires a person's approval; promote {version} to staging, and a person runs "
                         f"`modelcrew models approve {model_name} {version}`")


def register_once(workspace: Path, model_name: str, run_id: str) -> tuple[Version, bool]:
    """(version, registered now): a retried or resumed deploy step registers a run's best model once."""
    registry = Registry(workspace)
    if model_name in registry.names():
        done = next((v for v in registry.state(model_name).versions.values() if v.run_id == run_id), None)
        if done is not None:
            return done, False
    return register_run(workspace, model_name, run_id, "best"), True


def deployment_from_registry(workspace: Path, goal: Goal, run_id: str, verdict: GateVerdict | None) -> Deployment:
    """What the registry says this run's deployment is: its version and the alias on it, with code's reason."""
    name = goal.model_name
    registry = Registry(workspace)
    state = registry.state(name) if name and name in registry.names() else None
    version = next((v.version for v in state.versions.values() if v.run_id == run_id), None) if state else None
    if version is None:
        if goal.deploy == "never":
            reason = "the goal says never deploy"
        elif verdict is not None and not verdict.passed and goal.deploy == "if_passed":
            reason = f"the gate failed: {verdict.reasons[0]}"
        else:
            reason = "the deployer registered nothing"
        return Deployment(deployed=False, model_name=name, reason=reason)
    for alias in ("production", "staging"):
        if state.aliases.get(alias) == version:
            moved = next((m.reason for m in reversed(state.history) if m.alias == alias and m.after == version), "")
            waiting = f"waiting for approval: modelcrew models approve {name} {version}" if alias == "staging" else ""
            return Deployment(deployed=alias == "production", model_name=name, version=version, alias=alias,
                              reason="; ".join(x for x in (f"{name}@{alias} is {version}", moved, waiting) if x))
    return Deployment(deployed=False, model_name=name, version=version, reason=f"registered as {version}; not promoted")


def record_deployment(workspace: Path, run_id: str, deployment: Deployment, goal_text: str, evaluation: Evaluation,
                      plan: TrainPlan | None, verdict: GateVerdict | None) -> None:
    """After the deployer: the run keeps deployment.json, memory's entry for the run says whether it was
    deployed, and the report (written by the evaluator before the deployer acted) is rendered again."""
    Run(workspace, run_id).write_deployment(deployment)
    MemoryStore(workspace).add_evaluation(evaluation, plan, verdict, deployment.deployed)
    render(workspace, run_id, goal_text)
