"""`modelcrew run GOAL`: the goal (parsed once, by the caller), the crew, and what it did as one result."""

from __future__ import annotations

import os
import time
from pathlib import Path

from training.contracts import Goal
from training.errors import InputError, ModelcrewError
from training.runs import Run, new_run_id

STEPS = ("curate", "train", "evaluate", "deploy")


def agents_llm(llm: str | None = None, base_url: str | None = None):
    """The agents' LLM for `--llm` / `--llm-base-url` (or their environment variables), and whether it is the
    offline policy (which cannot read language: its goals come from the deterministic parser)."""
    from llm.backends import OFFLINE, make_llm

    offline = (llm or os.environ.get("MODELCREW_LLM") or OFFLINE) == OFFLINE and not (base_url or os.environ.get("MODELCREW_LLM_BASE_URL"))
    return make_llm(llm, base_url), offline


def understand_goal(goal_text: str, workspace: Path, llm=None, offline: bool = True) -> Goal:
    """The one parse of a goal: the deterministic parser for the offline policy, the agents' own LLM otherwise."""
    from crews.goals import parse_goal, parse_goal_with_llm

    goal = parse_goal(goal_text, workspace) if offline else parse_goal_with_llm(goal_text, llm, workspace)
    if goal.task == "evaluate":
        raise InputError("task: evaluate-only goals are not run by the crew yet; use `modelcrew eval RUN_ID`")
    return goal


def run_goal(goal: Goal, goal_text: str, workspace: Path, llm, echo=None, run_id: str | None = None,
             llm_name: str = "offline", parse_seconds: float = 0.0) -> dict:
    """Run the crew on `goal` (already parsed, in `parse_seconds`, and confirmed by whoever asked); returns the
    run's summary."""
    from llm.env import quiet_crewai

    workspace = Path(workspace)
    quiet_crewai(workspace)
    from crews.crew import ModelCrew
    from steps.context import RunContext

    run = Run(workspace, run_id or new_run_id(goal.task))
    trace = run.trace(echo=echo)
    trace.write("goal", text=goal_text, goal=goal.model_dump(mode="json"), llm=llm_name, parse_seconds=round(parse_seconds, 3))
    context = RunContext(workspace, goal, goal_text, run.run_id, author=llm_name, max_attempts=goal.attempts)
    started = time.perf_counter()
    crew = ModelCrew(context, llm, trace)
    try:
        for name in STEPS:
            crew.run(name)
    except ModelcrewError:
        raise
    except Exception as err:  # the LLM or a tool gave up after its retries: stop cleanly, say why
        trace.write("error", message=str(err))
        raise ModelcrewError(f"the crew stopped: {type(err).__name__}: {str(err).splitlines()[0][:300]} "
                             f"(trace: {run.trace_path})") from None
    return collect(context, time.perf_counter() - started, trace, llm_name, parse_seconds)


def collect(context, crew_seconds: float, trace, llm_name: str, parse_seconds: float) -> dict:
    """Record the deployment as the registry has it (whatever the deployer answered), and summarise the run
    from what its steps produced (`crew_result.json`)."""
    from steps.deploy import deployment_from_registry, record_deployment
    from training.gate import metric_key

    ev, verdict, plan = context.evaluation, context.verdict, context.plan
    if ev is None or verdict is None:
        raise ModelcrewError(f"the crew finished without evaluating run {context.run_id} (trace: {context.run.trace_path})")
    after = time.perf_counter()
    trained = Run(context.workspace, context.trained_run_id)  # the attempt evaluated and gated
    deployment = context.deployment = deployment_from_registry(context.workspace, context.goal, trained.run_id, verdict)
    record_deployment(context.workspace, trained.run_id, deployment, context.goal_text, ev, plan, verdict)
    after_seconds = time.perf_counter() - after
    key = metric_key(context.goal.metric, ev.metrics)
    tool_seconds = sum(e.get("seconds", 0) for e in trace.events if e["kind"] == "tool")
    result = {
        "run_id": trained.run_id, "goal": context.goal_text, "parsed_goal": context.goal.model_dump(mode="json"),
        "fingerprint": plan.dataset,
        "base_val_perplexity": ev.metrics.get("base_val_perplexity"), "val_perplexity": ev.metrics.get("val_perplexity"),
        "metric": key, "base_value": ev.metrics.get(f"base_{key}"), "value": ev.metrics.get(key),
        "gate": {"passed": verdict.passed, "reasons": verdict.reasons},
        "deployment": ({"model_name": deployment.model_name, "version": deployment.version, "alias": deployment.alias}
                       if deployment.version and deployment.alias else None),
        "report": str(trained.report_paths()[0]), "llm": llm_name,
        "attempts": [{k: a[k] for k in ("attempt", "run_id", "lr", "steps", "val_perplexity", "met_on_validation")}
                     for a in context.attempts],
        "attempts_ended": attempts_ended(context),
        # wall = parsing the goal + the crew's four tasks + recording the deployment (registry, memory, report)
        "wall_seconds": round(parse_seconds + crew_seconds + after_seconds, 2), "parse_seconds": round(parse_seconds, 2),
        "crew_seconds": round(crew_seconds, 2), "after_seconds": round(after_seconds, 2), "tool_seconds": round(tool_seconds, 2),
    }
    trained.write_crew_result(result)
    return result


def attempts_ended(context) -> str | None:
    """Why the crew tried no further configuration (None when the goal allowed one)."""
    from steps.train import attempts_left

    return attempts_left(context.goal, context.max_attempts, context.attempts)[1] if context.attempts else None


def run_goal_text(goal_text: str, workspace: Path, llm: str | None = None, base_url: str | None = None, echo=None) -> dict:
    """Parse `goal_text` once and run the crew on that Goal, with no confirmation (tests and benches)."""
    agents, offline = agents_llm(llm, base_url)
    started = time.perf_counter()
    goal = understand_goal(goal_text, Path(workspace), agents, offline)
    return run_goal(goal, goal_text, workspace, agents, echo=echo, llm_name=llm_label(llm, offline),
                    parse_seconds=time.perf_counter() - started)


def llm_label(llm: str | None, offline: bool) -> str:
    """How a run names what drove its agents: `offline` (the rule-based policy, not a language model) or the model."""
    return "offline" if offline else (llm or os.environ.get("MODELCREW_LLM") or "the model at --llm-base-url")
