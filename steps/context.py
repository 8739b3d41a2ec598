"""`RunContext`: one crew run as code knows it.

Created by code before the agents start, filled in by the steps as they finish (the dataset curated,
the plan, the training result, the evaluation and verdict, the deployment), and given to every tool of
the run. The tools pass these contracts on in memory: nothing is read back from disk to recover what
this process just computed. Only a run continued after an interruption is rebuilt from its files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from training.contracts import DatasetSummary, Deployment, Evaluation, GateVerdict, Goal, RunResult, TrainPlan
from training.data.store import load_summary
from training.runs import Run


@dataclass
class RunContext:
    workspace: Path
    goal: Goal
    goal_text: str
    run_id: str
    author: str = "offline"  # who drives the agents (the --llm): text they write is stored under this name
    eval_examples: int | None = None  # test records the task metrics score (None: all); set by code, never by an agent
    use_memory: bool = True  # False: plan without memory's earlier runs (the memory benchmark's baseline)
    warm_start: str | None = None  # the retraining loop starts from production's weights
    earlier: list[tuple[float, bool]] = field(default_factory=list)  # the loop's earlier rounds: (lr, passed), oldest first
    related: list[str] = field(default_factory=list)  # earlier versions of this data (their eval records are its own)
    summary: DatasetSummary | None = None
    plan: TrainPlan | None = None
    reused_from: str | None = None
    result: RunResult | None = None
    evaluation: Evaluation | None = None
    verdict: GateVerdict | None = None
    deployment: Deployment | None = None
    max_attempts: int = 1  # configurations the crew may try (the goal's `attempts`; the loop's rounds try one)
    attempts: list[dict] = field(default_factory=list)  # each configuration trained, as `steps.train.attempt_record`
    trained: dict = field(default_factory=dict)  # run id -> (TrainPlan, RunResult) of every attempt
    base_val_perplexity: float | None = None  # the base model on the validation split, measured once
    picked: str | None = None  # the attempt's run the evaluator judges (the best on validation); None: run_id
    reported: bool = False  # the evaluator wrote the run's report
    registered: str | None = None  # the version this run registered (the only one its deployer may promote)

    @property
    def run(self) -> Run:
        return Run(self.workspace, self.run_id)

    @property
    def trained_run_id(self) -> str:
        """The run evaluated, gated and deployed: the attempt picked on validation (the first when only one)."""
        return self.picked or self.run_id

    def facts(self) -> dict:
        """What the run's steps established, as code knows it (given to the next step, never an agent's account)."""
        facts: dict = {"run_id": self.run_id}
        if self.summary is not None:
            facts["fingerprint"] = self.summary.fingerprint
        if self.result is not None:
            facts.update(status=self.result.status, steps=self.result.steps, trained_run=self.trained_run_id,
                         attempts=len(self.attempts) or 1)
        if self.verdict is not None:
            facts.update(metric=self.verdict.metric, value=self.verdict.value, passed=self.verdict.passed)
        if self.registered is not None:
            facts["registered"] = self.registered
        return facts

    def resume(self) -> "RunContext":
        """Fill in what an interrupted earlier attempt of this run left on disk (the loop after a kill)."""
        run = self.run
        self.plan = self.plan or run.plan()
        self.result = self.result or run.result()
        self.evaluation = self.evaluation or run.evaluation()
        self.verdict = self.verdict or run.gate()
        self.reused_from = self.reused_from or run.memory_used()
        if self.summary is None and self.plan is not None:
            self.summary = load_summary(self.workspace, self.plan.dataset)
        return self
