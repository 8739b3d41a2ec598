"""The retraining loop: a CrewAI Flow that watches the data and production, and runs the crew when there is reason to.

    check ─> route ─ no_change ────────────────────────────────────────────────────────────────────┐
               ├──── retrain ──> curate -> train -> evaluate -> decide ─ deploy ─> deploy_candidate ─┐  │
               │                                                   └──── keep ───> keep_production ──┤  │
               └──── rollback ─> restore_previous ───────────────────────────────────────────────────┴─> report -> wait

One kickoff of `RetrainingLoop` is one check and at most one round; `run_loop` kicks it off again after
each wait. The curate, train, evaluate and deploy steps are the crew's own tasks, each run by its agent
through its tools (`ModelCrew.step`); check, decide, keep, rollback and report are code, so triggers,
gates and rollbacks never depend on an LLM's judgement.

- Triggers (`check`): new records in the watched source (by content hash: a re-delivered copy is not new),
  drift (the new records' embedding centroid is far from the training data's, or production's
  perplexity on them is well above the value it was deployed with), a schedule, or `loop trigger`.
- A round's data: every new record, every earlier evaluation record (the hash-based split puts each record
  in the same split every time, so the evaluation set only grows), and a `replay` share of earlier
  training records. Training starts from production's weights (warm start) with the config memory recommends.
- Records whose candidate came out worse than production (or restated evaluation records) are quarantined:
  remembered as seen, never replayed or evaluated on. A candidate that merely missed the goal's target
  leaves its records in use.
- Rollback: when production is worse than the previous version on the newest records, production goes back.

Durable state: `LoopState` is written to `<workspace>/loop/state.json` (whole-file replace) after every
step; a loop killed at any point continues its round from the last finished step, and a run that
finished training is never trained again. One loop per workspace (`loop/loop.lock`).
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from pathlib import Path

from crewai.flow.flow import Flow, listen, or_, router, start

from crews.loop_state import (
    LoopLock,
    LoopSettings,
    LoopState,
    Round,
    Trigger,
    add_to_pool,
    clear,
    load_state,
    loop_dir,
    now,
    pending,
    read_pool,
    read_watched,
    save_state,
    source_signature,
)
from crews.run import quiet_crewai, record_deployment
from training.contracts import Goal
from training.errors import InputError, ModelcrewError

POLL_SECONDS = 0.5  # how often a waiting loop looks for `loop trigger` / `loop stop`


# ---- the Flow ------------------------------------------------------------------------------------


class StepFailed(ModelcrewError):
    """A round's step failed; the round is retried (or given up) by the next kickoff."""


class LoopStopped(ModelcrewError):
    """`loop stop` was asked for: the loop ends before its next step; the round continues at the next start."""


class RetrainingLoop(Flow[LoopState]):
    def __init__(self, workspace: Path, echo=None, **kwargs) -> None:
        super().__init__(suppress_flow_events=True, **kwargs)
        self._ws = Path(workspace)
        self._echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))

    # -- helpers --

    def _say(self, text: str) -> None:
        self._echo(f"[loop {datetime.now().strftime('%H:%M:%S')}] {text}")

    def _save(self) -> None:
        save_state(self._ws, self.state)

    def _round_dir(self, r: Round) -> Path:
        return loop_dir(self._ws) / "rounds" / f"{r.number:04d}"

    def _goal(self, r: Round) -> Goal:
        return self.state.goal.model_copy(update={"data": str(self._round_dir(r) / "data.jsonl")})

    def _crew(self, r: Round, warm_start: str | None = None):
        from agents.llm import make_llm
        from crews.crew import ModelCrew
        from tools.base import Trace

        s = self.state.settings
        trace = Trace(self._ws / "runs" / r.run_id / "trace.jsonl")
        related = [x.dataset for x in self.state.rounds if x.dataset]
        return ModelCrew(self._ws, self._goal(r), s.goal_text, r.run_id, make_llm(s.llm, s.base_url), trace,
                         use_memory=s.use_memory, warm_start=warm_start, related=related)

    def _kickoff_step(self, r: Round, name: str, warm_start: str | None = None) -> dict:
        crew = self._crew(r, warm_start).step(name)
        out = crew.kickoff(inputs={"goal_json": self._goal(r).model_dump_json(), "run_id": r.run_id,
                                   "context": json.dumps(r.outputs.get("context", {}))})
        answer = out.tasks_output[0].pydantic
        result = answer.model_dump(mode="json") if answer is not None else {"raw": out.raw}
        r.outputs[name] = result
        r.outputs.setdefault("context", {}).update(result)
        return result

    def _production(self):
        """(version, path) of production, or (None, None)."""
        from serving.registry import Registry

        name = self.state.goal.model_name
        try:
            _, version, path = Registry(self._ws).resolve(f"{name}@production")
        except InputError:
            return None, None
        return version, path

    def _step(self, name: str, fn) -> None:
        r = self.state.current
        if r is None or r.status != "running" or name in r.steps:
            return  # finished before an interruption
        if pending(self._ws, "stop") is not None:
            raise LoopStopped(f"round {r.number}: stopped before {name}; `modelcrew loop start` continues it")
        self._say(f"round {r.number}: {name}")
        try:
            fn(r)
        except Exception as err:  # a tool, an agent or the engine failed: retry the step, or give the round up
            r.retries += 1
            r.error = f"{name}: {type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
            if r.retries > self.state.settings.max_retries:
                r.status = "failed"
                self._finish(r, "failed")
            self._save()
            raise StepFailed(f"round {r.number}: {r.error}" + (" (round given up)" if r.status == "failed" else
                                                               f" (retry {r.retries} of {self.state.settings.max_retries})")) from err
        r.steps.append(name)
        self._save()

    # -- check and route --

    @start()
    def check(self) -> None:
        st = self.state
        if st.current is not None and st.current.status == "running":
            r = st.current
            self._say(f"round {r.number}: continuing after {r.steps[-1] if r.steps else 'its start'}")
            return
        st.checks += 1
        st.last_check_at = now()
        st.recheck = False
        pool = read_pool(self._ws)
        triggers, new, route, detail = self._triggers(pool)
        if not triggers and route != "rollback":
            self._save()
            return
        number = (st.rounds[-1].number if st.rounds else 0) + 1
        r = Round(number=number, route=route, triggers=triggers, started_at=now(), signature=detail["signature"],
                  run_id=f"loop-r{number:03d}-{datetime.now().strftime('%Y%m%d-%H%M%S')}", newest=detail["newest"],
                  production_before=detail["production"], new_records=len(new))
        if route == "retrain":
            self._write_round_data(r, new, pool)
        st.current = r
        self._save()
        self._say(f"round {number} ({route}): " + "; ".join(f"{t.kind}: {t.detail}" for t in triggers))

    def _triggers(self, pool: dict[str, dict]):
        from memory.store import MemoryStore

        st, s = self.state, self.state.settings
        triggers: list[Trigger] = []
        manual = pending(self._ws, "trigger")
        if manual is not None:
            triggers.append(Trigger(kind="manual", detail=manual.get("reason") or "modelcrew loop trigger"))
        due = bool(s.schedule_s and st.last_round_at and
                   time.time() - datetime.fromisoformat(st.last_round_at).timestamp() >= s.schedule_s)
        if due:
            triggers.append(Trigger(kind="schedule", detail=f"no round for {s.schedule_s:g} s"))
        signature = source_signature(s.watch)
        detail = {"signature": signature, "newest": {}, "production": None}
        new: list[dict] = []
        if signature != st.source_signature or triggers:
            try:
                new = [e for e in read_watched(s, st.goal) if e["id"] not in pool]
            except InputError as err:  # a malformed delivery: say so and wait for a fix, losing nothing
                self._say(f"the watched data cannot be used yet: {err}")
                return [], [], "retrain", detail
            if not new and triggers and not any(e["status"] == "used" for e in pool.values()):
                self._say("a round was asked for, but there is no data to train on yet")
                clear(self._ws, "trigger")
                return [], [], "retrain", detail
            if not new and signature != st.source_signature:
                self._say("the watched data changed but holds no new records (a re-delivered copy?): no round")
                st.source_signature = signature
        route = "retrain"
        if new:
            triggers.insert(0, Trigger(kind="data", detail=f"{len(new)} new records", value=len(new)))
            old = [e["record"] for e in pool.values() if e["status"] == "used"]
            shifted = False
            if old:
                distance = MemoryStore(self._ws).centroid_distance([e["record"] for e in new], old)
                shifted = distance >= s.drift_distance
                if shifted:
                    triggers.append(Trigger(kind="drift", value=distance, detail=(
                        f"the new records' embedding centroid is {distance:.3f} from the training data's "
                        f"(threshold {s.drift_distance:g})")))
            # On data unlike anything trained on, every version is poor and retraining is the remedy:
            # a rollback is only considered when the new records resemble the training data.
            route = self._check_production(new, triggers, detail, consider_rollback=not shifted)
        return triggers, new, route, detail

    def _check_production(self, new: list[dict], triggers: list[Trigger], detail: dict, consider_rollback: bool) -> str:
        """Score production (and the previous version) on the newest records: drift by metric, or rollback."""
        from serving.registry import Registry
        from training.evaluate import perplexity_on

        version, path = self._production()
        if version is None:
            return "retrain"
        name = self.state.goal.model_name
        detail["production"] = f"{name} {version.version}"
        records = [e["record"] for e in new]
        fmt, seq_len = self._format_and_seq_len(path)
        ppl = perplexity_on(path, records, fmt, seq_len)
        if ppl is None:
            return "retrain"
        detail["newest"]["production"] = ppl
        recorded = version.metrics.get("test_perplexity") or version.metrics.get("val_perplexity")
        s = self.state.settings
        if recorded and ppl > recorded * (1 + s.drift_metric):
            triggers.append(Trigger(kind="drift", value=ppl, detail=(
                f"production {version.version}'s perplexity on the newest records is {ppl:.4g}, "
                f"{ppl / recorded - 1:+.0%} from the {recorded:.4g} it was deployed with (margin {s.drift_metric:.0%})")))
        registry = Registry(self._ws)
        previous = registry.state(name).aliases.get("previous")
        if previous and consider_rollback:
            _, _, prev_path = registry.resolve(f"{name}@{previous}")
            prev = perplexity_on(prev_path, records, fmt, seq_len)
            detail["newest"]["previous"] = prev
            if prev is not None and ppl > prev * (1 + s.rollback_margin):
                detail["rollback"] = (f"production {version.version}'s perplexity on the {len(records)} newest records is "
                                      f"{ppl:.4g}, worse than previous {previous}'s {prev:.4g} by more than "
                                      f"{s.rollback_margin:.0%}")
                triggers.append(Trigger(kind="drift", value=ppl, detail=detail["rollback"]))
                return "rollback"
        return "retrain"

    def _format_and_seq_len(self, model_dir: Path) -> tuple[str, int]:
        """The data format and sequence length a registered model was trained with (from its lineage)."""
        from training.data.store import load_summary

        lineage = json.loads((Path(model_dir) / "lineage.json").read_text(encoding="utf-8"))
        return load_summary(self._ws, lineage["dataset"]).format, int(lineage.get("plan", {}).get("seq_len", 256))

    def _write_round_data(self, r: Round, new: list[dict], pool: dict[str, dict]) -> None:
        """The round's records: all new ones, every earlier evaluation record, and a replay share of earlier training."""
        s = self.state.settings
        trained = sorted((e for e in pool.values() if e["status"] == "used"), key=lambda e: e["id"])
        old_eval = [e for e in trained if e["split"] != "train"]
        old_train = [e for e in trained if e["split"] == "train"]
        new_train = sum(e["split"] == "train" for e in new)
        if new_train:
            replayed = old_train[: round(s.replay / (1 - s.replay) * new_train)] if s.replay else []
        else:  # a scheduled or manual round without new data trains on everything it has
            replayed = old_train
        # The gate judges on a fixed evaluation set: earlier test records only. New test records join it from
        # the next round on (if this round is accepted), so a bad batch cannot grade its own candidate.
        fixed = any(e["split"] == "test" for e in old_eval)
        taken = [e for e in new if not (fixed and e["split"] == "test")]
        rows = [e["record"] for e in taken + old_eval + replayed]
        d = self._round_dir(r)
        d.mkdir(parents=True, exist_ok=True)
        from training.data.store import write_jsonl

        write_jsonl(d / "data.jsonl", rows)
        write_jsonl(d / "new.jsonl", new)
        r.replayed, r.eval_records = len(replayed), len(old_eval)

    @router(check)
    def route(self) -> str:
        r = self.state.current
        return r.route if r is not None and r.status == "running" else "no_change"

    # -- a retraining round --

    @listen("retrain")
    def curate(self) -> None:
        def run(r: Round) -> None:
            result = self._kickoff_step(r, "curate")
            r.dataset = result.get("fingerprint")
        self._step("curate", run)

    @listen(curate)
    def train(self) -> None:
        def run(r: Round) -> None:
            if (self._ws / "runs" / r.run_id / "result.json").exists():  # trained before a kill: never twice
                self._say(f"round {r.number}: run {r.run_id} finished training before the interruption")
                r.outputs.setdefault("context", {})["run_id"] = r.run_id
                return
            version, path = self._production()
            if version is not None and version.weights == "full":
                r.warm_start = f"{self.state.goal.model_name} {version.version}"
            self._kickoff_step(r, "train", warm_start=str(path) if r.warm_start else None)
        self._step("train", run)

    @listen(train)
    def evaluate(self) -> None:
        def run(r: Round) -> None:
            from training.contracts import Evaluation, GateVerdict
            from training.evaluate import perplexity_on

            self._kickoff_step(r, "evaluate")
            run_dir = self._ws / "runs" / r.run_id
            verdict = GateVerdict.model_validate_json((run_dir / "gate.json").read_text(encoding="utf-8"))
            ev = Evaluation.model_validate_json((run_dir / "evaluation.json").read_text(encoding="utf-8"))
            r.passed, r.reasons, r.metric = verdict.passed, verdict.reasons, verdict.metric
            r.candidate, r.production_value = verdict.value, ev.metrics.get(f"production_{verdict.metric}")
            new = [json.loads(line) for line in (self._round_dir(r) / "new.jsonl").read_text(encoding="utf-8").splitlines()]
            held_out = [e["record"] for e in new if e["split"] != "train"]  # the new data's records nobody trained on
            if held_out:
                fmt, seq_len = ev.format, json.loads((run_dir / "plan.json").read_text(encoding="utf-8"))["seq_len"]
                r.newest["candidate_heldout"] = perplexity_on(Path(ev.model_dir), held_out, fmt, seq_len)
                version, path = self._production()
                if version is not None:
                    r.newest["production_heldout"] = perplexity_on(path, held_out, fmt, seq_len)
        self._step("evaluate", run)

    @router(evaluate)
    def decide(self) -> str:
        r = self.state.current
        return "deploy" if r is not None and r.passed else "keep"

    @listen("deploy")
    def deploy_candidate(self) -> None:
        def run(r: Round) -> None:
            self._kickoff_step(r, "deploy")
            version, _ = self._production()
            if version is not None and version.run_id == r.run_id:
                r.deployed = version.version
        self._step("deploy", run)

    @listen("keep")
    def keep_production(self) -> None:
        def run(r: Round) -> None:
            r.outputs["deploy"] = {"deployed": False, "reason": "the gate failed: " + "; ".join(r.reasons[:1])}
        self._step("keep", run)

    @listen("rollback")
    def restore_previous(self) -> None:
        def run(r: Round) -> None:
            from tools.base import Trace
            from tools.deploy import RollbackModelTool

            name = self.state.goal.model_name
            reason = next((t.detail for t in r.triggers if "previous" in t.detail), "production fell behind previous")
            tool = RollbackModelTool(workspace=self._ws, trace=Trace(self._round_dir(r) / "trace.jsonl"))
            answer = tool.run(model_name=name, reason=reason)
            if answer.startswith("error:"):
                raise ModelcrewError(answer)
            version, _ = self._production()
            r.rolled_back = f"{r.production_before.split()[-1]} -> {version.version}"
            r.outputs["rollback"] = {"answer": answer}
        self._step("rollback", run)

    @listen(or_(deploy_candidate, keep_production, restore_previous))
    def report(self) -> None:
        def run(r: Round) -> None:
            self._finish(r, "done")
        self._step("report", run)

    def _finish(self, r: Round, status: str) -> None:
        """Close the round: record its data in the pool, its deployment in memory, and re-render the loop report."""
        from crews.loop_report import render_loop_report

        st = self.state
        if r.route == "retrain":
            new_file = self._round_dir(r) / "new.jsonl"
            if new_file.exists():
                kind = "failed" if status == "failed" else ("quarantined" if self._harmful(r) else "used")
                entries = [{**json.loads(line), "round": r.number, "status": kind}
                           for line in new_file.read_text(encoding="utf-8").splitlines()]
                add_to_pool(self._ws, entries)
            if status == "done":
                self._record_deployment(r)
        version, _ = self._production()
        r.production_after = version.version if version else None
        r.status = status  # type: ignore[assignment]
        r.finished_at = now()
        st.rounds.append(r)
        st.current = None
        if r.route == "retrain":
            st.source_signature = r.signature or st.source_signature
        else:  # a rollback round leaves its new records to the next round, which comes at once
            st.recheck = True
        st.last_round_at = r.finished_at
        clear(self._ws, "trigger")
        render_loop_report(self._ws, st)
        verdict = ("deployed " + r.deployed if r.deployed else f"rolled back {r.rolled_back}" if r.rolled_back
                   else "production unchanged")
        self._say(f"round {r.number} {status}: {verdict}")

    def _harmful(self, r: Round) -> bool:
        """Did this round's data make the model worse than production on the same evaluation set, or restate
        earlier evaluation records? (From the numbers the gate judged, not from the wording of its reasons.)"""
        from training.data.store import datasets_dir
        from training.gate import lower_is_better

        if r.passed or r.candidate is None:
            return False
        old = r.production_value
        worse = old is not None and (r.candidate > old if lower_is_better(r.metric) else r.candidate < old)
        overlaps = datasets_dir(self._ws) / r.dataset / "contamination.json"
        return worse or (overlaps.exists() and bool(json.loads(overlaps.read_text(encoding="utf-8"))))

    def _record_deployment(self, r: Round) -> None:
        from training.contracts import Deployment

        answer = r.outputs.get("deploy", {})
        known = {k: answer[k] for k in ("deployed", "model_name", "version", "alias", "reason") if k in answer}
        record_deployment(self._ws, r.run_id, Deployment(**{"deployed": False, **known}), self.state.settings.goal_text)

    # -- wait --

    @listen(or_(report, "no_change"))
    def wait(self) -> str:
        """Sleep until the next check is due, a `loop trigger` or a `loop stop`; "stop" ends `run_loop`."""
        st, s = self.state, self.state.settings
        done = len(st.rounds) - st.session_start
        if st.once or (s.max_rounds and done >= s.max_rounds):
            return "stop"
        if pending(self._ws, "stop") is not None:
            return "stop"
        if st.recheck:
            return "continue"  # after a rollback the new records that showed the regression are still to be trained on
        return "continue" if sleep_until(self._ws, time.monotonic() + s.every_s) else "stop"


def sleep_until(workspace: Path, deadline: float) -> bool:
    """Wait until `deadline` (monotonic) or a `loop trigger`; False when `loop stop` was asked for."""
    while time.monotonic() < deadline:
        if pending(workspace, "stop") is not None:
            return False
        if pending(workspace, "trigger") is not None:
            return True
        time.sleep(POLL_SECONDS)
    return pending(workspace, "stop") is None


# ---- the driver ----------------------------------------------------------------------------------


def start_state(workspace: Path, settings: LoopSettings | None) -> LoopState:
    """The saved state (a loop continues where it stopped), or a new one from `settings`."""
    from crews.goals import parse_goal

    saved = load_state(workspace)
    if saved is not None:
        if settings is not None and settings.goal_text != saved.settings.goal_text:
            raise InputError(f"goal: this workspace's loop pursues {saved.settings.goal_text!r}; start without a goal "
                             "to continue it, or use another workspace for a new goal")
        if settings is not None:  # new flags (interval, max rounds ...) apply from now on
            saved.settings = settings
        return saved
    if settings is None:
        raise InputError(f"goal: no loop has run on {workspace}; `modelcrew loop start GOAL --watch PATH` starts one")
    watch = Path(settings.watch).expanduser()
    if not watch.exists():
        raise InputError(f"--watch: {watch} does not exist")
    try:
        goal = parse_goal(settings.goal_text, workspace)
    except InputError as err:
        if not str(err).startswith("data:"):
            raise
        goal = parse_goal(f"{settings.goal_text} on {watch}", workspace)  # the goal may leave the data to --watch
    if goal.task != "finetune":
        raise InputError("goal: the retraining loop fine-tunes (it warm-starts each round from production); "
                         f"this goal asks to {goal.task}")
    if goal.deploy == "never" or not goal.model_name:
        raise InputError("goal: the loop deploys what passes; say the model's name (e.g. 'deploy as support-bot if it passes')")
    return LoopState(settings=settings, goal=goal)


def run_loop(workspace: Path, settings: LoopSettings | None = None, once: bool = False, echo=None) -> LoopState:
    """`modelcrew loop start`: check, run rounds, wait; until --once, --max-rounds or `loop stop`."""
    workspace = Path(workspace)
    say = echo or (lambda line: print(line, file=sys.stderr, flush=True))
    quiet_crewai(workspace)
    state = start_state(workspace, settings)
    lock = LoopLock(workspace)
    lock.acquire(state.settings.goal_text)
    try:
        clear(workspace, "stop")
        state.session_start, state.once = len(state.rounds), once
        save_state(workspace, state)
        while True:
            flow = RetrainingLoop(workspace, echo=echo, initial_state=state)
            try:
                outcome = flow.kickoff()
            except LoopStopped as err:
                say(f"[loop] {err}")
                state = load_state(workspace)
                break
            except StepFailed as err:
                say(f"[loop] {err}")
                state = load_state(workspace)
                if state.current is not None:
                    continue  # retry the step now
                if once:
                    break
                continue
            except ModelcrewError as err:  # the check itself failed (e.g. memory busy): try again at the next check
                if once:
                    raise
                say(f"[loop] the check failed: {err}; next check in {state.settings.every_s:g} s")
                state = load_state(workspace)
                if not sleep_until(workspace, time.monotonic() + state.settings.every_s):
                    break
                continue
            state = flow.state
            if outcome == "stop":
                break
    finally:
        clear(workspace, "stop")
        lock.release()
    return state
