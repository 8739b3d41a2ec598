"""What every modelcrew tool shares: a workspace it is confined to, and failures returned as one line.

An LLM chose the arguments, so they are untrusted: pydantic `args_schema`s bound every number and
pattern-check every name, paths must resolve inside the workspace, and an engine error comes back as
`error: ...` text the agent can read and act on instead of an exception that ends the crew.
"""

from __future__ import annotations

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


class WorkspaceTool(BaseTool):
    model_config = ConfigDict(arbitrary_types_allowed=True)
    workspace: Path = Field(description="the workspace this tool may touch (never chosen by the LLM)")

    def _run(self, **kwargs) -> str:
        try:
            return self.act(**kwargs)
        except ModelcrewError as err:
            return f"error: {err}"

    def act(self, **kwargs) -> str:  # pragma: no cover - each tool defines it
        raise NotImplementedError

    def inside(self, path: str | Path) -> Path:
        """`path` resolved, refused unless it lies inside the workspace."""
        root = Path(self.workspace).resolve()
        resolved = (root / path).resolve() if not Path(path).is_absolute() else Path(path).resolve()
        if resolved != root and root not in resolved.parents:
            raise InputError(f"path {path}: outside the workspace {root}")
        return resolved
