"""`modelcrew feedback stats`: what `modelcrew serve --record` recorded and how people rated it, by version."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from cli.common import DEFAULT_WORKSPACE, Debug, Json, Workspace, check_workspace, console, emit_json, reported

app = typer.Typer(help="Feedback on served answers: recorded by `modelcrew serve --record`, rated at POST /v1/feedback.",
                  no_args_is_help=True)


@app.command("stats")
def feedback_stats(
    model: Annotated[Optional[str], typer.Argument(help="A served model's name (default: every model with records).")] = None,
    workspace: Workspace = DEFAULT_WORKSPACE, as_json: Json = False, debug: Debug = False,
) -> None:
    """Per version: answers recorded, rated, good (+1), bad (-1), corrected, and the good rate (good / rated)."""
    with reported(debug):
        from serving.feedback import models, read_feedback, stats

        workspace = check_workspace(workspace)
        names = [model] if model is not None else models(workspace)
        rows = [{"model": name, "version": version, **counts}
                for name in names for version, counts in stats(read_feedback(workspace, name)).items()]
        if as_json:
            emit_json(rows)
        out = console(as_json)
        if not rows:
            out.print(f"no answers recorded in {workspace / 'feedback'} (serve with --record)", markup=False)
            return
        from rich.markup import escape
        from rich.table import Table

        table = Table("model", "version", "answers", "rated", "good", "bad", "corrected", "good rate")
        for r in rows:
            rate = "-" if r["good_rate"] is None else f"{r['good_rate']:.0%}"
            table.add_row(escape(r["model"]), escape(r["version"]), *(str(r[k]) for k in ("completions", "rated", "good", "bad", "corrected")),
                          rate)
        out.print(table)
