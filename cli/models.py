"""`modelcrew models …` and `modelcrew serve`: the registry (versions, aliases, promotion, rollback, export)
and the OpenAI-compatible server."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

import sys

from cli.common import DEFAULT_WORKSPACE, Debug, Json, Workspace, check_workspace, console, emit_json, reported

app = typer.Typer(help="The model registry: versions, aliases, promotion, rollback, export.", no_args_is_help=True)


def _decided(decision, done: str, as_json: bool) -> None:
    """Print the registry's decision with its reasons; exit 1 when it refused."""
    if as_json:
        emit_json(decision.model_dump())
    console(as_json).print((f"{done}: " if decision.allowed else "refused: ") + "; ".join(decision.reasons), markup=False)
    if not decision.allowed:
        raise typer.Exit(1)


@app.command("register")
def models_register(
    name: Annotated[str, typer.Argument(help="Model name, e.g. support-bot.")],
    run_id: Annotated[str, typer.Argument(help="The run whose exported model to register.")],
    which: Annotated[str, typer.Option("--which", help="best or final export of the run.")] = "best",
    workspace: Workspace = DEFAULT_WORKSPACE, as_json: Json = False, debug: Debug = False,
) -> None:
    """Register runs/<run_id>/best (or final) as the next version, with its evaluation and gate verdict."""
    with reported(debug):
        from serving.registry import register_run

        version = register_run(check_workspace(workspace), name, run_id, which)
        if as_json:
            emit_json(version.model_dump(mode="json"))
        console(as_json).print(f"registered {name} {version.version} from run {run_id} ({which})")


@app.command("list")
def models_list(workspace: Workspace = DEFAULT_WORKSPACE, as_json: Json = False, debug: Debug = False) -> None:
    """Registered models with their versions and aliases."""
    with reported(debug):
        from serving.registry import Registry

        reg = Registry(check_workspace(workspace))
        states = [reg.state(n) for n in reg.names()]
        if as_json:
            emit_json([{"name": s.name, "versions": list(s.versions), "aliases": s.aliases} for s in states])
        out = console(as_json)
        if not states:
            out.print(f"no models registered in {workspace}")
        for s in states:
            aliases = ", ".join(f"{a}={v}" for a, v in sorted(s.aliases.items())) or "no aliases"
            out.print(f"{s.name}: {', '.join(s.versions) or 'no versions'} ({aliases})", markup=False)


@app.command("show")
def models_show(name: Annotated[str, typer.Argument(help="Model name.")], workspace: Workspace = DEFAULT_WORKSPACE,
                as_json: Json = False, debug: Debug = False) -> None:
    """Versions (run, dataset, metrics, gate), aliases and the history of alias moves."""
    with reported(debug):
        from serving.registry import Registry

        state = Registry(check_workspace(workspace)).state(name)
        if as_json:
            emit_json(state.model_dump(mode="json"))
        out = console(as_json)
        for v in state.versions.values():
            tags = [a for a, x in state.aliases.items() if x == v.version]
            gate = "no gate" if v.gate is None else ("gate passed" if v.gate.passed else "gate failed")
            metrics = ", ".join(f"{k} {val:.4g}" for k, val in v.metrics.items() if not k.startswith("base_"))
            out.print(f"{v.version} {'[' + ', '.join(tags) + ']' if tags else ''} run {v.run_id}, data {v.dataset}, "
                          f"{gate}; {metrics}", markup=False)
        for m in state.history[-10:]:
            out.print(f"  {m.at} {m.alias}: {m.before} -> {m.after} ({m.reason}){' FORCED' if m.forced else ''}", markup=False)


@app.command("promote")
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

        _decided(Registry(check_workspace(workspace)).promote(name, version, to, force=force), "promoted", as_json)


@app.command("approve")
def models_approve(name: Annotated[str, typer.Argument()], version: Annotated[str, typer.Argument()],
                   workspace: Workspace = DEFAULT_WORKSPACE, as_json: Json = False, debug: Debug = False) -> None:
    """Approve the version waiting at staging: it goes to production (same policy)."""
    with reported(debug):
        from serving.registry import Registry

        _decided(Registry(check_workspace(workspace)).approve(name, version), "approved", as_json)


@app.command("rollback")
def models_rollback(name: Annotated[str, typer.Argument()], workspace: Workspace = DEFAULT_WORKSPACE,
                    as_json: Json = False, debug: Debug = False) -> None:
    """production <- previous."""
    with reported(debug):
        from serving.registry import Registry

        version = Registry(check_workspace(workspace)).rollback(name, "rollback by a person")
        if as_json:
            emit_json({"name": name, "production": version})
        console(as_json).print(f"{name}@production is {version} again")


@app.command("export")
def models_export(ref: Annotated[str, typer.Argument(help="name, name@production, name@v3 ...")],
                  target: Annotated[Path, typer.Argument(help="A new (or empty) directory.")],
                  format: Annotated[str, typer.Option("--format", help="hf (vLLM, transformers) or gguf (llama.cpp, Ollama).")] = "hf",
                  dtype: Annotated[str, typer.Option("--dtype", help="hf weights: bfloat16, float16 (GPUs without bf16) or float32.")] = "bfloat16",
                  quant: Annotated[str, typer.Option("--quant", help="gguf weights: f16, q8_0 or f32.")] = "q8_0",
                  workspace: Workspace = DEFAULT_WORKSPACE, as_json: Json = False, debug: Debug = False) -> None:
    """Export a version for other engines (adapters merged).

    --format hf: safetensors in --dtype, tokenizer, chat template, card; `vllm serve DIR` and from_pretrained load it.

    --format gguf: DIR/<name>-<version>-<quant>.gguf (tokenizer and chat template inside) and DIR/Modelfile.
    Run it with `llama-server -m DIR/<file>.gguf` or `ollama create NAME -f DIR/Modelfile`. Llama models only.
    """
    with reported(debug):
        from serving.registry import Registry

        out = Registry(check_workspace(workspace)).export(ref, target, format=format, dtype=dtype, quant=quant)
        files = sorted(p.name for p in out.iterdir())
        if as_json:
            emit_json({"ref": ref, "path": str(out), "format": format, "files": files})
        console(as_json).print(f"exported {ref} to {out} ({format}: {', '.join(files)})", markup=False)


@app.command("delete")
def models_delete(name: Annotated[str, typer.Argument()], version: Annotated[str, typer.Argument()],
                  workspace: Workspace = DEFAULT_WORKSPACE, as_json: Json = False, debug: Debug = False) -> None:
    """Delete a version (refused while an alias points to it)."""
    with reported(debug):
        from serving.registry import Registry

        Registry(check_workspace(workspace)).delete(name, version)
        if as_json:
            emit_json({"deleted": f"{name}@{version}"})
        console(as_json).print(f"deleted {name} {version}")


def serve_command(
    ref: Annotated[str, typer.Argument(help="name@production (follows promotions), name@v3, or a model directory.")],
    host: Annotated[str, typer.Option("--host", help="Interface to bind; 127.0.0.1 keeps it on this machine.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 8000,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="MODELCREW_API_KEY", help="Require 'Authorization: Bearer KEY'.")] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, max=256, help="Most requests decoded together.")] = 32,
    max_body_mb: Annotated[int, typer.Option("--max-body-mb", min=1, max=1024,
                                             help="Largest request body in MiB (413 beyond); raise it for batches of long token-id prompts.")] = 1,
    record: Annotated[bool, typer.Option("--record", help="Record every answer, PII scrubbed, with the version that answered, "
                                         "under WORKSPACE/feedback/<model>/ and take ratings at POST /v1/feedback.")] = False,
    workspace: Workspace = DEFAULT_WORKSPACE,
    debug: Debug = False,
) -> None:
    """Serve a model over an OpenAI-compatible API (/v1/models, /v1/completions, /v1/chat/completions, and with
    --record /v1/feedback; see `modelcrew feedback stats`)."""
    with reported(debug):
        from serving.server import serve

        print(f"serving {ref} on http://{host}:{port}/v1" + (f", recording under {workspace}/feedback" if record else ""),
              file=sys.stderr)
        serve(ref, check_workspace(workspace), host=host, port=port, api_key=api_key, max_batch=max_batch,
              max_body_bytes=max_body_mb << 20, record=record)


COMMANDS = {"serve": serve_command}
