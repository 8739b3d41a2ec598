"""`modelcrew train | estimate | eval`: the engine's commands, also `python -m training …` (same functions).

`train` works the same under `torchrun --nproc_per_node N -m training train …` and
`accelerate launch -m training train …`: every process runs it, rank 0 alone prints.
"""

from __future__ import annotations

import os
from typing import Annotated, Optional

import typer

from cli.common import DEFAULT_WORKSPACE, Debug, Json, Workspace, check_workspace, console, emit_json, reported
from training.errors import InputError

PlanArg = Annotated[str, typer.Argument(help="A plan file (.yaml/.json) or a recipe name (training/recipes/).")]
Dataset = Annotated[Optional[str], typer.Option("--dataset", help="Dataset fingerprint (overrides the plan's).")]


def train_command(
    plan: PlanArg,
    dataset: Dataset = None,
    run_id: Annotated[Optional[str], typer.Option("--run-id", help="Name of the run (default: task-date-random).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run from its latest checkpoint.")] = False,
    steps: Annotated[Optional[int], typer.Option("--steps", min=1, help="Step budget (overrides the plan's).")] = None,
    minutes: Annotated[Optional[float], typer.Option("--minutes", min=0.1, help="Time budget in minutes (overrides the plan's).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
    workspace: Workspace = DEFAULT_WORKSPACE,
    as_json: Json = False,
    debug: Debug = False,
) -> None:
    """Train (pretrain or fine-tune, full or LoRA) from a validated plan; writes runs/<run_id>/."""
    with reported(debug):
        from reports.terminal import run_table
        from training.loop import train
        from training.plan_files import load_plan
        from training.runs import new_run_id

        loaded = load_plan(plan, dataset=dataset)
        if steps or minutes:
            budget = loaded.budget.model_copy(update={k: v for k, v in {"steps": steps, "minutes": minutes}.items() if v})
            loaded = loaded.model_copy(update={"budget": budget})
        if resume and not run_id:
            raise InputError("--resume: name the run to continue with --run-id")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not run_id:
            raise InputError("--run-id: a multi-process run needs an explicit run id (every process must agree on it)")
        result = train(loaded, check_workspace(workspace), run_id or new_run_id(loaded.task), resume=resume,
                       show_progress=not quiet)
        if int(os.environ.get("RANK", "0")) != 0:
            return
        if as_json:
            emit_json(result.model_dump())
        console(as_json).print(run_table(result))


def estimate_command(
    plan: PlanArg,
    dataset: Dataset = None,
    workspace: Workspace = DEFAULT_WORKSPACE,
    as_json: Json = False,
    debug: Debug = False,
) -> None:
    """Parameters, memory and time of a plan (from a few measured steps); refuses a plan that cannot fit."""
    with reported(debug):
        from training.estimate import estimate
        from training.plan_files import load_plan

        est = estimate(load_plan(plan, dataset=dataset), check_workspace(workspace))
        if as_json:
            emit_json(est.model_dump())
        mem = ", ".join(f"{k} {v:.2f}" for k, v in est.memory_gb.items())
        console(as_json).print(
            f"{est.trainable_params:,} of {est.total_params:,} parameters trainable; memory GB: {mem} "
            f"(device {est.device}, {est.device_memory_gb} GB); {est.seconds_per_step:.2f} s/step"
            + (f", about {est.minutes:.1f} min for {est.steps} steps" if est.minutes and est.steps else ""))
        console(as_json).print(memory_table_view(est.model_dump()))


def memory_table_view(est: dict):
    """The estimate's memory table for people: GB per device by method and layout, one column per device
    count; green fits (CPU: every process within the shared RAM), red does not, dim: no such devices."""
    from rich.table import Table

    rows = est["memory_table"]
    counts = sorted({r["devices"] for r in rows})
    room = " + ".join(f"{g:g}" for g in est["devices_memory_gb"])
    table = Table(title=f"memory per device, GB (device {est['device']}: {room} GB)")
    table.add_column("method")
    table.add_column("layout")
    for n in counts:
        table.add_column(str(n), justify="right")
    for method in dict.fromkeys(r["method"] for r in rows):
        for layout in ("ddp", "fsdp"):
            cells = []
            for n in counts:
                row = next((r for r in rows if r["method"] == method and r["devices"] == n
                            and r["layout"] == (layout if n > 1 else "single")), None)
                style = "dim" if row is None or (row["note"] and not row["fits"]) else "green" if row["fits"] else "red"
                cells.append("-" if row is None else f"[{style}]{row['total']:.2f}[/{style}]")
            table.add_row(method, layout, *cells)
    return table


def eval_command(
    run_id: Annotated[str, typer.Argument(help="The run to evaluate (runs/<run_id>/), or whose records an endpoint is scored on.")],
    max_examples: Annotated[Optional[int], typer.Option("--max-examples", min=1, max=100_000, help="At most this many test records for the task metrics (default: the whole test split).")] = None,
    served: Annotated[Optional[str], typer.Option("--served", help="Score the model behind this OpenAI-compatible endpoint (e.g. http://127.0.0.1:8000) on the run's records, through HTTP, instead of the run's own model.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="With --served: the served model's name.")] = None,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="MODELCREW_API_KEY", help="With --served: the endpoint's key.")] = None,
    harness: Annotated[bool, typer.Option("--harness", help="Write an lm-evaluation-harness task from the run's test split (runs/<run_id>/harness/) and run it with lm-eval against the run's model, or the --served one.")] = False,
    harness_tasks: Annotated[Optional[str], typer.Option("--harness-tasks", help="With --harness: standard lm-eval tasks to run too, comma-separated (e.g. hellaswag,arc_easy); their data must be in the local cache.")] = None,
    workspace: Workspace = DEFAULT_WORKSPACE,
    as_json: Json = False,
    debug: Debug = False,
) -> None:
    """Evaluate a run's best model beside its base model (every metric with its interval); writes
    runs/<run_id>/evaluation.json and indexes it in memory. With --served, score a deployed endpoint on the
    same records instead (nothing is written)."""
    with reported(debug):
        from reports.terminal import evaluation_table
        from steps.evaluate import evaluate_and_gate

        workspace = check_workspace(workspace)
        if harness_tasks and not harness:
            raise InputError("--harness-tasks: only with --harness")
        if served and not model:
            raise InputError("--model: name the served model to score (see GET /v1/models)")
        if harness:
            result = run_harness_for(workspace, run_id, served, model, harness_tasks, max_examples)
            if as_json:
                emit_json(result)
            for task, metrics in result["results"].items():
                shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float))
                console(as_json).print(f"{task}: {shown} ({metrics.get('samples')} samples)")
            for metric, pair in result["versus_evaluation"].items():
                console(as_json).print(f"{metric}: lm-eval {pair['harness']:.4g}, modelcrew eval {pair['modelcrew']:.4g}")
            return
        if served:
            from serving.remote import evaluate_served

            result = evaluate_served(workspace, run_id, served, model, api_key, max_examples)
            if as_json:
                emit_json(result)
            for metric, value in result["metrics"].items():
                i = result["intervals"][metric]
                console(as_json).print(f"{metric} {value:.4g} ({i['low']:.4g} to {i['high']:.4g}, {i['n']} records)")
            return
        if model:
            raise InputError("--model: only with --served")
        ev, _ = evaluate_and_gate(workspace, run_id, goal=None, max_examples=max_examples)
        if as_json:
            emit_json(ev.model_dump())
        console(as_json).print(evaluation_table(ev))


HARNESS_METRIC = {"accuracy": "acc_norm", "accuracy_raw": "acc", "exact_match": "exact_match", "f1": "f1"}


def run_harness_for(workspace, run_id: str, served: str | None, model: str | None, tasks: str | None,
                    max_examples: int | None) -> dict:
    """The run's harness task written and run; its numbers beside the run's own evaluation, when it has one."""
    from serving.harness import run_harness, write_task
    from training.runs import Run

    run = Run(workspace, run_id).require()
    task_dir = write_task(workspace, run_id, run.harness_dir, max_examples)
    standard = [t.strip() for t in (tasks or "").split(",") if t.strip()]
    results = run_harness(task_dir, served_url=served, model_name=model, standard_tasks=standard)
    ours = results.get(task_dir.name, {})
    evaluation = run.evaluation()
    versus = {}
    if evaluation is not None and not served:
        versus = {ours_key: {"harness": ours[key], "modelcrew": evaluation.metrics[ours_key]}
                  for ours_key, key in HARNESS_METRIC.items() if key in ours and ours_key in evaluation.metrics}
    out = {"run_id": run_id, "task_dir": str(task_dir), "served": served, "results": results, "versus_evaluation": versus}
    run.write_harness_results(out)
    return out


COMMANDS = {"train": train_command, "estimate": estimate_command, "eval": eval_command}
