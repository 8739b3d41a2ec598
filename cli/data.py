"""`modelcrew data inspect | list`: curate datasets into the workspace and list them."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from cli.common import DEFAULT_WORKSPACE, Debug, Json, Workspace, check_workspace, console, emit_json, reported
from training.errors import InputError

app = typer.Typer(help="Curate datasets and list the curated ones.", no_args_is_help=True)


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


@app.command("inspect")
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
        from reports.terminal import recall_lines, removed_table, summary_table
        from steps.curate import curate_dataset
        from training.contracts import CurationSettings
        from training.data.split import parse_split

        settings = CurationSettings(split=parse_split(split), max_chars=max_chars, near_dup_threshold=near_dup_threshold,
                                    chunk_chars=chunk_chars, scrub_pii=scrub_pii, tokenizer=tokenizer)
        out = console(as_json)
        result, recalled = curate_dataset(check_workspace(workspace), path, settings=settings, format=format,
                                          columns=_parse_columns(columns), encoding=encoding, remember=memory,
                                          show_progress=True, status=out.status)
        recalled = recalled.to_json() if recalled is not None else None
        if as_json:
            emit_json({**result.summary.model_dump(mode="json", by_alias=True), "path": str(result.path),
                       **({"memory": recalled} if recalled is not None else {})})
        out.print(summary_table(result.summary))
        if result.removed:
            out.print(removed_table(result.removed, result.summary.source))
        out.print(f"stored in {result.path}")
        for line in recall_lines(recalled) if recalled is not None else []:
            out.print(line)


@app.command("list")
def data_list(workspace: Workspace = DEFAULT_WORKSPACE, as_json: Json = False, debug: Debug = False) -> None:
    """List the curated datasets in the workspace, newest first."""
    with reported(debug):
        from reports.terminal import datasets_table
        from training.data.store import list_datasets

        found = list_datasets(check_workspace(workspace))
        if as_json:
            emit_json([s.model_dump(mode="json", by_alias=True) for s in found])
        console(as_json).print(datasets_table(found) if found else f"no datasets in {workspace}")
