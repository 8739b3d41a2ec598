"""The deployer's tools: register a run's model, promote it (policy enforced by code), roll back, look.

Each answers in JSON: the version registered, the registry's decision with its reasons, the state.

There is no `force` here: the deploy policy (gate passed, not worse than production on the same
evaluation set) can be overridden by a person at the CLI, never by an agent.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from serving.registry import Registry
from tools.base import MODEL_NAME, VERSION, ToolArgs, WorkspaceTool
from training.runs import RUN_ID


class RegisterArgs(ToolArgs):
    model_name: str = Field(pattern=MODEL_NAME, description="registry name, e.g. support-bot")
    run_id: str = Field(pattern=RUN_ID, description="the evaluated run whose best export to register")


class RegisterModelTool(WorkspaceTool):
    name: str = "register_model"
    description: str = ("Register the best model of an evaluated run as the next version of a named model in the "
                        "registry (with its evaluation and gate verdict). Returns the new version, e.g. v3.")
    args_schema: type[BaseModel] = RegisterArgs

    def act(self, model_name: str, run_id: str) -> dict:
        from steps.deploy import register_once

        version, now = register_once(self.workspace, model_name, run_id)
        return {"model_name": model_name, "version": version.version, "run_id": run_id, "registered_now": now,
                "gate": "none" if version.gate is None else ("passed" if version.gate.passed else "failed")}


class PromoteArgs(ToolArgs):
    model_name: str = Field(pattern=MODEL_NAME)
    version: str = Field(pattern=VERSION, description="the version to promote, e.g. v3")
    to: Literal["production", "staging"] = Field("production", description="staging when a person must approve")


class PromoteModelTool(WorkspaceTool):
    name: str = "promote_model"
    description: str = ("Move production (or staging) onto a registered version. The registry refuses a version "
                        "whose gate failed or that is worse than the current production; the answer says why.")
    args_schema: type[BaseModel] = PromoteArgs

    def act(self, model_name: str, version: str, to: str = "production") -> dict:
        decision = Registry(self.workspace).promote(model_name, version, to)
        return {"model_name": model_name, "version": version, "alias": to, "allowed": decision.allowed,
                "reasons": decision.reasons}


class RollbackArgs(ToolArgs):
    model_name: str = Field(pattern=MODEL_NAME)
    reason: str = Field(min_length=3, max_length=300, description="why, in one sentence (kept in the history)")


class RollbackModelTool(WorkspaceTool):
    name: str = "rollback_model"
    description: str = "Put the previous production version back into production, recording why."
    args_schema: type[BaseModel] = RollbackArgs

    def act(self, model_name: str, reason: str) -> dict:
        version = Registry(self.workspace).rollback(model_name, reason)
        return {"model_name": model_name, "production": version, "reason": reason}


class StatusArgs(ToolArgs):
    model_name: str = Field(pattern=MODEL_NAME)


class ModelStatusTool(WorkspaceTool):
    name: str = "model_status"
    description: str = "Versions, aliases and the last alias moves of a registered model."
    args_schema: type[BaseModel] = StatusArgs

    def act(self, model_name: str) -> dict:
        state = Registry(self.workspace).state(model_name)
        return {"model_name": model_name, "aliases": state.aliases,
                "versions": [{"version": v.version, "run_id": v.run_id,
                              "gate": "none" if v.gate is None else ("passed" if v.gate.passed else "failed"),
                              "metrics": {k: x for k, x in v.metrics.items() if not k.startswith("base_")}}
                             for v in state.versions.values()],
                "history": [m.model_dump() for m in state.history[-5:]]}
