"""CrewAI's switches for running offline, set in one place.

Without them CrewAI phones home for telemetry, tracing and its version (each stalls 5-20 s with no
network), and keeps its databases in the user's home, shared by every workspace.
"""

from __future__ import annotations

import os
from pathlib import Path

SWITCHES = {"CREWAI_DISABLE_TELEMETRY": "true", "CREWAI_TRACING_ENABLED": "false", "CREWAI_DISABLE_VERSION_CHECK": "true"}


def quiet_crewai(workspace: Path | None = None) -> None:
    """Set the switches (a user's own settings win); with a workspace, CrewAI's files go into it."""
    for key, value in SWITCHES.items():
        os.environ.setdefault(key, value)
    if workspace is not None:
        storage = Path(workspace).resolve() / "crewai"
        storage.mkdir(parents=True, exist_ok=True)
        os.environ["CREWAI_STORAGE_DIR"] = str(storage)  # two workspaces never share CrewAI's databases
