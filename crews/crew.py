"""The crew: four agents, four tasks run one at a time, each agent acting only through its tools.

curate (data curator) -> plan and train (trainer) -> evaluate, gate and report (evaluator) -> deploy
(deployer). `modelcrew run` and the retraining loop's rounds run the same tasks through `ModelCrew.run`.
Agents and tasks are described in YAML (config/agents.yaml, config/tasks.yaml beside this file), as in
CrewAI's project template; this class wires them to their tools, ends each task's description with the
header code reads back (`llm.protocol`), and accepts a task only when code sees its result. Every tool
of the run holds the run's `RunContext`, so what one step produced reaches the next through code; the
agents' final answers are kept for the record, never believed.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from crewai import Agent, Crew, Process, Task
from crewai.project import CrewBase, agent, task

from llm.protocol import step_header, task_header
from steps.context import RunContext
from tools.crew_tools import (CompareWithHistoryTool, CurateDatasetTool, EstimatePlanTool, EvaluateModelTool,
                              SearchMemoryTool, TrainModelTool, WriteReportTool)
from tools.deploy import ModelStatusTool, PromoteModelTool, RegisterModelTool
from training.runs import Trace


# CrewAI warns that callbacks cannot be checkpointed; this crew does not use CrewAI's checkpointing.
warnings.filterwarnings("ignore", message="function callbacks cannot be serialized")


@CrewBase
class ModelCrew:
    agents_config = "config/agents.yaml"
    tasks_config = "config/tasks.yaml"

    def __init__(self, context: RunContext, llm, trace: Trace, max_retries: int = 2) -> None:
        self.context, self.llm, self.trace, self.max_retries = context, llm, trace, max_retries
        common = {"workspace": Path(context.workspace), "trace": trace}
        run = {**common, "context": context}
        self.tools = {
            "curate_dataset": CurateDatasetTool(**run), "search_memory": SearchMemoryTool(**common),
            "estimate_plan": EstimatePlanTool(**run), "train_model": TrainModelTool(**run),
            "evaluate_model": EvaluateModelTool(**run), "compare_with_history": CompareWithHistoryTool(**run),
            "write_report": WriteReportTool(**run),
            "register_model": RegisterModelTool(**run), "promote_model": PromoteModelTool(**run),
            "model_status": ModelStatusTool(**run),
        }

    def _agent(self, name: str, tools: list[str]) -> Agent:
        return Agent(config=self.agents_config[name], llm=self.llm, tools=[self.tools[t] for t in tools], verbose=False,
                     allow_delegation=False, max_iter=8, max_retry_limit=self.max_retries,
                     step_callback=lambda step, who=name: self.trace.write("agent", agent=who, step=str(step)[:1000]))

    @agent
    def data_curator(self) -> Agent:
        return self._agent("data_curator", ["curate_dataset", "search_memory"])

    @agent
    def trainer(self) -> Agent:
        return self._agent("trainer", ["search_memory", "estimate_plan", "train_model"])

    @agent
    def evaluator(self) -> Agent:
        return self._agent("evaluator", ["evaluate_model", "compare_with_history", "write_report", "search_memory"])

    @agent
    def deployer(self) -> Agent:
        return self._agent("deployer", ["register_model", "promote_model", "model_status"])

    def _task(self, name: str) -> Task:
        config = self.tasks_config[f"{name}_task"]
        return Task(config={**config, "description": config["description"].rstrip() + task_header(name) + step_header()},
                    guardrail=self._done_when(name), guardrail_max_retries=self.max_retries)

    @task
    def curate_task(self) -> Task:
        return self._task("curate")

    @task
    def train_task(self) -> Task:
        return self._task("train")

    @task
    def evaluate_task(self) -> Task:
        return self._task("evaluate")

    @task
    def deploy_task(self) -> Task:
        return self._task("deploy")

    def run(self, name: str) -> str:
        """Run one task (curate, train, evaluate or deploy) by its agent, as a crew of one; returns its answer.

        The task is told the goal, the run id and what the earlier steps established (`RunContext.facts`, from
        code, never an earlier agent's account). It is done when code sees its result in the RunContext
        (`missing`); until then the agent is told what is missing and tries again (CrewAI's guardrail)."""
        task = getattr(self, f"{name}_task")()
        crew = Crew(agents=[task.agent], tasks=[task], process=Process.sequential, verbose=False,
                    task_callback=lambda out: self.trace.write("task", agent=str(out.agent), output=out.raw[:2000]))
        out = crew.kickoff(inputs={"goal_json": self.context.goal.model_dump_json(), "run_id": self.context.run_id,
                                   "context": json.dumps(self.context.facts())})
        return out.raw

    def missing(self, name: str) -> str | None:
        """What task `name` has not done yet, as code sees it in the RunContext (None: done)."""
        ctx = self.context
        if name == "curate" and ctx.summary is None:
            return f"the data is not curated yet: call curate_dataset with data {ctx.goal.data!r}"
        if name == "train" and ctx.result is None:
            return f"nothing is trained yet: call train_model with fingerprint {ctx.facts().get('fingerprint')!r}"
        if name == "evaluate" and ctx.verdict is None:
            return f"run {ctx.run_id} is not evaluated yet: call evaluate_model with run_id {ctx.run_id!r}"
        if name == "evaluate" and not ctx.reported:
            return f"run {ctx.run_id} has no report yet: call write_report with run_id {ctx.run_id!r}"
        deploys = ctx.goal.deploy == "always" or (ctx.goal.deploy == "if_passed" and ctx.verdict is not None and ctx.verdict.passed)
        if name == "deploy" and deploys and ctx.registered is None:
            return f"the goal deploys this run: call register_model with model_name {ctx.goal.model_name!r}"
        return None

    def _done_when(self, name: str):
        def guardrail(output):  # CrewAI's contract: (True, output) to accept, (False, feedback) to retry
            gap = self.missing(name)
            return (False, gap) if gap else (True, output)
        return guardrail
