"""Runs in the workspace: `runs/<run_id>/`, and the one owner of every artefact in it.

No other module builds a run's path or reads a run's file by hand (tests/test_run_owner.py checks it).

    plan.json          TrainPlan         written when training starts
    metrics.jsonl      one row per optimizer step (appended while training)
    checkpoints/       resumable state (training.checkpoint), tokenizer/ for pretraining runs
    final/, best/      exported models
    result.json        RunResult         what training did
    evaluation.json    Evaluation        the candidate beside its base (and production)
    gate.json          GateVerdict       the verdict, recomputable from evaluation.json
    deployment.json    Deployment        what the deployer did
    memory_used.json   which earlier run's settings the plan took
    narrative.json     the evaluator's narrative template (numbers inserted by code)
    lessons.jsonl      lessons stored about this run (memory's source of truth for them)
    trace.jsonl        every agent step and tool call of a crew run
    crew_result.json   the crew's one-object summary of the run
    attempts.json      the configurations the crew tried before it picked this run (when it tried several)
    report.md, report.html
    harness/           the lm-eval task made from the test split, and results.json (`modelcrew eval --harness`)

Artefacts are written whole (temporary name, fsync, rename): a reader sees the old file or the new one.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from training.atomic import write_text_atomic
from training.contracts import Deployment, Evaluation, GateVerdict, RunResult, TrainPlan
from training.errors import InputError

RUN_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"  # also keeps a run id from naming a path outside runs/
Model = TypeVar("Model", bound=BaseModel)


def runs_dir(workspace: Path) -> Path:
    return Path(workspace) / "runs"


def new_run_id(task: str) -> str:
    """`<task>-<UTC date>-<time>-<4 hex>`: sortable, and unique across processes started in the same second."""
    return f"{task}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def check_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not re.fullmatch(RUN_ID, run_id):
        raise InputError(f"run_id: {run_id!r} is not a run id (letters, digits, '.', '_', '-'; at most 128)")
    return run_id


class Run:
    """`runs/<run_id>/` of `workspace`, or any directory for a throwaway run (`Run.at`)."""

    def __init__(self, workspace: Path, run_id: str) -> None:
        self.workspace, self.run_id = Path(workspace), check_run_id(run_id)
        self.dir = runs_dir(workspace) / run_id

    @classmethod
    def at(cls, directory: Path, run_id: str = "throwaway") -> "Run":
        """A run kept outside the workspace's runs/ (an estimate's few measured steps)."""
        run = cls.__new__(cls)
        run.workspace, run.run_id, run.dir = Path(directory), check_run_id(run_id), Path(directory)
        return run

    def __repr__(self) -> str:
        return f"Run({self.dir})"

    def exists(self) -> bool:
        return self.dir.is_dir()

    def require(self) -> "Run":
        if not self.exists():
            raise InputError(f"run {self.run_id!r}: no such run in {runs_dir(self.workspace)}")
        return self

    # ---- places (written by the loop, the checkpointer, the exporter, the reports) ----

    @property
    def metrics_path(self) -> Path:
        return self.dir / "metrics.jsonl"

    @property
    def trace_path(self) -> Path:
        return self.dir / "trace.jsonl"

    @property
    def lessons_path(self) -> Path:
        return self.dir / "lessons.jsonl"

    @property
    def tokenizer_dir(self) -> Path:
        return self.dir / "tokenizer"

    @property
    def checkpoints_dir(self) -> Path:
        return self.dir / "checkpoints"

    def model_dir(self, which: str = "best") -> Path:
        if which not in ("best", "final"):
            raise InputError(f"which: best or final, not {which!r}")
        return self.dir / which

    @property
    def harness_dir(self) -> Path:
        """Where `modelcrew eval --harness` writes the run's lm-eval task and its results."""
        return self.dir / "harness"

    def report_paths(self) -> tuple[Path, Path]:
        return self.dir / "report.md", self.dir / "report.html"

    # ---- typed artefacts: None when not written yet ----

    def plan(self) -> TrainPlan | None:
        return self._read("plan.json", TrainPlan)

    def result(self) -> RunResult | None:
        return self._read("result.json", RunResult)

    def evaluation(self) -> Evaluation | None:
        return self._read("evaluation.json", Evaluation)

    def gate(self) -> GateVerdict | None:
        return self._read("gate.json", GateVerdict)

    def deployment(self) -> Deployment | None:
        return self._read("deployment.json", Deployment)

    def write_plan(self, plan: TrainPlan) -> None:
        self._write("plan.json", plan)

    def write_result(self, result: RunResult) -> None:
        self._write("result.json", result)

    def write_evaluation(self, evaluation: Evaluation) -> None:
        self._write("evaluation.json", evaluation)

    def write_gate(self, verdict: GateVerdict) -> None:
        self._write("gate.json", verdict)

    def write_deployment(self, deployment: Deployment) -> None:
        self._write("deployment.json", deployment)

    # ---- small JSON artefacts ----

    def memory_used(self) -> str | None:
        """The earlier run whose settings this run's plan took, if any."""
        return self._read_json("memory_used.json", {}).get("reused_from")

    def write_memory_used(self, reused_from: str | None) -> None:
        self._write_json("memory_used.json", {"reused_from": reused_from})

    def crew_result(self) -> dict:
        return self._read_json("crew_result.json", {})

    def write_crew_result(self, payload: dict) -> None:
        self._write_json("crew_result.json", payload)

    def attempts(self) -> list[dict]:
        return self._read_json("attempts.json", {}).get("attempts", [])

    def write_attempts(self, attempts: list[dict]) -> None:
        self._write_json("attempts.json", {"attempts": attempts})

    def write_harness_results(self, results: dict) -> None:
        self._write_json("harness/results.json", results)

    def narrative(self) -> str | None:
        return self._read_json("narrative.json", {}).get("template")

    def write_narrative(self, template: str, author: str = "unknown") -> None:
        """Keep the evaluator's narrative with who wrote it (an LLM's text is data, shown as theirs)."""
        self._write_json("narrative.json", {"template": template, "author": author})

    def narrative_author(self) -> str | None:
        return self._read_json("narrative.json", {}).get("author")

    def metrics_rows(self) -> list[dict]:
        return _jsonl(self.metrics_path)

    def trace_rows(self) -> list[dict]:
        return _jsonl(self.trace_path)

    def lessons(self) -> list[dict]:
        return _jsonl(self.lessons_path)

    def add_lesson(self, row: dict) -> bool:
        """Append a lesson unless its text is already recorded; False when it was."""
        if any(known.get("text") == row["text"] for known in self.lessons()):
            return False
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.lessons_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        return True

    def goal_text(self) -> str | None:
        """The goal this run was started for, as its person wrote it (crew runs only)."""
        return self.crew_result().get("goal") or next((e["text"] for e in self.trace_rows() if e.get("kind") == "goal"), None)

    def trace(self, echo=None) -> "Trace":
        return Trace(self.trace_path, echo=echo)

    # ---- plumbing ----

    def _read(self, name: str, model: type[Model]) -> Model | None:
        path = self.dir / name
        if not path.exists():
            return None
        try:
            return model.model_validate_json(path.read_text(encoding="utf-8"))
        except ValidationError as err:
            raise InputError(f"{path}: not a valid {model.__name__} ({str(err).splitlines()[0][:200]})") from None

    def _write(self, name: str, artefact: BaseModel) -> None:
        write_text_atomic(self.dir / name, artefact.model_dump_json(indent=2))

    def _read_json(self, name: str, default: dict) -> dict:
        path = self.dir / name
        if not path.exists():
            return default
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except ValueError as err:
            raise InputError(f"{path}: not valid JSON ({err})") from None

    def _write_json(self, name: str, payload: dict) -> None:
        write_text_atomic(self.dir / name, json.dumps(payload, indent=2, ensure_ascii=False))


def _jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def all_runs(workspace: Path) -> list[Run]:
    """Every run directory in the workspace, by run id."""
    root = runs_dir(workspace)
    if not root.is_dir():
        return []
    return [Run(workspace, p.name) for p in sorted(root.iterdir()) if p.is_dir() and re.fullmatch(RUN_ID, p.name)]


def evaluated_runs(workspace: Path) -> list[Run]:
    return [r for r in all_runs(workspace) if (r.dir / "evaluation.json").is_file()]


class Trace:
    """`trace.jsonl`: every agent step and tool call with its timing, appended and flushed as it happens."""

    def __init__(self, path: Path | None = None, echo=None) -> None:
        self.path, self.echo, self.started = path, echo, time.perf_counter()
        self.lock = threading.Lock()
        self.events: list[dict] = []
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, kind: str, **fields) -> None:
        event = {"t": round(time.perf_counter() - self.started, 3), "kind": kind, **fields}
        with self.lock:
            self.events.append(event)
            if self.path is not None:
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(event, ensure_ascii=False, default=str) + "\n")
        if self.echo is not None:
            self.echo(event)
