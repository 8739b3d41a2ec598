"""The crew: four agents, four tasks in sequence, each agent acting only through its tools.

curate (data curator) -> plan and train (trainer) -> evaluate, gate and report (evaluator) -> deploy
(deployer). Agents and tasks are described in YAML (config/agents.yaml, config/tasks.yaml beside this
file), as in CrewAI's project template; this class wires them to their tools and their output contracts,
and ends each task's description with the header code reads back (`llm.protocol`). Every tool of the
run holds the run's `RunContext`, so what one step produced reaches the next through code.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from crewai import Agent, Crew, Process, Task
from crewai.project import CrewBase, agent, crew, task
from pydantic import BaseModel

from llm.protocol import step_header, task_header
from steps.context import RunContext
from tools.crew_tools import (CompareWithHistoryTool, CurateDatasetTool, EstimatePlanTool, EvaluateModelTool,
                              SearchMemoryTool, TrainModelTool, WriteReportTool)
from tools.deploy import ModelStatusTool, PromoteModelTool, RegisterModelTool
from training.contracts import Deployment
from training.runs import Trace


# CrewAI warns that callbacks cannot be checkpointed; this crew does not use CrewAI's checkpointing.
warnings.filterwarnings("ignore", message="function callbacks cannot be serialized")


class CurateOutput(BaseModel):
    fingerprint: str
    records_after: int
    contaminated: int
    similar: list[str] = []


class TrainOutput(BaseModel):
    run_id: str
    status: str
    steps: int
    best_val_loss: float | None
    reused_from: str | None = None


class EvaluateOutput(BaseModel):
    run_id: str
    metric: str
    value: float | None
    passed: bool
    reasons: list[str]
    report: str


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

    def _task(self, name: str, output: type[BaseModel]) -> Task:
        config = self.tasks_config[f"{name}_task"]
        return Task(config={**config, "description": config["description"].rstrip() + task_header(name)},
                    output_pydantic=output)

    @task
    def curate_task(self) -> Task:
        return self._task("curate", CurateOutput)

    @task
    def train_task(self) -> Task:
        return self._task("train", TrainOutput)

    @task
    def evaluate_task(self) -> Task:
        return self._task("evaluate", EvaluateOutput)

    @task
    def deploy_task(self) -> Task:
        return self._task("deploy", Deployment)

    @crew
    def crew(self) -> Crew:
        return Crew(agents=self.agents, tasks=self.tasks, process=Process.sequential, verbose=False,
                    task_callback=lambda out: self.trace.write("task", agent=str(out.agent), output=out.raw[:2000]))

    def step(self, name: str) -> Crew:
        """A crew of one task (curate, train, evaluate or deploy) and its agent, for a Flow that runs the
        tasks one at a time. What earlier steps found comes in through the `{context}` input."""
        template = getattr(self, f"{name}_task")()
        task = Task(description=template.description + step_header(), expected_output=template.expected_output,
                    agent=template.agent, output_pydantic=template.output_pydantic)
        return Crew(agents=[task.agent], tasks=[task], process=Process.sequential, verbose=False,
                    task_callback=lambda out: self.trace.write("task", agent=str(out.agent), output=out.raw[:2000]))
