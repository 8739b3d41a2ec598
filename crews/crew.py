"""The crew: four agents, four tasks in sequence, each agent acting only through its tools.

curate (data curator) -> plan and train (trainer) -> evaluate, gate and report (evaluator) -> deploy
(deployer). Agents and tasks are described in YAML (agents/config/agents.yaml, crews/config/tasks.yaml),
as in CrewAI's project template; this class wires them to their tools and their output contracts.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from crewai import Agent, Crew, Process, Task
from crewai.project import CrewBase, agent, crew, task
from pydantic import BaseModel

from tools.base import Trace
from tools.crew_tools import (CompareWithHistoryTool, CurateDatasetTool, EstimatePlanTool, EvaluateModelTool,
                              SearchMemoryTool, TrainModelTool, WriteReportTool)
from tools.deploy import ModelStatusTool, PromoteModelTool, RegisterModelTool, RollbackModelTool
from training.contracts import Deployment, Goal


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
    agents_config = "../agents/config/agents.yaml"
    tasks_config = "config/tasks.yaml"

    def __init__(self, workspace: Path, goal: Goal, goal_text: str, run_id: str, llm, trace: Trace,
                 max_retries: int = 2, use_memory: bool = True, warm_start: str | None = None,
                 related: list[str] | None = None) -> None:
        """`use_memory`, `warm_start` and `related` are set by the retraining loop (see crews/loop.py)."""
        self.workspace, self.goal, self.goal_text, self.run_id = Path(workspace), goal, goal_text, run_id
        self.llm, self.trace, self.max_retries = llm, trace, max_retries
        common = {"workspace": self.workspace, "trace": trace}
        with_goal = {**common, "goal": goal, "run_id": run_id}
        planning = {**with_goal, "use_memory": use_memory, "warm_start": warm_start}
        self.tools = {
            "curate_dataset": CurateDatasetTool(**with_goal, related=related or []),
            "search_memory": SearchMemoryTool(**common),
            "estimate_plan": EstimatePlanTool(**planning), "train_model": TrainModelTool(**planning),
            "evaluate_model": EvaluateModelTool(**with_goal), "compare_with_history": CompareWithHistoryTool(**with_goal),
            "write_report": WriteReportTool(**with_goal, goal_text=goal_text),
            "register_model": RegisterModelTool(**common), "promote_model": PromoteModelTool(**common),
            "rollback_model": RollbackModelTool(**common), "model_status": ModelStatusTool(**common),
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
        return self._agent("deployer", ["register_model", "promote_model", "rollback_model", "model_status"])

    @task
    def curate_task(self) -> Task:
        return Task(config=self.tasks_config["curate_task"], output_pydantic=CurateOutput)

    @task
    def train_task(self) -> Task:
        return Task(config=self.tasks_config["train_task"], output_pydantic=TrainOutput)

    @task
    def evaluate_task(self) -> Task:
        return Task(config=self.tasks_config["evaluate_task"], output_pydantic=EvaluateOutput)

    @task
    def deploy_task(self) -> Task:
        return Task(config=self.tasks_config["deploy_task"], output_pydantic=Deployment)

    @crew
    def crew(self) -> Crew:
        return Crew(agents=self.agents, tasks=self.tasks, process=Process.sequential, verbose=False,
                    task_callback=lambda out: self.trace.write("task", agent=str(out.agent), output=out.raw[:2000]))

    def step(self, name: str) -> Crew:
        """A crew of one task (curate, train, evaluate or deploy) and its agent, for a Flow that runs the
        tasks one at a time. What earlier steps found comes in through the `{context}` input."""
        template = getattr(self, f"{name}_task")()
        task = Task(description=self.tasks_config[f"{name}_task"]["description"].rstrip() + "\nEarlier steps (JSON): {context}",
                    expected_output=template.expected_output, agent=template.agent, output_pydantic=template.output_pydantic)
        return Crew(agents=[task.agent], tasks=[task], process=Process.sequential, verbose=False,
                    task_callback=lambda out: self.trace.write("task", agent=str(out.agent), output=out.raw[:2000]))
