"""`modelcrew run | plan | report | runs list|compare`: goals, the crew, and the runs it leaves."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer

from cli.common import DEFAULT_WORKSPACE, Debug, Json, Workspace, check_workspace, console, emit_json, reported, say

runs_app = typer.Typer(help="Evaluated runs: list them, compare two.", no_args_is_help=True)

LLM = Annotated[Optional[str], typer.Option("--llm", envvar="MODELCREW_LLM", help="offline (default, a rule-based policy), or a CrewAI model string such as openai/gpt-4o-mini.")]
LLMBaseURL = Annotated[Optional[str], typer.Option("--llm-base-url", envvar="MODELCREW_LLM_BASE_URL", help="An OpenAI-compatible server for the agents' LLM.")]


def run_command(
    goal: Annotated[str, typer.Argument(help="The goal in plain words, quoted.")],
    llm: LLM = None,
    llm_base_url: LLMBaseURL = None,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask before starting (never asked without a terminal).")] = False,
    workspace: Workspace = DEFAULT_WORKSPACE,
    as_json: Json = False,
    debug: Debug = False,
) -> None:
    """Run the crew on a goal: curate, train, evaluate and gate, report, deploy as the goal says."""
    with reported(debug):
        import time

        from crews.run import agents_llm, llm_label, run_goal, understand_goal

        out = console(as_json)
        agents, offline = agents_llm(llm, llm_base_url)
        started = time.perf_counter()
        parsed = understand_goal(goal, check_workspace(workspace), agents, offline)  # the one Goal shown, confirmed and run
        parse_seconds = time.perf_counter() - started
        from crews.goals import goal_sentence

        out.print(f"goal: {goal_sentence(parsed)}", markup=False)  # the one sentence a person confirms
        if sys.stdin.isatty() and not yes and not typer.confirm("start the crew?", default=True):
            raise typer.Exit(1)

        def show(event: dict) -> None:
            if event["kind"] == "tool_start":
                out.print(f"[dim]{event['t']:7.1f}s[/dim] [bold]{event['tool']}[/bold]({json.dumps(event['args'])}) ...",
                          highlight=False)
            elif event["kind"] == "tool":
                out.print(f"[dim]{event['t']:7.1f}s[/dim] [bold]{event['tool']}[/bold]({json.dumps(event['args'])}) "
                          f"{event['seconds']:.1f}s -> {event['result'][:160]}", highlight=False)
            elif event["kind"] == "task":
                out.print(f"[dim]{event['t']:7.1f}s[/dim] [green]{event['agent']}[/green] done: {event['output'][:200]}",
                          highlight=False)

        result = run_goal(parsed, goal, workspace, agents, echo=show, llm_name=llm_label(llm, offline),
                          parse_seconds=parse_seconds)
        if as_json:
            emit_json(result)
        gate = result["gate"]
        say(as_json, f"run {result['run_id']}: {result['metric']} {result['base_value']} -> {result['value']}; gate "
                     f"{'PASSED' if gate['passed'] else 'FAILED'}; deployment {result['deployment'] or 'none'}; "
                     f"report {result['report']}")


def report_command(
    run_id: Annotated[str, typer.Argument(help="The run to report on (runs/<run_id>/).")],
    open_it: Annotated[bool, typer.Option("--open", help="Open the HTML report in a browser.")] = False,
    workspace: Workspace = DEFAULT_WORKSPACE, as_json: Json = False, debug: Debug = False,
) -> None:
    """Re-render runs/<run_id>/report.md and report.html from the run's artefacts."""
    with reported(debug):
        from reports.run import render

        md, html = render(check_workspace(workspace), run_id)
        if as_json:
            emit_json({"markdown": str(md), "html": str(html)})
        console(as_json).print(f"wrote {md} and {html}")
        if open_it:
            import webbrowser

            webbrowser.open(html.resolve().as_uri())


@runs_app.command("list")
def runs_list(workspace: Workspace = DEFAULT_WORKSPACE, as_json: Json = False, debug: Debug = False) -> None:
    """Evaluated runs: run, goal, metric, verdict, deployed, time."""
    with reported(debug):
        from rich.table import Table

        from reports.format import fmt
        from reports.run import list_runs

        rows = list_runs(check_workspace(workspace))
        if as_json:
            emit_json(rows)
        table = Table(title=f"runs in {workspace}")
        for col in ("run", "goal", "metric", "verdict", "deployed", "time"):
            table.add_column(col)
        for r in rows:
            table.add_row(r["run_id"], (r["goal"] or "")[:60], f"{r['metric']} {fmt(r['value'])}", r["verdict"], r["deployed"], r["time"])
        console(as_json).print(table if rows else f"no evaluated runs in {workspace}")


@runs_app.command("compare")
def runs_compare(run_a: Annotated[str, typer.Argument()], run_b: Annotated[str, typer.Argument()],
                 workspace: Workspace = DEFAULT_WORKSPACE, as_json: Json = False, debug: Debug = False) -> None:
    """A side-by-side report of two runs (reports/compare-A-vs-B.md and .html)."""
    with reported(debug):
        from reports.run import render_compare

        md, html = render_compare(check_workspace(workspace), run_a, run_b)
        if as_json:
            emit_json({"markdown": str(md), "html": str(html)})
        console(as_json).print(f"wrote {md} and {html}")


def plan_command(
    goal: Annotated[str, typer.Argument(help="The goal in plain words, quoted.")],
    with_estimate: Annotated[bool, typer.Option("--estimate", help="Also estimate parameters, memory and time from 2 measured steps (curates the data into the workspace).")] = False,
    workspace: Workspace = DEFAULT_WORKSPACE,
    as_json: Json = False,
    debug: Debug = False,
) -> None:
    """Parse a goal and print it with the training plan it leads to; trains nothing (and writes nothing without --estimate)."""
    with reported(debug):
        from crews.goals import parse_goal
        from steps.plan import plan_goal
        from training.data import curate, curate_to_workspace
        from training.plan_from_goal import test_size_warning
        from training.estimate import estimate

        parsed = parse_goal(goal, check_workspace(workspace))
        plan, estimated, fit = None, None, None
        if parsed.task != "evaluate":
            if with_estimate:
                curated = curate_to_workspace(parsed.data, workspace, format=parsed.format)
            else:
                curated = curate(parsed.data, format=parsed.format)  # in memory: the fingerprint, format and splits
            plan, _, fit = plan_goal(workspace, parsed, curated.summary, use_memory=False,
                                     train_records=curated.splits["train"], convert=with_estimate)
            if with_estimate:
                estimated = estimate(plan, workspace, measure_steps=2).model_dump()
        payload = {"goal": parsed.model_dump(mode="json"), "plan": plan.model_dump(mode="json") if plan else None,
                   "records_fit": fit.sentence("training", plan.seq_len) if fit else None,
                   "test_split_warning": test_size_warning(parsed, curated.summary.splits.get("test", 0)) if plan else None,
                   "estimate": estimated}
        if as_json:
            emit_json(payload)
        console(as_json).print_json(json.dumps(payload))
        if estimated:  # the estimate's memory table for people, after the JSON (stderr with --json)
            from cli.engine import memory_table_view

            console(as_json).print(memory_table_view(estimated))


COMMANDS = {"run": run_command, "plan": plan_command, "report": report_command}
