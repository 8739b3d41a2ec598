"""The retraining loop: a CrewAI Flow that watches the data and production, and runs the crew when there is reason to.

    check ─> route ─ no_change ────────────────────────────────────────────────────────────────────┐
               ├──── retrain ──> curate -> train -> evaluate -> decide ─ deploy ─> deploy_candidate ─┐  │
               │                                                   └──── keep ───> keep_production ──┤  │
               └──── rollback ─> restore_previous ───────────────────────────────────────────────────┴─> report -> wait

One kickoff of `RetrainingLoop` is one check and at most one round; `run_loop` kicks it off again after
each wait. The curate, train, evaluate and deploy steps are the crew's own tasks, each run by its agent
through its tools (`ModelCrew.run`), all sharing the round's `RunContext`; check, decide, keep, rollback
and report are code (`crews/loop_policy.py`), so triggers, gates and rollbacks never depend on an LLM's
judgement. This file is the graph; the rules are in loop_policy.

- Triggers (`check`): new records in the watched source (by content hash: a re-delivered copy is not new),
  or, for a feedback loop (`loop start --feedback MODEL`), at least `min_feedback` new training records made from
  the served model's rated answers (`loop_policy.export_feedback`),
  drift (the new records' embedding centroid is far from the training data's, or production's
  perplexity on them is well above the value it was deployed with), a schedule, or `loop trigger`.
- A round's data: every new record, every earlier evaluation record (the hash-based split puts each record
  in the same split every time, so the evaluation set only grows), and a `replay` share of earlier
  training records. Training starts from production's weights (warm start).
- A round's plan: the first from memory's best config on similar data (or the defaults); later ones take the
  learning rate from this loop's own earlier rounds (`loop_state.earlier_rounds`), with memory on or off: the next
  rate after a miss, the rate that passed once one has (`training.plan_from_goal.lr_from_rounds`).
- Records whose candidate came out worse than production (or restated evaluation records) are quarantined:
  remembered as seen, never replayed or evaluated on. A candidate that merely missed the goal's target
  leaves its records in use.
- Rollback: when production is worse than the previous version on the newest records, production goes back.

Durable state: `LoopState` is written to `<workspace>/loop/state.json` (whole-file replace) after every
step; a loop killed at any point continues its round from the last finished step, and a run that
finished training is never trained again. One loop per workspace (`loop/loop.lock`).
"""

from __future__ import annotations

import sys
import time
from datetime import datetime
from pathlib import Path

from crewai.flow.flow import Flow, listen, or_, router, start

from crews import loop_policy as policy
from crews.loop_state import (LoopLock, LoopSettings, LoopState, Round, clear, earlier_rounds, load_state, now, pending,
                              read_pool, save_state)
from llm.env import quiet_crewai
from training.contracts import Goal
from training.errors import InputError, ModelcrewError

POLL_SECONDS = 0.5  # how often a waiting loop looks for `loop trigger` / `loop stop`


class StepFailed(ModelcrewError):
    """A round's step failed; the round is retried (or given up) by the next kickoff."""


class LoopStopped(ModelcrewError):
    """`loop stop` was asked for: the loop ends before its next step; the round continues at the next start."""


class RetrainingLoop(Flow[LoopState]):
    def __init__(self, workspace: Path, echo=None, **kwargs) -> None:
        super().__init__(suppress_flow_events=True, **kwargs)
        self._ws = Path(workspace)
        self._echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))
        self._context = None  # the current round's RunContext, shared by its steps

    # -- helpers --

    def _say(self, text: str) -> None:
        self._echo(f"[loop {datetime.now().strftime('%H:%M:%S')}] {text}")

    def _save(self) -> None:
        save_state(self._ws, self.state)

    def _round_context(self, r: Round):
        """The round's RunContext; rebuilt from the run's files when the round continues after an interruption."""
        from steps.context import RunContext
        from training.data.store import load_summary

        if self._context is None or self._context.run_id != r.run_id:
            s = self.state.settings
            self._context = RunContext(self._ws, policy.round_goal(self._ws, self.state, r), s.goal_text, r.run_id,
                                       author=s.llm or "offline", use_memory=s.use_memory,
                                       earlier=earlier_rounds(self._ws, self.state),
                                       related=[x.dataset for x in self.state.rounds if x.dataset]).resume()
        if self._context.summary is None and r.dataset:  # curated before an interruption
            self._context.summary = load_summary(self._ws, r.dataset)
        return self._context

    def _kickoff_step(self, r: Round, name: str) -> None:
        from crews.crew import ModelCrew
        from llm.backends import make_llm

        context, s = self._round_context(r), self.state.settings
        answer = ModelCrew(context, make_llm(s.llm, s.base_url), context.run.trace()).run(name)
        r.outputs[name] = {"answer": answer[:2000]}  # the agent's account, for the record

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

    def _finish(self, r: Round, status: str) -> None:
        def record() -> None:
            from steps.deploy import deployment_from_registry, record_deployment

            c = self._round_context(r)
            c.deployment = deployment_from_registry(self._ws, c.goal, r.run_id, c.verdict)
            record_deployment(self._ws, r.run_id, c.deployment, self.state.settings.goal_text, c.evaluation, c.plan, c.verdict)

        policy.close_round(self._ws, self.state, r, status, record)
        verdict = ("deployed " + r.deployed if r.deployed else f"rolled back {r.rolled_back}" if r.rolled_back
                   else "production unchanged")
        self._say(f"round {r.number} {status}: {verdict}")

    # -- the graph --

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
        r = policy.start_round(self._ws, st, read_pool(self._ws), self._say)
        st.current = r
        self._save()
        if r is not None:
            self._say(f"round {r.number} ({r.route}): " + "; ".join(f"{t.kind}: {t.detail}" for t in r.triggers))

    @router(check)
    def route(self) -> str:
        r = self.state.current
        return r.route if r is not None and r.status == "running" else "no_change"

    @listen("retrain")
    def curate(self) -> None:
        def run(r: Round) -> None:
            self._kickoff_step(r, "curate")
            summary = self._round_context(r).summary
            if summary is None:
                raise ModelcrewError(f"the curator finished without curating {self._round_context(r).goal.data}")
            r.dataset = summary.fingerprint
        self._step("curate", run)

    @listen(curate)
    def train(self) -> None:
        def run(r: Round) -> None:
            context = self._round_context(r)
            if context.result is not None:  # trained before a kill: never twice
                self._say(f"round {r.number}: run {r.run_id} finished training before the interruption")
                return
            version, path = policy.production(self._ws, self.state.goal)
            if version is not None and version.weights == "full":
                r.warm_start = f"{self.state.goal.model_name} {version.version}"
                context.warm_start = str(path)
            self._kickoff_step(r, "train")
        self._step("train", run)

    @listen(train)
    def evaluate(self) -> None:
        def run(r: Round) -> None:
            self._kickoff_step(r, "evaluate")
            context = self._round_context(r)
            verdict, ev = context.verdict, context.evaluation
            if verdict is None or ev is None:
                raise ModelcrewError(f"the evaluator finished without evaluating run {r.run_id}")
            r.passed, r.reasons, r.metric = verdict.passed, verdict.reasons, verdict.metric
            r.candidate, r.production_value = verdict.value, ev.metrics.get(f"production_{verdict.metric}")
            policy.measure_heldout(self._ws, self.state, r, Path(ev.model_dir), ev.format, context.plan.seq_len)
        self._step("evaluate", run)

    @router(evaluate)
    def decide(self) -> str:
        r = self.state.current
        return "deploy" if r is not None and r.passed else "keep"

    @listen("deploy")
    def deploy_candidate(self) -> None:
        def run(r: Round) -> None:
            self._kickoff_step(r, "deploy")
            version, _ = policy.production(self._ws, self.state.goal)
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
            from serving.registry import Registry

            reason = next((t.detail for t in r.triggers if "previous" in t.detail), "production fell behind previous")
            version = Registry(self._ws).rollback(self.state.goal.model_name, reason)
            r.rolled_back = f"{r.production_before.split()[-1]} -> {version}"
            r.outputs["rollback"] = {"production": version, "reason": reason}
        self._step("rollback", run)

    @listen(or_(deploy_candidate, keep_production, restore_previous))
    def report(self) -> None:
        self._step("report", lambda r: self._finish(r, "done"))

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


def start_state(workspace: Path, settings: LoopSettings | None, goal: Goal | None = None) -> LoopState:
    """The saved state (a loop continues where it stopped), or a new one from `settings` and its parsed goal."""
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
    if settings.feedback is None and not watch.exists():
        raise InputError(f"--watch: {watch} does not exist")
    if goal is None:
        goal, _ = policy.loop_goal(settings.goal_text, None if settings.feedback else watch, workspace, settings.feedback)
    return LoopState(settings=settings, goal=goal)


def run_loop(workspace: Path, settings: LoopSettings | None = None, once: bool = False, echo=None,
             goal: Goal | None = None) -> LoopState:
    """`modelcrew loop start`: check, run rounds, wait; until --once, --max-rounds or `loop stop`.
    `goal` is the goal of `settings` when the caller has already parsed it."""
    workspace = Path(workspace)
    say = echo or (lambda line: print(line, file=sys.stderr, flush=True))
    quiet_crewai(workspace)
    state = start_state(workspace, settings, goal)
    lock = LoopLock(workspace)
    lock.acquire_for(state.settings.goal_text)
    try:
        if state.checks == 0:  # a new loop on a model in production: what production trained on is not new
            policy.seed_pool(workspace, state.goal)
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
