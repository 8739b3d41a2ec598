"""The deployer's tools: register this run's model, promote it, look at the model. Policy is code.

What the goal allows is checked here, whatever the agent asks (`steps.deploy`): nothing when the goal
says never deploy; only under the goal's model name; only this run and only the version it registered;
production only when the registry's policy allows it (gate passed, not worse than production) and the
goal does not require a person's approval. There is no `force` and no rollback: a person forces at the
CLI, and rollbacks are the retraining loop's decision, made by code. Each tool answers in JSON.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from serving.registry import Registry
from tools.base import MODEL_NAME, VERSION, RunTool, ToolArgs
from training.runs import RUN_ID


class RegisterArgs(ToolArgs):
    model_name: str = Field(pattern=MODEL_NAME, description="registry name, e.g. support-bot")
    run_id: str = Field(pattern=RUN_ID, description="the evaluated run whose best export to register")


class RegisterModelTool(RunTool):
    name: str = "register_model"
    description: str = ("Register the best model of this evaluated run as the next version of the goal's model in the "
                        "registry (with its evaluation and gate verdict). Returns the new version, e.g. v3.")
    args_schema: type[BaseModel] = RegisterArgs

    def act(self, model_name: str, run_id: str) -> dict:
        from steps.deploy import check_register, register_once

        ctx = self.context
        self.this_run(run_id)
        check_register(ctx.goal, ctx.verdict, model_name)
        version, now = register_once(self.workspace, model_name, ctx.trained_run_id)  # the attempt the gate judged
        ctx.registered = version.version
        return {"model_name": model_name, "version": version.version, "run_id": run_id, "registered_now": now,
                "gate": "none" if version.gate is None else ("passed" if version.gate.passed else "failed")}


class PromoteArgs(ToolArgs):
    model_name: str = Field(pattern=MODEL_NAME)
    version: str = Field(pattern=VERSION, description="the version to promote, e.g. v3")
    to: Literal["production", "staging"] = Field("production", description="staging when a person must approve")


class PromoteModelTool(RunTool):
    name: str = "promote_model"
    description: str = ("Move production (or staging) onto the version this run registered. The registry refuses a "
                        "version whose gate failed or that is worse than the current production; the answer says why.")
    args_schema: type[BaseModel] = PromoteArgs

    def act(self, model_name: str, version: str, to: str = "production") -> dict:
        from steps.deploy import check_promote

        check_promote(self.context.goal, self.context.registered, model_name, version, to)
        decision = Registry(self.workspace).promote(model_name, version, to)
        return {"model_name": model_name, "version": version, "alias": to, "allowed": decision.allowed,
                "reasons": decision.reasons}


class StatusArgs(ToolArgs):
    model_name: str = Field(pattern=MODEL_NAME)


class ModelStatusTool(RunTool):
    name: str = "model_status"
    description: str = "Versions, aliases and the last alias moves of the goal's model."
    args_schema: type[BaseModel] = StatusArgs

    def act(self, model_name: str) -> dict:
        from steps.deploy import check_model_name

        check_model_name(self.context.goal, model_name)
        state = Registry(self.workspace).state(model_name)
        return {"model_name": model_name, "aliases": state.aliases,
                "versions": [{"version": v.version, "run_id": v.run_id,
                              "gate": "none" if v.gate is None else ("passed" if v.gate.passed else "failed"),
                              "metrics": {k: x for k, x in v.metrics.items() if not k.startswith("base_")}}
                             for v in state.versions.values()],
                "history": [m.model_dump() for m in state.history[-5:]]}
