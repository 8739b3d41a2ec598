"""The `modelcrew` command line.

Every command takes, after its own arguments, `--workspace DIR` (env MODELCREW_WORKSPACE, default
./.modelcrew), `--json` (machine-readable result on stdout, human text on stderr) and `--debug`
(tracebacks). Errors print one line, `error: ...`, and exit 2 for bad input or 1 for a runtime failure.
Heavy libraries are imported inside the commands that need them, so `--help` answers at once.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from training.errors import InputError, ModelcrewError

app = typer.Typer(
    name="modelcrew",
    help="A crew of agents that curates data, trains, evaluates and deploys small language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Curate datasets and list the curated ones.", no_args_is_help=True)
app.add_typer(data_app, name="data")
memory_app = typer.Typer(help="Search and maintain the agents' memory (a Chroma index of the workspace).", no_args_is_help=True)
app.add_typer(memory_app, name="memory")
runs_app = typer.Typer(help="Evaluated runs: list them, compare two.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")
models_app = typer.Typer(help="The model registry: versions, aliases, promotion, rollback, export.", no_args_is_help=True)
app.add_typer(models_app, name="models")
loop_app = typer.Typer(help="The retraining loop: watch data and production, retrain, gate, deploy, roll back.",
                       no_args_is_help=True)
app.add_typer(loop_app, name="loop")

Workspace = Annotated[
    Path,
    typer.Option("--workspace", envvar="MODELCREW_WORKSPACE", help="Workspace directory for datasets, runs and models."),
]
Json = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout (human text goes to stderr).")]
Debug = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")]
DEFAULT_WORKSPACE = Path(".modelcrew")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"modelcrew {version('modelcrew')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
) -> None:
    """modelcrew: plain-language goals in, trained, evaluated and deployed language models out."""


@contextmanager
def reported(debug: bool):
    """Turn failures into one `error:` line and an exit code; re-raise with --debug."""
    try:
        yield
    except (typer.Exit, typer.Abort):
        raise
    except ModelcrewError as err:
        if debug:
            raise
        _error_line(str(err))
        raise typer.Exit(err.exit_code) from None
    except KeyboardInterrupt:
        _error_line("interrupted")
        raise typer.Exit(130) from None
    except Exception as err:  # a bug or an environment failure: still one line unless --debug
        if debug:
            raise
        _error_line(f"{type(err).__name__}: {err} (run again with --debug for the traceback)")
        raise typer.Exit(1) from None


def _error_line(message: str) -> None:
    print("error: " + " ".join(message.split()), file=sys.stderr)


def _check_workspace(workspace: Path) -> Path:
    if workspace.exists() and not workspace.is_dir():
        raise InputError(f"--workspace {workspace}: exists and is not a directory")
    return workspace


def _console(as_json: bool):
    from rich.console import Console

    return Console(stderr=as_json, highlight=False)


def _emit_json(payload) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


def _parse_columns(spec: str | None) -> dict[str, str]:
    if not spec:
        return {}
    mapping = {}
    for item in spec.split(","):
        field, sep, column = item.partition("=")
        if not sep or not field.strip() or not column.strip():
            raise InputError(f"--columns: expected field=column pairs like question=Q,answer=A, got {item!r}")
        mapping[field.strip()] = column.strip()
    return mapping


def _setting_help(name: str) -> str:
    from training.contracts import CurationSettings

    return CurationSettings.model_fields[name].description or ""


@data_app.command("inspect")
def data_inspect(
    path: Annotated[str, typer.Argument(help="A file, a directory, a saved Hugging Face dataset, or 'bbc-news'.")],
    format: Annotated[Optional[str], typer.Option("--format", help="Force the format: text, pairs, chat or classification.")] = None,
    split: Annotated[str, typer.Option("--split", help="train,val,test fractions.")] = "0.8,0.1,0.1",
    columns: Annotated[Optional[str], typer.Option("--columns", help="Map schema fields to file columns: question=Q,answer=A.")] = None,
    encoding: Annotated[str, typer.Option("--encoding", help="Text encoding of the input files.")] = "utf-8",
    max_chars: Annotated[int, typer.Option("--max-chars", min=1, help=_setting_help("max_chars"))] = 20_000,
    near_dup_threshold: Annotated[float, typer.Option("--near-dup-threshold", min=0.05, max=1.0, help=_setting_help("near_dup_threshold"))] = 0.8,
    chunk_chars: Annotated[int, typer.Option("--chunk-chars", min=100, help=_setting_help("chunk_chars"))] = 2_000,
    scrub_pii: Annotated[bool, typer.Option("--scrub-pii/--keep-pii", help="Replace e-mails, phones, cards and IPs with placeholders.")] = True,
    tokenizer: Annotated[str, typer.Option("--tokenizer", help=_setting_help("tokenizer"))] = "bytes",
    memory: Annotated[bool, typer.Option("--memory/--no-memory", help="Record the dataset in memory; report similar datasets and overlap with earlier evaluation sets.")] = True,
    workspace: Workspace = DEFAULT_WORKSPACE,
    as_json: Json = False,
    debug: Debug = False,
) -> None:
    """Ingest, clean, dedup, scrub, split, fingerprint and summarise a dataset into the workspace."""
    with reported(debug):
        from training.contracts import CurationSettings
        from training.data import curate_to_workspace
        from training.data.split import parse_split

        settings = CurationSettings(split=parse_split(split), max_chars=max_chars, near_dup_threshold=near_dup_threshold,
                                    chunk_chars=chunk_chars, scrub_pii=scrub_pii, tokenizer=tokenizer)
        result = curate_to_workspace(path, _check_workspace(workspace), settings=settings, format=format, columns=_parse_columns(columns),
                                     encoding=encoding, show_progress=True)
        console = _console(as_json)
        recalled = _remember_dataset(workspace, result.summary, console) if memory else None
        if as_json:
            _emit_json({**result.summary.model_dump(mode="json", by_alias=True), "path": str(result.path),
                        **({"memory": recalled} if recalled is not None else {})})
        from crews.render import removed_table, summary_table

        console.print(summary_table(result.summary))
        if result.removed:
            console.print(removed_table(result.removed, result.summary.source))
        console.print(f"stored in {result.path}")
        if recalled is not None:
            from crews.render import recall_lines

            for line in recall_lines(recalled):
                console.print(line)


def _remember_dataset(workspace: Path, summary, console) -> dict:
    """Index the dataset; what memory knows about it: similar earlier datasets, overlap with their eval sets."""
    from memory.store import MemoryStore
    from training.batches import read_split
    from training.data.store import datasets_dir

    with console.status("recording the dataset in memory ..."):
        store = MemoryStore(workspace)
        store.add_dataset(summary)
        similar = store.similar_datasets(summary, k=3)
        train = read_split(datasets_dir(workspace) / summary.fingerprint, "train")
        overlaps = store.contamination(train, exclude_dataset=summary.fingerprint)
    return {"similar": [s.model_dump() for s in similar], "contaminated": [o.model_dump() for o in overlaps],
            "train_records": len(train)}


@data_app.command("list")
def data_list(workspace: Workspace = DEFAULT_WORKSPACE, as_json: Json = False, debug: Debug = False) -> None:
    """List the curated datasets in the workspace, newest first."""
    with reported(debug):
        from training.data.store import list_datasets

        found = list_datasets(_check_workspace(workspace))
        if as_json:
            _emit_json([s.model_dump(mode="json", by_alias=True) for s in found])
        from crews.render import datasets_table

        _console(as_json).print(datasets_table(found) if found else f"no datasets in {workspace}")


@app.command("train")
def train_command(
    plan: Annotated[str, typer.Argument(help="A plan file (.yaml/.json) or a recipe name (training/recipes/).")],
    dataset: Annotated[Optional[str], typer.Option("--dataset", help="Dataset fingerprint (overrides the plan's).")] = None,
    run_id: Annotated[Optional[str], typer.Option("--run-id", help="Name of the run (default: task-date-random).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run from its latest checkpoint.")] = False,
    steps: Annotated[Optional[int], typer.Option("--steps", min=1, help="Step budget (overrides the plan's).")] = None,
    minutes: Annotated[Optional[float], typer.Option("--minutes", min=0.1, help="Time budget in minutes (overrides the plan's).")] = None,
    workspace: Workspace = DEFAULT_WORKSPACE,
    as_json: Json = False,
    debug: Debug = False,
) -> None:
    """Train (pretrain or fine-tune, full or LoRA) from a validated plan; writes runs/<run_id>/."""
    with reported(debug):
        from training.__main__ import new_run_id
        from training.loop import train
        from training.plans import load_plan

        loaded = load_plan(plan, dataset=dataset)
        if steps or minutes:
            budget = loaded.budget.model_copy(update={k: v for k, v in {"steps": steps, "minutes": minutes}.items() if v})
            loaded = loaded.model_copy(update={"budget": budget})
        if resume and not run_id:
            raise InputError("--resume: name the run to continue with --run-id")
        result = train(loaded, _check_workspace(workspace), run_id or new_run_id(loaded.task), resume=resume)
        if as_json:
            _emit_json(result.model_dump())
        from crews.render import run_table

        _console(as_json).print(run_table(result))


@app.command("estimate")
def estimate_command(
    plan: Annotated[str, typer.Argument(help="A plan file (.yaml/.json) or a recipe name.")],
    dataset: Annotated[Optional[str], typer.Option("--dataset", help="Dataset fingerprint (overrides the plan's).")] = None,
    workspace: Workspace = DEFAULT_WORKSPACE,
    as_json: Json = False,
    debug: Debug = False,
) -> None:
    """Parameters, memory and time of a plan (from a few measured steps); refuses a plan that cannot fit."""
    with reported(debug):
        from training.estimate import estimate
        from training.plans import load_plan

        est = estimate(load_plan(plan, dataset=dataset), _check_workspace(workspace))
        if as_json:
            _emit_json(est.model_dump())
        mem = ", ".join(f"{k} {v:.2f}" for k, v in est.memory_gb.items())
        _console(as_json).print(
            f"{est.trainable_params:,} of {est.total_params:,} parameters trainable; memory GB: {mem} "
            f"(device {est.device}, {est.device_memory_gb} GB); {est.seconds_per_step:.2f} s/step"
            + (f", about {est.minutes:.1f} min for {est.steps} steps" if est.minutes and est.steps else ""))


@app.command("eval")
def eval_command(
    run_id: Annotated[str, typer.Argument(help="The run to evaluate (runs/<run_id>/).")],
    max_examples: Annotated[int, typer.Option("--max-examples", min=1, max=10_000, help="Test examples to answer.")] = 24,
    workspace: Workspace = DEFAULT_WORKSPACE,
    as_json: Json = False,
    debug: Debug = False,
) -> None:
    """Evaluate a run's best model beside its base model; writes runs/<run_id>/evaluation.json."""
    with reported(debug):
        from training.evaluate import evaluate_run

        ev = evaluate_run(_check_workspace(workspace), run_id, max_examples=max_examples)
        from memory.store import MemoryStore, load_run_artefacts

        MemoryStore(workspace).add_evaluation(*load_run_artefacts(workspace / "runs" / run_id))
        if as_json:
            _emit_json(ev.model_dump())
        from crews.render import evaluation_table

        _console(as_json).print(evaluation_table(ev))


@app.command("run")
def run_command(
    goal: Annotated[str, typer.Argument(help="The goal in plain words, quoted.")],
    llm: Annotated[Optional[str], typer.Option("--llm", envvar="MODELCREW_LLM", help="offline (default, a rule-based policy), or a CrewAI model string such as openai/gpt-4o-mini.")] = None,
    llm_base_url: Annotated[Optional[str], typer.Option("--llm-base-url", envvar="MODELCREW_LLM_BASE_URL", help="An OpenAI-compatible server for the agents' LLM.")] = None,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask before starting (never asked without a terminal).")] = False,
    workspace: Workspace = DEFAULT_WORKSPACE,
    as_json: Json = False,
    debug: Debug = False,
) -> None:
    """Run the crew on a goal: curate, train, evaluate and gate, report, deploy as the goal says."""
    with reported(debug):
        from crews.goals import parse_goal
        from crews.run import run_goal

        console = _console(as_json)
        parsed = parse_goal(goal, _check_workspace(workspace))
        console.print(f"goal: {parsed.task} {parsed.base_model or parsed.size or ''} on {parsed.data}, metric "
                      f"{parsed.metric}, deploy {parsed.deploy}", markup=False)
        if sys.stdin.isatty() and not yes and not typer.confirm("start the crew?", default=True):
            raise typer.Exit(1)

        def show(event: dict) -> None:
            if event["kind"] == "tool_start":
                console.print(f"[dim]{event['t']:7.1f}s[/dim] [bold]{event['tool']}[/bold]({json.dumps(event['args'])}) ...",
                              highlight=False)
            elif event["kind"] == "tool":
                console.print(f"[dim]{event['t']:7.1f}s[/dim] [bold]{event['tool']}[/bold]({json.dumps(event['args'])}) "
                              f"{event['seconds']:.1f}s -> {event['result'][:160]}", highlight=False)
            elif event["kind"] == "task":
                console.print(f"[dim]{event['t']:7.1f}s[/dim] [green]{event['agent']}[/green] done: {event['output'][:200]}",
                              highlight=False)

        result = run_goal(goal, workspace, llm, llm_base_url, echo=show)
        if as_json:
            _emit_json(result)
        gate = result["gate"]
        console.print(f"run {result['run_id']}: {result['metric']} {result['base_value']} -> {result['value']}; gate "
                      f"{'PASSED' if gate['passed'] else 'FAILED'}; deployment "
                      f"{result['deployment'] or 'none'}; report {result['report']}", markup=False)


@app.command("report")
def report_command(
    run_id: Annotated[str, typer.Argument(help="The run to report on (runs/<run_id>/).")],
    open_it: Annotated[bool, typer.Option("--open", help="Open the HTML report in a browser.")] = False,
    workspace: Workspace = DEFAULT_WORKSPACE, as_json: Json = False, debug: Debug = False,
) -> None:
    """Re-render runs/<run_id>/report.md and report.html from the run's artefacts."""
    with reported(debug):
        from tools.report import render

        md, html = render(_check_workspace(workspace), run_id)
        if as_json:
            _emit_json({"markdown": str(md), "html": str(html)})
        _console(as_json).print(f"wrote {md} and {html}")
        if open_it:
            import webbrowser

            webbrowser.open(html.resolve().as_uri())


@runs_app.command("list")
def runs_list(workspace: Workspace = DEFAULT_WORKSPACE, as_json: Json = False, debug: Debug = False) -> None:
    """Evaluated runs: run, goal, metric, verdict, deployed, time."""
    with reported(debug):
        from rich.table import Table

        from tools.report import fmt, list_runs

        rows = list_runs(_check_workspace(workspace))
        if as_json:
            _emit_json(rows)
        table = Table(title=f"runs in {workspace}")
        for col in ("run", "goal", "metric", "verdict", "deployed", "time"):
            table.add_column(col)
        for r in rows:
            table.add_row(r["run_id"], (r["goal"] or "")[:60], f"{r['metric']} {fmt(r['value'])}", r["verdict"], r["deployed"], r["time"])
        _console(as_json).print(table if rows else f"no evaluated runs in {workspace}")


@runs_app.command("compare")
def runs_compare(run_a: Annotated[str, typer.Argument()], run_b: Annotated[str, typer.Argument()],
                 workspace: Workspace = DEFAULT_WORKSPACE, as_json: Json = False, debug: Debug = False) -> None:
    """A side-by-side report of two runs (reports/compare-A-vs-B.md and .html)."""
    with reported(debug):
        from tools.report import render_compare

        md, html = render_compare(_check_workspace(workspace), run_a, run_b)
        if as_json:
            _emit_json({"markdown": str(md), "html": str(html)})
        _console(as_json).print(f"wrote {md} and {html}")


@app.command("plan")
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
        from training.planning import plan_for
        from training.data.curate import curate

        parsed = parse_goal(goal, _check_workspace(workspace))
        plan, estimated = None, None
        if parsed.task != "evaluate":
            if with_estimate:
                from training.data import curate_to_workspace
                from training.estimate import estimate

                summary = curate_to_workspace(parsed.data, workspace, format=parsed.format).summary
                plan, _ = plan_for(parsed, summary)
                estimated = estimate(plan, workspace, measure_steps=2).model_dump()
            else:
                summary = curate(parsed.data, format=parsed.format).summary  # in memory: the fingerprint and format
                plan, _ = plan_for(parsed, summary)
        payload = {"goal": parsed.model_dump(mode="json"), "plan": plan.model_dump(mode="json") if plan else None,
                   "estimate": estimated}
        if as_json:
            _emit_json(payload)
        console = _console(as_json)
        console.print_json(json.dumps(payload))


Kind = Annotated[str, typer.Option("--kind", help="datasets, evaluations, lessons or eval_records.")]
Embedding = Annotated[Optional[str], typer.Option("--embedding", envvar="MODELCREW_EMBEDDING",
                                                  help="all-minilm-l6-v2 (default), a sentence-transformers directory, or a Chroma embedding function name.")]


@memory_app.command("search")
def memory_search(
    text: Annotated[str, typer.Argument(help="What to look for, in plain words.")],
    kind: Kind = "datasets",
    k: Annotated[int, typer.Option("--k", help="How many hits (1-100).")] = 5,
    embedding: Embedding = None,
    workspace: Workspace = DEFAULT_WORKSPACE,
    as_json: Json = False,
    debug: Debug = False,
) -> None:
    """Search memory by meaning; each hit shows its id (fingerprint or run_id), distance and a summary."""
    with reported(debug):
        from memory.store import MemoryStore

        hits = MemoryStore(_check_workspace(workspace), embedding).search(text, kind, k=k)
        if as_json:
            _emit_json([h.model_dump() for h in hits])
        from crews.render import hits_table

        _console(as_json).print(hits_table(hits) if hits else f"nothing in memory's {kind} yet")


@memory_app.command("show")
def memory_show(
    entry_id: Annotated[str, typer.Argument(help="A dataset fingerprint, a run_id, a lesson or eval record id.")],
    embedding: Embedding = None,
    workspace: Workspace = DEFAULT_WORKSPACE,
    as_json: Json = False,
    debug: Debug = False,
) -> None:
    """Show one memory entry: its collection, document and metadata."""
    with reported(debug):
        from memory.store import MemoryStore

        entry = MemoryStore(_check_workspace(workspace), embedding).show(entry_id)
        if entry is None:
            raise InputError(f"{entry_id}: not in memory (try `modelcrew memory search`)")
        if as_json:
            _emit_json(entry)
        console = _console(as_json)
        console.print(f"[bold]{entry['kind']}[/bold] {entry['id']}")
        console.print(entry["document"], markup=False)
        for key, value in sorted(entry["metadata"].items()):
            if key != "plan_json":
                console.print(f"  {key}: {value}", markup=False)


@memory_app.command("stats")
def memory_stats(embedding: Embedding = None, workspace: Workspace = DEFAULT_WORKSPACE, as_json: Json = False,
                 debug: Debug = False) -> None:
    """Entries per collection, disk size and the embedding function of the index."""
    with reported(debug):
        from memory.store import MemoryStore

        stats = MemoryStore(_check_workspace(workspace), embedding).stats()
        if as_json:
            _emit_json(stats)
        counts = ", ".join(f"{k} {v}" for k, v in stats["counts"].items())
        _console(as_json).print(f"{stats['path']}: {counts}; {stats['disk_bytes'] / 1e6:.1f} MB; embedding {stats['embedding']}")


@memory_app.command("doctor")
def memory_doctor(embedding: Embedding = None, workspace: Workspace = DEFAULT_WORKSPACE, as_json: Json = False,
                  debug: Debug = False) -> None:
    """Check that the index opens, matches the workspace's files and its embedding; say what to run. Exit 1 if not."""
    with reported(debug):
        from memory.store import MemoryStore

        report = MemoryStore(_check_workspace(workspace), embedding).doctor()
        if as_json:
            _emit_json(report.model_dump())
        console = _console(as_json)
        for check in report.checks:
            console.print(f"{'ok  ' if check.ok else 'FAIL'} {check.name}: {check.detail}", markup=False)
        console.print(report.advice, markup=False)
        if not report.ok:
            raise typer.Exit(1)


@memory_app.command("rebuild")
def memory_rebuild(embedding: Embedding = None, workspace: Workspace = DEFAULT_WORKSPACE, as_json: Json = False,
                   debug: Debug = False) -> None:
    """Delete the index and re-create it from the workspace's datasets, evaluations and lessons."""
    with reported(debug):
        from memory.store import MemoryStore

        console = _console(as_json)
        with console.status("rebuilding memory ...") as status:
            stats = MemoryStore(_check_workspace(workspace), embedding).rebuild(progress=lambda what: status.update(f"indexed {what}"))
        if as_json:
            _emit_json(stats)
        console.print("rebuilt: " + ", ".join(f"{k} {v}" for k, v in stats["counts"].items()))


@models_app.command("register")
def models_register(
    name: Annotated[str, typer.Argument(help="Model name, e.g. support-bot.")],
    run_id: Annotated[str, typer.Argument(help="The run whose exported model to register.")],
    which: Annotated[str, typer.Option("--which", help="best or final export of the run.")] = "best",
    workspace: Workspace = DEFAULT_WORKSPACE, as_json: Json = False, debug: Debug = False,
) -> None:
    """Register runs/<run_id>/best (or final) as the next version, with its evaluation and gate verdict."""
    with reported(debug):
        from serving.registry import register_run

        version = register_run(_check_workspace(workspace), name, run_id, which)
        if as_json:
            _emit_json(version.model_dump(mode="json"))
        _console(as_json).print(f"registered {name} {version.version} from run {run_id} ({which})")


@models_app.command("list")
def models_list(workspace: Workspace = DEFAULT_WORKSPACE, as_json: Json = False, debug: Debug = False) -> None:
    """Registered models with their versions and aliases."""
    with reported(debug):
        from serving.registry import Registry

        reg = Registry(_check_workspace(workspace))
        states = [reg.state(n) for n in reg.names()]
        if as_json:
            _emit_json([{"name": s.name, "versions": list(s.versions), "aliases": s.aliases} for s in states])
        console = _console(as_json)
        if not states:
            console.print(f"no models registered in {workspace}")
        for s in states:
            aliases = ", ".join(f"{a}={v}" for a, v in sorted(s.aliases.items())) or "no aliases"
            console.print(f"{s.name}: {', '.join(s.versions) or 'no versions'} ({aliases})", markup=False)


@models_app.command("show")
def models_show(name: Annotated[str, typer.Argument(help="Model name.")], workspace: Workspace = DEFAULT_WORKSPACE,
                as_json: Json = False, debug: Debug = False) -> None:
    """Versions (run, dataset, metrics, gate), aliases and the history of alias moves."""
    with reported(debug):
        from serving.registry import Registry

        state = Registry(_check_workspace(workspace)).state(name)
        if as_json:
            _emit_json(state.model_dump(mode="json"))
        console = _console(as_json)
        for v in state.versions.values():
            tags = [a for a, x in state.aliases.items() if x == v.version]
            gate = "no gate" if v.gate is None else ("gate passed" if v.gate.passed else "gate failed")
            metrics = ", ".join(f"{k} {val:.4g}" for k, val in v.metrics.items() if not k.startswith("base_"))
            console.print(f"{v.version} {'[' + ', '.join(tags) + ']' if tags else ''} run {v.run_id}, data {v.dataset}, "
                          f"{gate}; {metrics}", markup=False)
        for m in state.history[-10:]:
            console.print(f"  {m.at} {m.alias}: {m.before} -> {m.after} ({m.reason}){' FORCED' if m.forced else ''}", markup=False)


@models_app.command("promote")
def models_promote(
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[str, typer.Argument(help="Version, e.g. v3.")],
    to: Annotated[str, typer.Option("--to", help="production or staging.")] = "production",
    force: Annotated[bool, typer.Option("--force", help="Promote even if the deploy policy refuses (people only; recorded).")] = False,
    workspace: Workspace = DEFAULT_WORKSPACE, as_json: Json = False, debug: Debug = False,
) -> None:
    """Move an alias onto a version; production only if its gate passed and it is not worse than production."""
    with reported(debug):
        from serving.registry import Registry

        decision = Registry(_check_workspace(workspace)).promote(name, version, to, force=force)
        if as_json:
            _emit_json(decision.model_dump())
        _console(as_json).print(("promoted: " if decision.allowed else "refused: ") + "; ".join(decision.reasons), markup=False)
        if not decision.allowed:
            raise typer.Exit(1)


@models_app.command("approve")
def models_approve(name: Annotated[str, typer.Argument()], version: Annotated[str, typer.Argument()],
                   workspace: Workspace = DEFAULT_WORKSPACE, as_json: Json = False, debug: Debug = False) -> None:
    """Approve the version waiting at staging: it goes to production (same policy)."""
    with reported(debug):
        from serving.registry import Registry

        decision = Registry(_check_workspace(workspace)).approve(name, version)
        if as_json:
            _emit_json(decision.model_dump())
        _console(as_json).print(("approved: " if decision.allowed else "refused: ") + "; ".join(decision.reasons), markup=False)
        if not decision.allowed:
            raise typer.Exit(1)


@models_app.command("rollback")
def models_rollback(name: Annotated[str, typer.Argument()], workspace: Workspace = DEFAULT_WORKSPACE,
                    as_json: Json = False, debug: Debug = False) -> None:
    """production <- previous."""
    with reported(debug):
        from serving.registry import Registry

        version = Registry(_check_workspace(workspace)).rollback(name, "rollback by a person")
        if as_json:
            _emit_json({"name": name, "production": version})
        _console(as_json).print(f"{name}@production is {version} again")


@models_app.command("export")
def models_export(ref: Annotated[str, typer.Argument(help="name, name@production, name@v3 ...")],
                  target: Annotated[Path, typer.Argument(help="A new directory.")],
                  workspace: Workspace = DEFAULT_WORKSPACE, as_json: Json = False, debug: Debug = False) -> None:
    """Write a standard Hugging Face model directory (adapters merged) that from_pretrained loads."""
    with reported(debug):
        from serving.registry import Registry

        out = Registry(_check_workspace(workspace)).export(ref, target)
        if as_json:
            _emit_json({"ref": ref, "path": str(out)})
        _console(as_json).print(f"exported {ref} to {out}")


@models_app.command("delete")
def models_delete(name: Annotated[str, typer.Argument()], version: Annotated[str, typer.Argument()],
                  workspace: Workspace = DEFAULT_WORKSPACE, as_json: Json = False, debug: Debug = False) -> None:
    """Delete a version (refused while an alias points to it)."""
    with reported(debug):
        from serving.registry import Registry

        Registry(_check_workspace(workspace)).delete(name, version)
        if as_json:
            _emit_json({"deleted": f"{name}@{version}"})
        _console(as_json).print(f"deleted {name} {version}")


@app.command("serve")
def serve_command(
    ref: Annotated[str, typer.Argument(help="name@production (follows promotions), name@v3, or a model directory.")],
    host: Annotated[str, typer.Option("--host", help="Interface to bind; 127.0.0.1 keeps it on this machine.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 8000,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="MODELCREW_API_KEY", help="Require 'Authorization: Bearer KEY'.")] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, max=256, help="Most requests decoded together.")] = 32,
    workspace: Workspace = DEFAULT_WORKSPACE,
    debug: Debug = False,
) -> None:
    """Serve a model over an OpenAI-compatible API (/v1/models, /v1/completions, /v1/chat/completions)."""
    with reported(debug):
        from serving.server import serve

        print(f"serving {ref} on http://{host}:{port}/v1", file=sys.stderr)
        serve(ref, _check_workspace(workspace), host=host, port=port, api_key=api_key, max_batch=max_batch)


def main() -> None:
    app()


# ---- loop -----------------------------------------------------------------------------------------

DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, option: str) -> float:
    """'90', '90s', '15m', '1h', '2d' -> seconds."""
    import re

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text or "")
    if not match or float(match.group(1)) <= 0:
        raise InputError(f"{option}: expected a duration like 90s, 15m, 1h or 2d, got {text!r}")
    return float(match.group(1)) * DURATION_UNITS[match.group(2) or "s"]


@loop_app.command("start")
def loop_start(
    goal: Annotated[Optional[str], typer.Argument(help="The goal in plain words (omit to continue this workspace's loop).")] = None,
    watch: Annotated[Optional[Path], typer.Option("--watch", help="File or directory of records to watch (default: the goal's data).")] = None,
    every: Annotated[str, typer.Option("--every", help="Time between checks: 90s, 15m, 1h, 2d.")] = "1h",
    schedule: Annotated[Optional[str], typer.Option("--schedule", help="Also retrain at least this often without new data.")] = None,
    max_rounds: Annotated[Optional[int], typer.Option("--max-rounds", min=1, help="Stop after this many rounds.")] = None,
    once: Annotated[bool, typer.Option("--once", help="One check (and at most one round), then exit.")] = False,
    replay: Annotated[float, typer.Option("--replay", min=0.0, max=0.9, help="Share of a later round's training records drawn from earlier data.")] = 0.5,
    drift: Annotated[float, typer.Option("--drift", min=0.01, max=2.0, help="Embedding-centroid distance between new and training records that counts as drift.")] = 0.3,
    no_memory: Annotated[bool, typer.Option("--no-memory", help="The trainer ignores earlier runs (a baseline).")] = False,
    llm: Annotated[Optional[str], typer.Option("--llm", envvar="MODELCREW_LLM", help="offline (default, a rule-based policy), or a CrewAI model string.")] = None,
    llm_base_url: Annotated[Optional[str], typer.Option("--llm-base-url", envvar="MODELCREW_LLM_BASE_URL", help="An OpenAI-compatible server for the agents' LLM.")] = None,
    workspace: Workspace = DEFAULT_WORKSPACE,
    as_json: Json = False,
    debug: Debug = False,
) -> None:
    """Start (or continue) the retraining loop on this workspace; one loop per workspace."""
    with reported(debug):
        from crews.loop_state import LoopLock, LoopSettings, load_state

        _check_workspace(workspace)
        lock = LoopLock(workspace)
        if lock.running():  # before the slow imports: a second loop is refused at once
            raise lock.busy()
        settings = None
        if goal is not None:
            if watch is None:
                from crews.goals import parse_goal

                try:
                    watch = Path(parse_goal(goal, workspace).data)
                except InputError as err:
                    if str(err).startswith("data:"):
                        raise InputError("--watch: the goal names no data; pass --watch PATH (a file or directory)") from None
                    raise
            settings = LoopSettings(goal_text=goal, watch=str(watch), every_s=parse_duration(every, "--every"),
                                    schedule_s=parse_duration(schedule, "--schedule") if schedule else None,
                                    max_rounds=max_rounds, replay=replay, drift_distance=drift, use_memory=not no_memory,
                                    llm=llm, base_url=llm_base_url)
        elif load_state(workspace) is not None and (max_rounds or no_memory or every != "1h"):
            saved = load_state(workspace).settings
            settings = saved.model_copy(update={"every_s": parse_duration(every, "--every"), "max_rounds": max_rounds,
                                                "use_memory": saved.use_memory and not no_memory})
        from crews.loop import run_loop

        state = run_loop(workspace, settings, once=once)
        if as_json:
            _emit_json(state.model_dump(mode="json"))
        _console(as_json).print(f"loop stopped after {len(state.rounds)} rounds; report {workspace / 'loop' / 'report.html'}",
                                markup=False)


@loop_app.command("status")
def loop_status(workspace: Workspace = DEFAULT_WORKSPACE, as_json: Json = False, debug: Debug = False) -> None:
    """Whether a loop runs here, its goal, rounds and production."""
    with reported(debug):
        from crews.loop_report import timeline
        from crews.loop_state import LoopLock, load_state

        state = load_state(workspace)
        if state is None:
            raise InputError(f"no loop has run on {workspace}; `modelcrew loop start GOAL --watch PATH` starts one")
        running = LoopLock(workspace).running()
        if as_json:
            _emit_json({"running": running, **state.model_dump(mode="json")})
            return
        print(f"loop on {workspace}: {'running (' + running + ')' if running else 'not running'}")
        print(f"goal: {state.settings.goal_text}\nwatching: {state.settings.watch} every {state.settings.every_s:g} s; "
              f"{state.checks} checks, last {state.last_check_at or 'never'}")
        for row in timeline(state):
            print(f"round {row['number']} {row['started']} [{row['triggers']}] {row['data']}; "
                  f"{row['metric']} {row['candidate']} vs production {row['production']}: {row['verdict']}; {row['action']}")
        print(f"report: {workspace / 'loop' / 'report.html'}")


@loop_app.command("trigger")
def loop_trigger(reason: Annotated[str, typer.Option("--reason", help="Why (kept in the round's record).")] = "manual trigger",
                 workspace: Workspace = DEFAULT_WORKSPACE, debug: Debug = False) -> None:
    """Ask for a round now (the running loop starts it at its next poll, or the next `loop start` does)."""
    with reported(debug):
        from crews.loop_state import LoopLock, request

        request(workspace, "trigger", reason)
        running = LoopLock(workspace).running()
        print(f"round requested; {'the running loop (' + running + ') starts it within a second' if running else 'no loop is running: the next `modelcrew loop start` starts it'}",
              file=sys.stderr)


@loop_app.command("stop")
def loop_stop(workspace: Workspace = DEFAULT_WORKSPACE, debug: Debug = False) -> None:
    """Ask the running loop to stop after its current step (its round continues at the next start)."""
    with reported(debug):
        from crews.loop_state import LoopLock, request

        running = LoopLock(workspace).running()
        if not running:
            raise InputError(f"no loop is running on {workspace}")
        request(workspace, "stop")
        print(f"stop requested; the loop ({running}) stops when its current round or wait ends", file=sys.stderr)


if __name__ == "__main__":
    main()
