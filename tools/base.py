"""What every modelcrew tool shares: a workspace it is confined to, JSON answers, failures as one line.

An LLM chose the arguments, so they are untrusted: pydantic `args_schema`s bound every number and
pattern-check every name, paths must resolve inside the workspace, and an engine error comes back as
`{"error": "..."}` the agent can read and act on instead of an exception that ends the crew. Every
tool answers with one short JSON object (`answer`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from crewai.tools import BaseTool
from pydantic import BaseModel, ConfigDict, Field

from steps.context import RunContext
from training.errors import InputError, ModelcrewError
from training.runs import Trace

MODEL_NAME = r"^[a-z0-9][a-z0-9-]{1,62}$"
VERSION = r"^v[1-9][0-9]{0,5}$"


def answer(payload: dict) -> str:
    return json.dumps(payload, ensure_ascii=False, default=str)


class ToolArgs(BaseModel):
    """Arguments an LLM fills in: an argument the schema does not name is an error, not silently dropped."""

    model_config = ConfigDict(extra="forbid")


class WorkspaceTool(BaseTool):
    model_config = ConfigDict(arbitrary_types_allowed=True)
    workspace: Path = Field(description="the workspace this tool may touch (never chosen by the LLM)")
    trace: Trace | None = Field(None, description="where tool calls are recorded")

    def _run(self, **kwargs) -> str:
        started = time.perf_counter()
        if self.trace is not None:
            self.trace.write("tool_start", tool=self.name, args=kwargs)
        try:
            result = answer(self.act(**kwargs))
        except ModelcrewError as err:
            result = answer({"error": str(err)})
        if self.trace is not None:
            self.trace.write("tool", tool=self.name, args=kwargs, seconds=round(time.perf_counter() - started, 3),
                             result=result[:2000])
        return result

    def act(self, **kwargs) -> dict:  # pragma: no cover - each tool defines it
        raise NotImplementedError


class RunTool(WorkspaceTool):
    """A tool of one crew run: it acts on that run only, through its context."""

    context: RunContext

    def this_run(self, run_id: str) -> str:
        if run_id != self.context.run_id:
            raise InputError(f"run_id: this crew's run is {self.context.run_id}, not {run_id}")
        return run_id

    def need(self, what: str):
        """A contract an earlier step of this run must have produced."""
        value = getattr(self.context, what)
        if value is None:
            first = {"summary": "curate_dataset", "plan": "train_model", "result": "train_model",
                     "evaluation": "evaluate_model"}[what]
            raise InputError(f"run {self.context.run_id}: no {what} yet ({first} first)")
        return value
