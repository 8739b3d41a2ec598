"""The retraining loop's durable parts, importable without CrewAI: settings, state, lock, requests, pool.

`<workspace>/loop/` holds:
    state.json        the Flow's state (`LoopState`), replaced whole after every step
    loop.lock         held by the running loop; loop.holder names it (pid, command, start, goal)
    requests/         `trigger` and `stop`, written by `modelcrew loop trigger|stop`
    pool.jsonl        every record a round has taken: used, quarantined (its candidate was worse) or failed
    feedback.jsonl    a feedback loop's watched file: the served model's rated answers as training records
    rounds/NNNN/      each round's input data (data.jsonl) and its new records (new.jsonl)
    report.md, report.html   the timeline of rounds
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal
from uuid import uuid4

from pydantic import BaseModel, Field

from training.atomic import write_text_atomic
from training.contracts import Goal
from training.errors import ModelcrewError
from training.locks import HeldLock, Timeout


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def loop_dir(workspace: Path) -> Path:
    return Path(workspace) / "loop"


# ---- state ----------------------------------------------------------------------------------------


class LoopSettings(BaseModel):
    model_config = {"extra": "forbid"}

    goal_text: str
    watch: str = Field(description="the watched file or directory of records (a feedback loop: loop/feedback.jsonl)")
    feedback: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$", description=(
        "learn from this served model's recorded feedback (`serve --record`) instead of a folder of records"))
    min_feedback: int = Field(20, ge=1, le=1_000_000, description=(
        "a feedback loop's round waits for this many new training records from rated answers"))
    every_s: float = Field(3600.0, gt=0, description="seconds between checks")
    schedule_s: float | None = Field(None, gt=0, description="a round at least this often, even without new data")
    max_rounds: int | None = Field(None, ge=1, description="stop after this many rounds (in one `loop start`)")
    replay: float = Field(0.5, ge=0.0, le=0.9, description="share of a later round's training records from earlier data")
    drift_distance: float = Field(0.3, gt=0.0, le=2.0, description="embedding-centroid distance that counts as drift")
    drift_metric: float = Field(0.25, ge=0.0, le=10.0, description=(
        "drift when production's perplexity on the newest records is this much above its deployed value"))
    rollback_margin: float = Field(0.05, ge=0.0, le=1.0, description=(
        "roll back when production's perplexity on the newest records is this much above the previous version's"))
    max_retries: int = Field(2, ge=0, le=10, description="retries of a failing step before its round is given up")
    use_memory: bool = Field(True, description=(
        "False: the trainer plans without memory's runs of other loops and datasets (the memory benchmark's baseline); "
        "the loop's own earlier rounds guide its plan either way"))
    llm: str | None = None
    base_url: str | None = None


class Trigger(BaseModel):
    kind: Literal["data", "drift", "schedule", "manual"]
    detail: str
    value: float | None = None


class Round(BaseModel):
    number: int
    route: Literal["retrain", "rollback"]
    triggers: list[Trigger]
    started_at: str
    finished_at: str | None = None
    status: Literal["running", "done", "failed"] = "running"
    steps: list[str] = Field(default_factory=list, description="finished steps, in order")
    run_id: str | None = None
    signature: str = ""
    new_records: int = 0
    replayed: int = 0
    eval_records: int = 0
    warm_start: str | None = None  # "name vN" the round started from
    dataset: str | None = None
    outputs: dict[str, dict] = Field(default_factory=dict, description="what each agent's step answered")
    metric: str | None = None
    candidate: float | None = None
    production_value: float | None = None  # production on the same evaluation set
    production_before: str | None = None
    production_after: str | None = None
    passed: bool | None = None
    reasons: list[str] = Field(default_factory=list)
    deployed: str | None = None
    rolled_back: str | None = None
    newest: dict[str, float] = Field(default_factory=dict, description="perplexity on the newest records, by model")
    retries: int = 0
    error: str | None = None


class LoopState(BaseModel):
    id: str = Field(default_factory=lambda: str(uuid4()))  # a CrewAI Flow state needs an id
    settings: LoopSettings | None = None
    goal: Goal | None = None
    source_signature: str = ""
    rounds: list[Round] = Field(default_factory=list)
    current: Round | None = None
    session_start: int = 0  # rounds finished before this `loop start`, for --max-rounds
    once: bool = False
    checks: int = 0
    last_check_at: str | None = None
    last_round_at: str | None = None
    recheck: bool = False  # check again at once (after a rollback)
    feedback_rates: dict[str, dict] = Field(default_factory=dict, description=(
        "a feedback loop: completions, ratings and the rate of good answers per version (`serving.feedback.stats`)"))


def earlier_rounds(workspace: Path, state: LoopState) -> list[tuple[float, bool]]:
    """(learning rate, passed its gate) of each finished round that trained and was judged, oldest first: what the
    next round's plan goes on (`training.plan_from_goal.lr_from_rounds`), with memory on or off."""
    from training.runs import Run

    plans = [(Run(workspace, r.run_id).plan(), r.passed) for r in state.rounds if r.run_id and r.passed is not None]
    return [(plan.lr, passed) for plan, passed in plans if plan is not None]


def state_path(workspace: Path) -> Path:
    return loop_dir(workspace) / "state.json"


def load_state(workspace: Path) -> LoopState | None:
    path = state_path(workspace)
    if not path.exists():
        return None
    try:
        return LoopState.model_validate_json(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ModelcrewError(f"{path}: unreadable loop state ({str(err).splitlines()[0][:200]})") from None


def save_state(workspace: Path, state: LoopState) -> None:
    """Whole-file replace: a kill -9 leaves the previous state or the new one, never half of one."""
    write_text_atomic(state_path(workspace), state.model_dump_json(indent=2))


# ---- one loop per workspace ----------------------------------------------------------------------


class LoopLock(HeldLock):
    """`loop/loop.lock`, held by the running loop; `loop/loop.holder` names it (pid, command, start, goal)."""

    def __init__(self, workspace: Path) -> None:
        super().__init__(loop_dir(workspace) / "loop.lock")

    def acquire_for(self, goal_text: str) -> None:
        try:
            self.acquire(timeout=0, goal=goal_text)
        except Timeout:
            raise self.busy() from None

    def busy(self) -> ModelcrewError:
        return ModelcrewError(f"another loop is already running on {self.path.parent.parent}: {self.describe_holder()}; "
                              "`modelcrew loop stop` stops it")

    def running(self) -> str | None:
        """Who runs a loop here, or None."""
        return self.held_elsewhere()


# ---- requests from `loop trigger` / `loop stop` ----------------------------------------------------


def request(workspace: Path, kind: Literal["trigger", "stop"], reason: str = "") -> Path:
    path = loop_dir(workspace) / "requests" / kind
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"at": now(), "reason": reason}), encoding="utf-8")
    return path


def pending(workspace: Path, kind: str) -> dict | None:
    path = loop_dir(workspace) / "requests" / kind
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"at": now(), "reason": ""} if path.exists() else None


def clear(workspace: Path, kind: str) -> None:
    (loop_dir(workspace) / "requests" / kind).unlink(missing_ok=True)


# ---- the pool of records already used ------------------------------------------------------------


def pool_path(workspace: Path) -> Path:
    return loop_dir(workspace) / "pool.jsonl"


def read_pool(workspace: Path) -> dict[str, dict]:
    """id -> {"id", "round", "status" (used | quarantined | failed), "split", "record"}; later lines win."""
    pool: dict[str, dict] = {}
    path = pool_path(workspace)
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:  # a line cut by a kill: its round re-appends it when it resumes
                continue
            pool[entry["id"]] = entry
    return pool


def add_to_pool(workspace: Path, entries: list[dict]) -> None:
    pool_path(workspace).parent.mkdir(parents=True, exist_ok=True)
    with open(pool_path(workspace), "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries))
        f.flush()
        os.fsync(f.fileno())


def source_signature(path: str) -> str:
    """Cheap change detection: names, sizes and modification times of the watched files."""
    root = Path(path).expanduser()
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root] if root.exists() else []
    parts = [f"{p.relative_to(root) if root.is_dir() else p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def read_watched(settings: LoopSettings, goal: Goal) -> list[dict]:
    """The watched source's records, curated as the crew would: [{"id", "split", "format", "record"}] in hash order."""
    from training.data import curate

    root = Path(settings.watch).expanduser().resolve()
    curated = curate(str(root), format=goal.format, allowed_roots=[root], show_progress=False)
    fmt = curated.summary.format
    out = [{"id": r["id"], "split": split, "format": fmt, "record": {k: v for k, v in r.items() if k != "id"}}
           for split, rows in curated.splits.items() for r in rows]
    return sorted(out, key=lambda e: e["id"])
