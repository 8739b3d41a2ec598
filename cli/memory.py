"""`modelcrew memory …`: search and maintain the agents' memory (a Chroma index of the workspace, or the
Chroma server given by `modelcrew --chroma-url URL` / MODELCREW_CHROMA_URL, shared by the workspaces using it)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from cli.common import DEFAULT_WORKSPACE, Debug, Json, Workspace, check_workspace, console, emit_json, reported
from training.errors import InputError

app = typer.Typer(help="Search and maintain the agents' memory (a Chroma index of the workspace).", no_args_is_help=True)


def _store(workspace, embedding):
    from memory.store import MemoryStore

    return MemoryStore(check_workspace(workspace), embedding)


Kind = Annotated[str, typer.Option("--kind", help="datasets, evaluations, lessons or eval_records.")]
Embedding = Annotated[Optional[str], typer.Option("--embedding", envvar="MODELCREW_EMBEDDING",
                                                  help="all-minilm-l6-v2 (default), a sentence-transformers directory, or a Chroma embedding function name.")]


@app.command("search")
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
        hits = _store(workspace, embedding).search(text, kind, k=k)
        if as_json:
            emit_json([h.model_dump() for h in hits])
        from reports.terminal import hits_table

        console(as_json).print(hits_table(hits) if hits else f"nothing in memory's {kind} yet")


@app.command("show")
def memory_show(
    entry_id: Annotated[str, typer.Argument(help="A dataset fingerprint, a run_id, a lesson or eval record id.")],
    embedding: Embedding = None, workspace: Workspace = DEFAULT_WORKSPACE, as_json: Json = False, debug: Debug = False,
) -> None:
    """Show one memory entry: its collection, document and metadata."""
    with reported(debug):
        entry = _store(workspace, embedding).show(entry_id)
        if entry is None:
            raise InputError(f"{entry_id}: not in memory (try `modelcrew memory search`)")
        if as_json:
            emit_json(entry)
        out = console(as_json)
        out.print(f"[bold]{entry['kind']}[/bold] {entry['id']}")
        out.print(entry["document"], markup=False)
        for key, value in sorted(entry["metadata"].items()):
            if key != "plan_json":
                out.print(f"  {key}: {value}", markup=False)


@app.command("stats")
def memory_stats(embedding: Embedding = None, workspace: Workspace = DEFAULT_WORKSPACE, as_json: Json = False,
                 debug: Debug = False) -> None:
    """Entries per collection, disk size and the embedding function of the index."""
    with reported(debug):
        stats = _store(workspace, embedding).stats()
        if as_json:
            emit_json(stats)
        counts = ", ".join(f"{k} {v}" for k, v in stats["counts"].items())
        size = "" if "://" in stats["path"] else f"; {stats['disk_bytes'] / 1e6:.1f} MB"  # a server's disk is not ours to measure
        console(as_json).print(f"{stats['path']}: {counts}{size}; embedding {stats['embedding']}")


@app.command("doctor")
def memory_doctor(embedding: Embedding = None, workspace: Workspace = DEFAULT_WORKSPACE, as_json: Json = False,
                  debug: Debug = False) -> None:
    """Check that the index opens, matches the workspace's files and its embedding; say what to run. Exit 1 if not."""
    with reported(debug):
        report = _store(workspace, embedding).doctor()
        if as_json:
            emit_json(report.model_dump())
        out = console(as_json)
        for check in report.checks:
            out.print(f"{'ok  ' if check.ok else 'FAIL'} {check.name}: {check.detail}", markup=False)
        out.print(report.advice, markup=False)
        if not report.ok:
            raise typer.Exit(1)


@app.command("rebuild")
def memory_rebuild(embedding: Embedding = None, workspace: Workspace = DEFAULT_WORKSPACE, as_json: Json = False,
                   debug: Debug = False) -> None:
    """Delete the index and re-create it from the workspace's datasets, evaluations and lessons."""
    with reported(debug):
        out = console(as_json)
        with out.status("rebuilding memory ...") as status:
            stats = _store(workspace, embedding).rebuild(progress=lambda what: status.update(f"indexed {what}"))
        if as_json:
            emit_json(stats)
        out.print("rebuilt: " + ", ".join(f"{k} {v}" for k, v in stats["counts"].items()))
