"""`modelcrew run GOAL`: parse the goal, run the crew, collect what it did into one result."""

from __future__ import annotations

import json
import os
import secrets
import time
from datetime import datetime
from pathlib import Path

from training.errors import InputError, ModelcrewError

CREWAI_QUIET = {"CREWAI_DISABLE_TELEMETRY": "true", "CREWAI_TRACING_ENABLED": "false", "CREWAI_DISABLE_VERSION_CHECK": "true"}


def quiet_crewai(workspace: Path) -> None:
    """No telemetry, tracing or version checks (each stalls 5-20 s offline); CrewAI's files in the workspace."""
    for key, value in CREWAI_QUIET.items():
        os.environ.setdefault(key, value)
    storage = Path(workspace).resolve() / "crewai"
    storage.mkdir(parents=True, exist_ok=True)
    os.environ["CREWAI_STORAGE_DIR"] = str(storage)  # two workspaces never share CrewAI's databases


def new_run_id(task: str) -> str:
    return f"{task}-{datetime.now().strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def run_goal(goal_text: str, workspace: Path, llm: str | None = None, base_url: str | None = None, echo=None,
             run_id: str | None = None) -> dict:
    from crews.goals import parse_goal, parse_goal_with_llm

    workspace = Path(workspace)
    quiet_crewai(workspace)
    from agents.llm import OFFLINE, make_llm
    from crews.crew import ModelCrew
    from tools.base import Trace

    agents_llm = make_llm(llm, base_url)
    offline = (llm or os.environ.get("MODELCREW_LLM") or OFFLINE) == OFFLINE and not (base_url or os.environ.get("MODELCREW_LLM_BASE_URL"))
    # the offline policy cannot read language: its goals come from the deterministic parser; a real LLM parses its own
    goal = parse_goal(goal_text, workspace) if offline else parse_goal_with_llm(goal_text, agents_llm, workspace)
    if goal.task == "evaluate":
        raise InputError("task: evaluate-only goals are not run by the crew yet; use `modelcrew eval RUN_ID`")

    run_id = run_id or new_run_id(goal.task)
    run_dir = workspace / "runs" / run_id
    trace = Trace(run_dir / "trace.jsonl", echo=echo)
    trace.write("goal", text=goal_text, goal=goal.model_dump(mode="json"), llm=llm or "offline")
    started = time.perf_counter()
    crew = ModelCrew(workspace, goal, goal_text, run_id, agents_llm, trace).crew()
    try:
        out = crew.kickoff(inputs={"goal_json": goal.model_dump_json(), "run_id": run_id})
    except ModelcrewError:
        raise
    except Exception as err:  # the LLM or a tool gave up after its retries: stop cleanly, say why
        trace.write("error", message=str(err))
        raise ModelcrewError(f"the crew stopped: {type(err).__name__}: {str(err).splitlines()[0][:300]} "
                             f"(trace: {run_dir / 'trace.jsonl'})") from None
    wall = time.perf_counter() - started
    return collect(workspace, run_id, goal, goal_text, out, wall, trace)


def collect(workspace: Path, run_id: str, goal, goal_text: str, out, wall: float, trace) -> dict:
    from training.contracts import Deployment, Evaluation, GateVerdict, TrainPlan
    from training.gate import metric_key

    run_dir = workspace / "runs" / run_id
    outputs = [t.pydantic for t in out.tasks_output]
    deployment = outputs[-1] if isinstance(outputs[-1], Deployment) else Deployment(deployed=False, reason="no answer")
    record_deployment(workspace, run_id, deployment, goal_text)
    ev = Evaluation.model_validate_json((run_dir / "evaluation.json").read_text(encoding="utf-8"))
    gate = GateVerdict.model_validate_json((run_dir / "gate.json").read_text(encoding="utf-8"))
    plan = TrainPlan.model_validate_json((run_dir / "plan.json").read_text(encoding="utf-8"))
    key = metric_key(goal.metric, ev.metrics)
    tool_seconds = sum(e.get("seconds", 0) for e in trace.events if e["kind"] == "tool")
    result = {
        "run_id": run_id, "goal": goal_text, "parsed_goal": goal.model_dump(mode="json"), "fingerprint": plan.dataset,
        "base_val_perplexity": ev.metrics.get("base_val_perplexity"), "val_perplexity": ev.metrics.get("val_perplexity"),
        "metric": key, "base_value": ev.metrics.get(f"base_{key}"), "value": ev.metrics.get(key),
        "gate": {"passed": gate.passed, "reasons": gate.reasons},
        "deployment": ({"model_name": deployment.model_name, "version": deployment.version, "alias": deployment.alias}
                       if deployment.version and deployment.alias else None),
        "report": str(run_dir / "report.md"), "wall_seconds": round(wall, 2), "tool_seconds": round(tool_seconds, 2),
    }
    (run_dir / "crew_result.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


def record_deployment(workspace: Path, run_id: str, deployment, goal_text: str) -> None:
    """After the deployer: `deployment.json`, the run's memory entry (now saying whether it was deployed) and
    its report (the evaluator wrote it before the deployer acted) are brought up to date."""
    from memory.store import MemoryStore, load_run_artefacts
    from tools.report import render

    run_dir = Path(workspace) / "runs" / run_id
    (run_dir / "deployment.json").write_text(deployment.model_dump_json(indent=2), encoding="utf-8")
    MemoryStore(workspace).add_evaluation(*load_run_artefacts(run_dir))
    render(workspace, run_id, goal_text)
