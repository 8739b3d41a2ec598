"""The deployer's tools: register a run's model, promote it (policy enforced by code), roll back, look.

There is no `force` here: the deploy policy (gate passed, not worse than production on the same
evaluation set) can be overridden by a person at the CLI, never by an agent.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from serving.registry import Registry, register_run
from tools.base import MODEL_NAME, RUN_ID, VERSION, ToolArgs, WorkspaceTool


class RegisterArgs(ToolArgs):
    model_name: str = Field(pattern=MODEL_NAME, description="registry name, e.g. support-bot")
    run_id: str = Field(pattern=RUN_ID, description="the evaluated run whose best export to register")


class RegisterModelTool(WorkspaceTool):
    name: str = "register_model"
    description: str = ("Register the best model of an evaluated run as the next version of a named model in the "
                        "registry (with its evaluation and gate verdict). Returns the new version, e.g. v3.")
    args_schema: type[BaseModel] = RegisterArgs

    def act(self, model_name: str, run_id: str) -> str:
        self.inside(f"runs/{run_id}")
        registry = Registry(self.workspace)
        if model_name in registry.names():  # a retried or resumed deploy step registers a run once
            done = next((v for v in registry.state(model_name).versions.values() if v.run_id == run_id), None)
            if done is not None:
                return f"registered {model_name} {done.version} from run {run_id} (already registered)"
        v = register_run(self.workspace, model_name, run_id, "best")
        gate = "no gate verdict" if v.gate is None else ("gate passed" if v.gate.passed else "gate failed")
        return f"registered {model_name} {v.version} from run {run_id} ({gate})"


class PromoteArgs(ToolArgs):
    model_name: str = Field(pattern=MODEL_NAME)
    version: str = Field(pattern=VERSION, description="the version to promote, e.g. v3")
    to: Literal["production", "staging"] = Field("production", description="staging when a person must approve")


class PromoteModelTool(WorkspaceTool):
    name: str = "promote_model"
    description: str = ("Move production (or staging) onto a registered version. The registry refuses a version "
                        "whose gate failed or that is worse than the current production; the answer says why.")
    args_schema: type[BaseModel] = PromoteArgs

    def act(self, model_name: str, version: str, to: str = "production") -> str:
        decision = Registry(self.workspace).promote(model_name, version, to)
        verdict = f"{model_name}@{to} is now {version}" if decision.allowed else f"refused to promote {model_name} {version}"
        return f"{verdict}: {'; '.join(decision.reasons)}"


class RollbackArgs(ToolArgs):
    model_name: str = Field(pattern=MODEL_NAME)
    reason: str = Field(min_length=3, max_length=300, description="why, in one sentence (kept in the history)")


class RollbackModelTool(WorkspaceTool):
    name: str = "rollback_model"
    description: str = "Put the previous production version back into production, recording why."
    args_schema: type[BaseModel] = RollbackArgs

    def act(self, model_name: str, reason: str) -> str:
        version = Registry(self.workspace).rollback(model_name, reason)
        return f"{model_name}@production is {version} again ({reason})"


class StatusArgs(ToolArgs):
    model_name: str = Field(pattern=MODEL_NAME)


class ModelStatusTool(WorkspaceTool):
    name: str = "model_status"
    description: str = "Versions, aliases and the last alias moves of a registered model."
    args_schema: type[BaseModel] = StatusArgs

    def act(self, model_name: str) -> str:
        state = Registry(self.workspace).state(model_name)
        lines = [f"{model_name}: aliases " + (", ".join(f"{a}={v}" for a, v in sorted(state.aliases.items())) or "none")]
        for v in state.versions.values():
            gate = "no gate" if v.gate is None else ("passed" if v.gate.passed else "failed")
            lines.append(f"{v.version}: run {v.run_id}, gate {gate}, " +
                         ", ".join(f"{k} {x:.4g}" for k, x in v.metrics.items() if not k.startswith("base_")))
        lines += [f"{m.at} {m.alias} {m.before}->{m.after}: {m.reason}" for m in state.history[-5:]]
        return "\n".join(lines)
