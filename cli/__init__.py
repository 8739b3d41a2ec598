"""The `modelcrew` command line, one module per command group:

    common.py   the options every command takes, one-line errors, console and JSON output
    data.py     data inspect | list
    engine.py   train | estimate | eval           (also `python -m training …`, the same functions)
    crew.py     run | plan | report | runs list|compare
    models.py   models … | serve
    memory.py   memory search | show | stats | doctor | rebuild
    loop.py     loop start | status | trigger | stop
    feedback.py feedback stats

Heavy libraries are imported inside the commands that need them, so `--help` answers at once.
`cli` is the top layer: it may import every package below it.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from cli import crew, data, engine, feedback, loop, memory, models


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"modelcrew {version('modelcrew')}")
        raise typer.Exit()


def _root(
    ctx: typer.Context,
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
    chroma_url: Annotated[
        Optional[str], typer.Option("--chroma-url", envvar="MODELCREW_CHROMA_URL", metavar="URL",
                                    help="Keep memory on this Chroma server (`chroma run`), shared by every workspace "
                                         "that uses it, instead of in the workspace.")
    ] = None,
) -> None:
    """modelcrew: plain-language goals in, trained, evaluated and deployed language models out."""
    if chroma_url and chroma_url.strip():
        import os

        from cli.common import reported
        from memory.server import ENV, check_server

        with reported(False):  # a server that is down stops the command here, before it writes anything
            check_server(chroma_url.strip())
        # Every MemoryStore the command makes reads the URL from the environment; restored afterwards so an
        # in-process caller (the test runner) does not keep it.
        previous = os.environ.get(ENV)
        os.environ[ENV] = chroma_url.strip()
        ctx.call_on_close(lambda: os.environ.pop(ENV, None) if previous is None else os.environ.__setitem__(ENV, previous))


def _app(help: str) -> typer.Typer:
    return typer.Typer(name="modelcrew", help=help, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def _add_engine(target: typer.Typer) -> None:
    """The engine's commands, on `modelcrew` and on `python -m training` alike."""
    target.add_typer(data.app, name="data")
    for name, command in engine.COMMANDS.items():
        target.command(name)(command)


app = _app("A crew of agents that curates data, trains, evaluates and deploys small language models.")
app.callback()(_root)
_add_engine(app)
for _name, _command in {**crew.COMMANDS, **models.COMMANDS}.items():
    app.command(_name)(_command)
app.add_typer(crew.runs_app, name="runs")
app.add_typer(models.app, name="models")
app.add_typer(memory.app, name="memory")
app.add_typer(loop.app, name="loop")
app.add_typer(feedback.app, name="feedback")

engine_app = _app("The engine alone (no agents): curate data, train, estimate and evaluate. "
                  "`train` also runs under torchrun and accelerate launch.")
engine_app.callback()(_root)
_add_engine(engine_app)


def main() -> None:
    app()
