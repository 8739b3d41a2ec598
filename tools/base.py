"""What every modelcrew tool shares: a workspace it is confined to, and failures returned as one line.

An LLM chose the arguments, so they are untrusted: pydantic `args_schema`s bound every number and
pattern-check every name, paths must resolve inside the workspace, and an engine error comes back as
`error: ...` text the agent can read and act on instead of an exception that ends the crew.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from crewai.tools import BaseTool
from pydantic import BaseModel, ConfigDict, Field

from training.errors import InputError, ModelcrewError

RUN_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
MODEL_NAME = r"^[a-z0-9][a-z0-9-]{1,62}$"
VERSION = r"^v[1-9][0-9]{0,5}$"


class ToolArgs(BaseModel):
    """Arguments an LLM fills in: an argument the schema does not name is an error, not silently dropped."""

    model_config = ConfigDict(extra="forbid")


class Trace:
    """`trace.jsonl`: every agent step and tool call with its timing, appended and flushed as it happens."""

    def __init__(self, path: Path | None = None, echo=None) -> None:
        self.path, self.echo, self.started = path, echo, time.perf_counter()
        self.lock = threading.Lock()
        self.events: list[dict] = []
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, kind: str, **fields) -> None:
        event = {"t": round(time.perf_counter() - self.started, 3), "kind": kind, **fields}
        with self.lock:
            self.events.append(event)
            if self.path is not None:
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(event, ensure_ascii=False, default=str) + "\n")
        if self.echo is not None:
            self.echo(event)


class WorkspaceTool(BaseTool):
    model_config = ConfigDict(arbitrary_types_allowed=True)
    workspace: Path = Field(description="the workspace this tool may touch (never chosen by the LLM)")
    trace: Trace | None = Field(None, description="where tool calls are recorded")

    def _run(self, **kwargs) -> str:
        started = time.perf_counter()
        if self.trace is not None:
            self.trace.write("tool_start", tool=self.name, args=kwargs)
        try:
            result = self.act(**kwargs)
        except ModelcrewError as err:
            result = f"error: {err}"
        if self.trace is not None:
            self.trace.write("tool", tool=self.name, args=kwargs, seconds=round(time.perf_counter() - started, 3),
                             result=result[:2000])
        return result

    def act(self, **kwargs) -> str:  # pragma: no cover - each tool defines it
        raise NotImplementedError

    def inside(self, path: str | Path) -> Path:
        """`path` resolved, refused unless it lies inside the workspace."""
        root = Path(self.workspace).resolve()
        resolved = (root / path).resolve() if not Path(path).is_absolute() else Path(path).resolve()
        if resolved != root and root not in resolved.parents:
            raise InputError(f"path {path}: outside the workspace {root}")
        return resolved
