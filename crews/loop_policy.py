"""The retraining loop's decisions, as code importable without CrewAI: its goal, triggers, production
checks, a round's data, its held-out measurements, quarantine, and closing a round.

`crews/loop.py` (the Flow) calls these in its graph; each takes the workspace and the loop's state
(`crews.loop_state`) and returns what it found, so the Flow reads as its graph and these rules can be
tested and read alone.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

from crews.loop_state import (LoopState, Round, Trigger, add_to_pool, clear, loop_dir, now, pending, read_pool,
                              read_watched, source_signature)
from training.batches import PREFERENCE
from training.contracts import Goal
from training.data.store import load_contamination, load_summary, write_jsonl
from training.errors import InputError
from steps.evaluate import production
from training.gate import lower_is_better


def loop_goal(goal_text: str, watch: Path | None, workspace: Path, feedback: str | None = None) -> tuple[Goal, Path]:
    """The loop's goal, parsed once, and the source it watches (`watch`, else the goal's data). A feedback loop
    (`feedback`: a served model's name) watches `loop/feedback.jsonl`, written here from the recorded feedback."""
    from crews.goals import parse_goal

    if feedback is not None:
        from serving.feedback import read_feedback

        if watch is not None:
            raise InputError("--watch: a feedback loop watches the served model's recorded feedback; give --watch or --feedback")
        try:
            read_feedback(workspace, feedback)  # before anything is written
        except InputError as err:
            raise InputError(f"--feedback: {err}") from None
        watch = feedback_path(workspace)  # written below, once the goal is understood
    elif watch is not None and not Path(watch).expanduser().exists():
        raise InputError(f"--watch: {Path(watch).expanduser()} does not exist")
    try:
        goal = parse_goal(goal_text, workspace)
    except InputError as err:
        if not str(err).startswith("data:"):
            raise
        if watch is None:
            raise InputError("--watch: the goal names no data; pass --watch PATH (a file or directory)") from None
        goal = parse_goal(f"{goal_text} on {watch}", workspace)  # the goal may leave the data to --watch
    if goal.task != "finetune":
        raise InputError("goal: the retraining loop fine-tunes (it warm-starts each round from production); "
                         f"this goal asks to {goal.task}")
    if goal.deploy == "never" or not goal.model_name:
        raise InputError("goal: the loop deploys what passes; say the model's name (e.g. 'deploy as support-bot if it passes')")
    if feedback is not None:
        goal = goal.model_copy(update={"data": str(watch), "format": None})  # the records the feedback makes
        export_feedback(workspace, feedback, goal.objective)
    return goal, watch or Path(goal.data)


# ---- learning from production: the served model's rated answers -----------------------------------------------


def feedback_path(workspace: Path) -> Path:
    return loop_dir(workspace) / "feedback.jsonl"


def export_feedback(workspace: Path, model: str, objective: str) -> tuple[int, dict[str, dict]]:
    """Write `model`'s rated answers as training records for `objective` (`serving.feedback.training_records`) to
    the feedback loop's watched file, and return (how many records, the rates by version). The file is rewritten
    only when its records changed, so its signature moves with new feedback alone; records keep their content
    ids through curation, so the pool knows which ones a round has taken."""
    from serving.feedback import read_feedback, stats, training_records
    from training.atomic import write_text_atomic

    rows = read_feedback(workspace, model)
    records = training_records(rows, objective)
    text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)
    path = feedback_path(workspace)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        write_text_atomic(path, text)
    return len(records), stats(rows)


def seed_pool(workspace: Path, goal: Goal) -> int:
    """A new loop on a model already in production: the records production was trained on (its lineage's
    dataset) enter the pool as used, so only records it never saw trigger and feed a round. Returns how many."""
    from training.batches import read_split
    from training.data.store import datasets_dir

    version, path = production(workspace, goal)
    if version is None or read_pool(workspace) or goal.data == str(feedback_path(workspace)):
        return 0  # a feedback loop's stream is production's own traffic, not the data production was trained on
    dataset = json.loads((Path(path) / "lineage.json").read_text(encoding="utf-8")).get("dataset")
    if not dataset or not (datasets_dir(workspace) / dataset).is_dir():
        return 0
    entries = [{"id": row["id"], "split": split, "record": {k: v for k, v in row.items() if k != "id"}, "round": 0,
                "status": "used"} for split in ("train", "val", "test") for row in read_split(datasets_dir(workspace) / dataset, split)]
    add_to_pool(workspace, entries)
    return len(entries)


def round_dir(workspace: Path, r: Round) -> Path:
    return loop_dir(workspace) / "rounds" / f"{r.number:04d}"


def round_goal(workspace: Path, state: LoopState, r: Round) -> Goal:
    """The loop's goal, on this round's data."""
    return state.goal.model_copy(update={"data": str(round_dir(workspace, r) / "data.jsonl")})


# ---- the check: is there a reason for a round? ------------------------------------------------------


def start_round(workspace: Path, state: LoopState, pool: dict[str, dict], say) -> Round | None:
    """A new round when something triggers one (its data written), else None."""
    triggers, new, route, detail = find_triggers(workspace, state, pool, say)
    if not triggers and route != "rollback":
        return None
    number = (state.rounds[-1].number if state.rounds else 0) + 1
    r = Round(number=number, route=route, triggers=triggers, started_at=now(), signature=detail["signature"],
              run_id=f"loop-r{number:03d}-{datetime.now().strftime('%Y%m%d-%H%M%S')}", newest=detail["newest"],
              production_before=detail["production"], new_records=len(new))
    if route == "retrain":
        if "current" in detail:
            pool = {k: e for k, e in pool.items() if k in detail["current"]}
        write_round_data(workspace, state, r, new, pool)
    return r


def find_triggers(workspace: Path, state: LoopState, pool: dict[str, dict], say):
    """(triggers, new records, route, detail): manual and scheduled requests, new data, drift, regression."""
    from memory.store import MemoryStore

    s = state.settings
    triggers: list[Trigger] = []
    manual = pending(workspace, "trigger")
    if manual is not None:
        triggers.append(Trigger(kind="manual", detail=manual.get("reason") or "modelcrew loop trigger"))
    due = bool(s.schedule_s and state.last_round_at and
               time.time() - datetime.fromisoformat(state.last_round_at).timestamp() >= s.schedule_s)
    if due:
        triggers.append(Trigger(kind="schedule", detail=f"no round for {s.schedule_s:g} s"))
    detail = {"signature": "", "newest": {}, "production": None}
    if s.feedback:
        try:
            count, state.feedback_rates = export_feedback(workspace, s.feedback, state.goal.objective)
        except InputError as err:  # nothing recorded yet, or a feedback file a person broke: wait for it
            say(f"the recorded feedback cannot be used yet: {err}")
            return [], [], "retrain", detail
        if not count:
            say(f"no rated answers of {s.feedback} to learn from yet")
            return [], [], "retrain", detail
    signature = detail["signature"] = source_signature(s.watch)
    new: list[dict] = []
    if signature != state.source_signature or triggers:
        try:
            watched = read_watched(s, state.goal)
            new = [e for e in watched if e["id"] not in pool]
            if s.feedback:  # a re-rated answer's earlier record is superseded: neither replayed nor evaluated on
                detail["current"] = {e["id"] for e in watched}
        except InputError as err:  # a malformed delivery: say so and wait for a fix, losing nothing
            say(f"the watched data cannot be used yet: {err}")
            return [], [], "retrain", detail
        if not new and triggers and not any(e["status"] == "used" for e in pool.values()):
            say("a round was asked for, but there is no data to train on yet")
            clear(workspace, "trigger")
            return [], [], "retrain", detail
        if not new and signature != state.source_signature:
            say("the watched data changed but holds no new records (a re-delivered copy?): no round")
            state.source_signature = signature
    route = "retrain"
    if s.feedback and new and len(new) < s.min_feedback and not triggers:
        say(f"{len(new)} new training records from {s.feedback}'s feedback; a round waits for {s.min_feedback}")
        return [], [], "retrain", detail
    if new:
        triggers.insert(0, Trigger(kind="data", detail=f"{len(new)} new records", value=len(new)))
        old = [e["record"] for e in pool.values() if e["status"] == "used"]
        shifted = False
        if old:
            distance = MemoryStore(workspace).centroid_distance([e["record"] for e in new], old)
            shifted = distance >= s.drift_distance
            if shifted:
                triggers.append(Trigger(kind="drift", value=distance, detail=(
                    f"the new records' embedding centroid is {distance:.3f} from the training data's "
                    f"(threshold {s.drift_distance:g})")))
        # On data unlike anything trained on, every version is poor and retraining is the remedy:
        # a rollback is only considered when the new records resemble the training data. Never in a feedback
        # loop: its new records are what users rated and wrote, and a rollback moves production without a gate,
        # so whoever rates could move it (answers rated against the rule would roll a good version back).
        route = check_production(workspace, state, new, triggers, detail, consider_rollback=not shifted and not s.feedback)
    return triggers, new, route, detail


def check_production(workspace: Path, state: LoopState, new: list[dict], triggers: list[Trigger], detail: dict,
                     consider_rollback: bool) -> str:
    """Score production (and the previous version) on the newest records: drift by metric, or rollback."""
    from serving.registry import Registry
    from training.evaluate import perplexity_on

    version, path = production(workspace, state.goal)
    if version is None:
        return "retrain"
    name = state.goal.model_name
    detail["production"] = f"{name} {version.version}"
    records = [e["record"] for e in new]
    fmt, seq_len = format_and_seq_len(workspace, path)
    fmt = new[0].get("format", fmt)  # the new records as curated (production may have learned from another format)
    if fmt in PREFERENCE:  # pairs and rated answers are not scored by perplexity
        return "retrain"
    ppl = perplexity_on(path, records, fmt, seq_len)
    if ppl is None:
        return "retrain"
    detail["newest"]["production"] = ppl
    recorded = version.metrics.get("test_perplexity") or version.metrics.get("val_perplexity")
    s = state.settings
    if recorded and ppl > recorded * (1 + s.drift_metric):
        triggers.append(Trigger(kind="drift", value=ppl, detail=(
            f"production {version.version}'s perplexity on the newest records is {ppl:.4g}, "
            f"{ppl / recorded - 1:+.0%} from the {recorded:.4g} it was deployed with (margin {s.drift_metric:.0%})")))
    registry = Registry(workspace)
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


def format_and_seq_len(workspace: Path, model_dir: Path) -> tuple[str, int]:
    """The data format and sequence length a registered model was trained with (from its lineage)."""
    lineage = json.loads((Path(model_dir) / "lineage.json").read_text(encoding="utf-8"))
    return load_summary(workspace, lineage["dataset"]).format, int(lineage.get("plan", {}).get("seq_len", 256))


def write_round_data(workspace: Path, state: LoopState, r: Round, new: list[dict], pool: dict[str, dict]) -> None:
    """The round's records: all new ones, every earlier evaluation record, and a replay share of earlier training."""
    s = state.settings
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
    d = round_dir(workspace, r)
    d.mkdir(parents=True, exist_ok=True)
    write_jsonl(d / "data.jsonl", [e["record"] for e in taken + old_eval + replayed])
    write_jsonl(d / "new.jsonl", new)
    r.replayed, r.eval_records = len(replayed), len(old_eval)


def new_records(workspace: Path, r: Round) -> list[dict]:
    path = round_dir(workspace, r) / "new.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


# ---- after the evaluation ----------------------------------------------------------------------------


def measure_heldout(workspace: Path, state: LoopState, r: Round, model_dir: Path, fmt: str, seq_len: int) -> None:
    """Candidate's and production's perplexity on the new records nobody trained on (for the loop report)."""
    from training.evaluate import perplexity_on

    held_out = [e["record"] for e in new_records(workspace, r) if e["split"] != "train"]
    if not held_out or fmt in PREFERENCE:  # pairs and rated answers are not scored by perplexity
        return
    r.newest["candidate_heldout"] = perplexity_on(Path(model_dir), held_out, fmt, seq_len)
    version, path = production(workspace, state.goal)
    if version is not None:
        r.newest["production_heldout"] = perplexity_on(path, held_out, fmt, seq_len)


def harmful(workspace: Path, r: Round) -> bool:
    """Did this round's data make the model worse than production on the same evaluation set, or restate
    earlier evaluation records? (From the numbers the gate judged, not from the wording of its reasons.)"""
    if r.passed or r.candidate is None:
        return False
    old = r.production_value
    worse = old is not None and (r.candidate > old if lower_is_better(r.metric) else r.candidate < old)
    return worse or bool(load_contamination(workspace, r.dataset))


def close_round(workspace: Path, state: LoopState, r: Round, status: str, record=None) -> None:
    """Record the round's records in the pool (used, quarantined or failed), its deployment (`record()`, for a
    finished retraining round), move it into the history, and re-render the loop report."""
    from reports.loop import render_loop_report

    if r.route == "retrain":
        entries = new_records(workspace, r)
        if entries:
            kind = "failed" if status == "failed" else ("quarantined" if harmful(workspace, r) else "used")
            add_to_pool(workspace, [{**e, "round": r.number, "status": kind} for e in entries])
        if status == "done" and record is not None:
            record()
    version, _ = production(workspace, state.goal)
    r.production_after = version.version if version else None
    r.status = status  # type: ignore[assignment]
    r.finished_at = now()
    state.rounds.append(r)
    state.current = None
    if r.route == "retrain":
        state.source_signature = r.signature or state.source_signature
    else:  # a rollback round leaves its new records to the next round, which comes at once
        state.recheck = True
    state.last_round_at = r.finished_at
    clear(workspace, "trigger")
    render_loop_report(workspace, state)
