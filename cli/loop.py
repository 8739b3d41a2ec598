"""`modelcrew loop start | status | trigger | stop`: the retraining loop."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

import sys

from cli.common import DEFAULT_WORKSPACE, Debug, Json, Workspace, check_workspace, console, emit_json, reported
from training.errors import InputError

app = typer.Typer(help="The retraining loop: watch data and production, retrain, gate, deploy, roll back.",
                  no_args_is_help=True)


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, option: str) -> float:
    """'90', '90s', '15m', '1h', '2d' -> seconds."""
    import re

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text or "")
    if not match or float(match.group(1)) <= 0:
        raise InputError(f"{option}: expected a duration like 90s, 15m, 1h or 2d, got {text!r}")
    return float(match.group(1)) * DURATION_UNITS[match.group(2) or "s"]


@app.command("start")
def loop_start(
    goal: Annotated[Optional[str], typer.Argument(help="The goal in plain words (omit to continue this workspace's loop).")] = None,
    watch: Annotated[Optional[Path], typer.Option("--watch", help="File or directory of records to watch (default: the goal's data).")] = None,
    feedback: Annotated[Optional[str], typer.Option("--feedback", metavar="MODEL", help="Learn from MODEL's recorded answers and ratings (`serve --record`) instead of a folder: corrections and good answers for SFT, corrected answers as pairs for DPO/ORPO, ratings for KTO.")] = None,
    min_feedback: Annotated[int, typer.Option("--min-feedback", min=1, help="With --feedback: a round waits for this many new training records.")] = 20,
    every: Annotated[str, typer.Option("--every", help="Time between checks: 90s, 15m, 1h, 2d.")] = "1h",
    schedule: Annotated[Optional[str], typer.Option("--schedule", help="Also retrain at least this often without new data.")] = None,
    max_rounds: Annotated[Optional[int], typer.Option("--max-rounds", min=1, help="Stop after this many rounds.")] = None,
    once: Annotated[bool, typer.Option("--once", help="One check (and at most one round), then exit.")] = False,
    replay: Annotated[float, typer.Option("--replay", min=0.0, max=0.9, help="Share of a later round's training records drawn from earlier data.")] = 0.5,
    drift: Annotated[float, typer.Option("--drift", min=0.01, max=2.0, help="Embedding-centroid distance between new and training records that counts as drift.")] = 0.3,
    no_memory: Annotated[bool, typer.Option("--no-memory", help="The trainer ignores earlier runs in memory (a baseline); the loop's own rounds still rule out a missed rate.")] = False,
    llm: Annotated[Optional[str], typer.Option("--llm", envvar="MODELCREW_LLM", help="offline (default, a rule-based policy), or a CrewAI model string.")] = None,
    llm_base_url: Annotated[Optional[str], typer.Option("--llm-base-url", envvar="MODELCREW_LLM_BASE_URL", help="An OpenAI-compatible server for the agents' LLM.")] = None,
    workspace: Workspace = DEFAULT_WORKSPACE,
    as_json: Json = False,
    debug: Debug = False,
) -> None:
    """Start (or continue) the retraining loop on this workspace; one loop per workspace."""
    with reported(debug):
        from crews.loop_state import LoopLock, LoopSettings, load_state

        check_workspace(workspace)
        lock = LoopLock(workspace)
        if lock.running():  # before the slow imports: a second loop is refused at once
            raise lock.busy()
        settings, parsed = None, None
        if goal is not None:
            from crews.loop_policy import loop_goal

            parsed, watch = loop_goal(goal, watch, workspace, feedback)  # the one parse of the loop's goal
            settings = LoopSettings(goal_text=goal, watch=str(watch), feedback=feedback, min_feedback=min_feedback,
                                    every_s=parse_duration(every, "--every"),
                                    schedule_s=parse_duration(schedule, "--schedule") if schedule else None,
                                    max_rounds=max_rounds, replay=replay, drift_distance=drift, use_memory=not no_memory,
                                    llm=llm, base_url=llm_base_url)
        elif load_state(workspace) is not None and (max_rounds or no_memory or every != "1h"):
            saved = load_state(workspace).settings
            settings = saved.model_copy(update={"every_s": parse_duration(every, "--every"), "max_rounds": max_rounds,
                                                "use_memory": saved.use_memory and not no_memory})
        from crews.loop import run_loop

        state = run_loop(workspace, settings, once=once, goal=parsed)
        if as_json:
            emit_json(state.model_dump(mode="json"))
        console(as_json).print(f"loop stopped after {len(state.rounds)} rounds; report {workspace / 'loop' / 'report.html'}",
                                markup=False)


@app.command("status")
def loop_status(workspace: Workspace = DEFAULT_WORKSPACE, as_json: Json = False, debug: Debug = False) -> None:
    """Whether a loop runs here, its goal, rounds and production."""
    with reported(debug):
        from reports.loop import timeline
        from crews.loop_state import LoopLock, load_state

        state = load_state(workspace)
        if state is None:
            raise InputError(f"no loop has run on {workspace}; `modelcrew loop start GOAL --watch PATH` starts one")
        running = LoopLock(workspace).running()
        if as_json:
            emit_json({"running": running, **state.model_dump(mode="json")})
            return
        print(f"loop on {workspace}: {'running (' + running + ')' if running else 'not running'}")
        print(f"goal: {state.settings.goal_text}\nwatching: {state.settings.watch} every {state.settings.every_s:g} s; "
              f"{state.checks} checks, last {state.last_check_at or 'never'}")
        for version, s in state.feedback_rates.items():
            rate = "no ratings yet" if s["good_rate"] is None else f"{s['good_rate']:.0%} good"
            print(f"feedback on {version}: {s['completions']} answers, {s['rated']} rated, {rate}, {s['corrected']} corrected")
        for row in timeline(state):
            print(f"round {row['number']} {row['started']} [{row['triggers']}] {row['data']}; "
                  f"{row['metric']} {row['candidate']} vs production {row['production']}: {row['verdict']}; {row['action']}")
        print(f"report: {workspace / 'loop' / 'report.html'}")


@app.command("trigger")
def loop_trigger(reason: Annotated[str, typer.Option("--reason", help="Why (kept in the round's record).")] = "manual trigger",
                 workspace: Workspace = DEFAULT_WORKSPACE, debug: Debug = False) -> None:
    """Ask for a round now (the running loop starts it at its next poll, or the next `loop start` does)."""
    with reported(debug):
        from crews.loop_state import LoopLock, request

        request(workspace, "trigger", reason)
        running = LoopLock(workspace).running()
        print(f"round requested; {'the running loop (' + running + ') starts it within a second' if running else 'no loop is running: the next `modelcrew loop start` starts it'}",
              file=sys.stderr)


@app.command("stop")
def loop_stop(workspace: Workspace = DEFAULT_WORKSPACE, debug: Debug = False) -> None:
    """Ask the running loop to stop after its current step (its round continues at the next start)."""
    with reported(debug):
        from crews.loop_state import LoopLock, request

        running = LoopLock(workspace).running()
        if not running:
            raise InputError(f"no loop is running on {workspace}")
        request(workspace, "stop")
        print(f"stop requested; the loop ({running}) stops when its current round or wait ends", file=sys.stderr)
