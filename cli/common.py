"""What every command shares: the common options, one-line error reporting, the console, JSON output.

Every command takes, after its own arguments, `--workspace DIR` (env MODELCREW_WORKSPACE, default
./.modelcrew), `--json` (machine-readable result on stdout, human text on stderr) and `--debug`
(tracebacks). Errors print one line, `error: ...`, and exit 2 for bad input or 1 for a runtime failure.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from training.errors import InputError, ModelcrewError

Workspace = Annotated[
    Path,
    typer.Option("--workspace", envvar="MODELCREW_WORKSPACE", help="Workspace directory for datasets, runs and models."),
]
Json = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout (human text goes to stderr).")]
Debug = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")]
DEFAULT_WORKSPACE = Path(".modelcrew")


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
        error_line(str(err))
        raise typer.Exit(err.exit_code) from None
    except KeyboardInterrupt:
        error_line("interrupted")
        raise typer.Exit(130) from None
    except Exception as err:  # a bug or an environment failure: still one line unless --debug
        if debug:
            raise
        error_line(f"{type(err).__name__}: {err} (run again with --debug for the traceback)")
        raise typer.Exit(1) from None


def error_line(message: str) -> None:
    print("error: " + " ".join(message.split()), file=sys.stderr)


def check_workspace(workspace: Path) -> Path:
    if workspace.exists() and not workspace.is_dir():
        raise InputError(f"--workspace {workspace}: exists and is not a directory")
    return workspace


def console(as_json: bool):
    from rich.console import Console

    return Console(stderr=as_json, highlight=False)


def emit_json(payload) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


def say(as_json: bool, text: str) -> None:
    """A plain line for people (stderr with --json), never parsed as markup."""
    console(as_json).print(text, markup=False)
