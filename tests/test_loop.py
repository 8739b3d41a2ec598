"""The retraining loop end to end on a tiny model: a stream of deliveries, a rollback, kill -9, two loops.

The tiny base is pretrained on support tickets whose answers copy random ticket ids and codes from their
questions, so a model trained on the data relies on its questions, and a batch with shuffled answers
(poisoned) makes a candidate measurably worse on the fixed evaluation set.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from crews.loop import run_loop
from crews.loop_state import LoopSettings, load_state, pending, read_pool, request
from serving.registry import Registry
from tests.helpers import poisoned, shifted_rows, ticket_rows, write_jsonl
from training.batches import read_split
from training.contracts import Evaluation, GateVerdict
from training.data.store import datasets_dir
from training.runs import Run

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def base(ticket_model) -> Path:
    """A tiny model that has learned the tickets' chat format and templates (conftest)."""
    return ticket_model


def goal(base: Path, steps: int = 60) -> str:
    return f"fine-tune the model {base} with a full fine-tune for {steps} steps, deploy as desk-bot if it passes"


def split_ids(ws: Path, fingerprint: str, splits=("val", "test")) -> set[str]:
    return {r["id"] for s in splits for r in read_split(datasets_dir(ws) / fingerprint, s)}


def noisy_copy(model_dir: Path, target: Path) -> Path:
    """A broken version of a model: its weights with loud noise (what a bad hotfix might ship)."""
    shutil.copytree(model_dir, target)
    weights = load_file(target / "model.safetensors")
    torch.manual_seed(0)
    save_file({k: v + 0.5 * torch.randn_like(v) if v.is_floating_point() else v for k, v in weights.items()},
              target / "model.safetensors", metadata={"format": "pt"})
    return target


def test_a_stream_of_deliveries_rounds_rejections_drift_and_rollback(base, tmp_path):
    ws, watch = tmp_path / "ws", tmp_path / "inbox"
    watch.mkdir()
    settings = LoopSettings(goal_text=goal(base), watch=str(watch), every_s=1, replay=0.2)
    said: list[str] = []

    def check():
        return run_loop(ws, settings, once=True, echo=said.append)

    # three batches -> three rounds, each started by its data, each better than production on the fixed set
    for i in (1, 2, 3):
        write_jsonl(watch / f"batch{i}.jsonl", ticket_rows(40, seed=i))
        state = check()
        assert len(state.rounds) == i
        r = state.rounds[-1]
        assert r.status == "done" and r.triggers[0].kind == "data" and r.new_records == 40
    assert [r.deployed for r in state.rounds] == ["v1", "v2", "v3"]
    assert all(r.candidate < r.production_value for r in state.rounds[1:])
    first, second, third = state.rounds
    # later rounds start from production's weights and replay a share of earlier training data
    assert first.warm_start is None and first.replayed == 0
    assert second.warm_start == "desk-bot v1" and second.replayed > 0 and third.warm_start == "desk-bot v2"
    plan = json.loads((ws / "runs" / second.run_id / "plan.json").read_text())
    assert plan["init_from"] == str(Registry(ws).resolve("desk-bot@v1")[2])
    # the hash split keeps every earlier evaluation record in the evaluation set
    assert split_ids(ws, first.dataset) <= split_ids(ws, third.dataset)
    assert split_ids(ws, first.dataset, ("test",)) <= split_ids(ws, third.dataset, ("test",))
    # no in-domain batch counted as drift
    assert not any(t.kind == "drift" for r in state.rounds for t in r.triggers)

    # a re-delivered copy of an old batch is no change
    shutil.copy(watch / "batch1.jsonl", watch / "batch1-again.jsonl")
    state = check()
    assert len(state.rounds) == 3 and "no new records" in said[-1]

    # a poisoned batch (answers shuffled between questions): candidate rejected, production unchanged
    write_jsonl(watch / "batch4.jsonl", poisoned(ticket_rows(40, seed=4)))
    state = check()
    r = state.rounds[-1]
    assert r.number == 4 and r.passed is False and r.deployed is None
    assert r.candidate > r.production_value
    assert any(reason.startswith("production:") and "NOT met" in reason for reason in r.reasons)
    assert Registry(ws).state("desk-bot").aliases["production"] == "v3" and r.production_after == "v3"
    assert {e["status"] for e in read_pool(ws).values() if e["round"] == 4} == {"quarantined"}  # never replayed

    # a person ships a broken version; production on the next in-domain batch is worse than previous: rollback
    registry = Registry(ws)
    _, v3, v3_dir = registry.resolve("desk-bot@production")
    broken = registry.register("desk-bot", noisy_copy(v3_dir, tmp_path / "hotfix"),
                               Evaluation.model_validate_json((ws / "runs" / v3.run_id / "evaluation.json").read_text()),
                               GateVerdict.model_validate_json((ws / "runs" / v3.run_id / "gate.json").read_text()))
    assert registry.promote("desk-bot", broken.version, force=True, reason="hotfix").allowed
    write_jsonl(watch / "batch5.jsonl", ticket_rows(40, seed=5))
    state = check()
    r = state.rounds[-1]
    assert r.route == "rollback" and r.rolled_back == f"{broken.version} -> v3" and r.production_after == "v3"
    assert any("worse than previous v3" in t.detail for t in r.triggers)
    assert Registry(ws).state("desk-bot").aliases["production"] == "v3"
    # the records that showed the regression are trained on in the next round, from the restored production
    state = check()
    r = state.rounds[-1]
    assert r.route == "retrain" and r.new_records == 40 and r.warm_start == "desk-bot v3"

    # a batch from another domain: drift
    write_jsonl(watch / "batch6.jsonl", shifted_rows(40, seed=6))
    state = check()
    r = state.rounds[-1]
    drift = [t for t in r.triggers if t.kind == "drift" and "centroid" in t.detail]
    assert drift and drift[0].value >= settings.drift_distance

    # a person asks for a round and the schedule is due: a round without new data retrains on what the loop has
    request(ws, "trigger", "new product launch")
    time.sleep(1.1)
    state = run_loop(ws, settings.model_copy(update={"schedule_s": 1.0, "max_rounds": 1}), echo=said.append)
    r = state.rounds[-1]
    assert [t.kind for t in r.triggers] == ["manual", "schedule"] and r.triggers[0].detail == "new product launch"
    assert r.new_records == 0 and r.replayed > 0 and r.status == "done"
    assert pending(ws, "trigger") is None  # answered

    # the loop report: self-contained, one row per round, with the plot
    html = (ws / "loop" / "report.html").read_text()
    assert "data:image/png;base64," in html and "src=\"http" not in html
    for r in state.rounds:
        assert f"<td>{r.number}</td>" in html
    assert "rolled back" in html and "rejected" in html
    md = (ws / "loop" / "report.md").read_text()
    assert "| 4 |" in md and "drift" in md


def test_a_loop_without_memory_tries_the_next_learning_rate_after_a_miss(base, tmp_path):
    ws, watch = tmp_path / "ws", tmp_path / "inbox"
    unreachable = (f"fine-tune the model {base} with a full fine-tune for 4 steps so that perplexity ends at least 90% "
                   "below the base model, deploy as desk-bot if it passes")
    settings = LoopSettings(goal_text=unreachable, watch=str(watch), every_s=1, use_memory=False)
    for i in (1, 2, 3):
        write_jsonl(watch / f"batch{i}.jsonl", ticket_rows(40, seed=i))
        state = run_loop(ws, settings, once=True, echo=lambda line: None)
    assert [r.passed for r in state.rounds] == [False, False, False]
    plans = [Run(ws, r.run_id).plan() for r in state.rounds]
    # the defaults, then x3 after each miss of this loop's own rounds, though it sees no earlier run in memory
    assert [p.lr for p in plans] == pytest.approx([5e-5, 1.5e-4, 3e-4])
    assert [Run(ws, r.run_id).memory_used() for r in state.rounds] == [None, None, None]


def _cli(ws: Path, *args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "MODELCREW_WORKSPACE": str(ws), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "cli", "loop", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_kill_9_mid_round_resumes_it_and_a_second_loop_is_refused(base, tmp_path):
    ws, watch = tmp_path / "ws", tmp_path / "inbox"
    write_jsonl(watch / "batch1.jsonl", ticket_rows(40, seed=1))
    first = _cli(ws, "start", goal(base, steps=300), "--watch", str(watch), "--once")
    deadline = time.monotonic() + 240
    checkpoints = []
    while time.monotonic() < deadline and not checkpoints:
        checkpoints = list(ws.glob("runs/loop-r001-*/checkpoints/*"))
        time.sleep(0.05)
    assert checkpoints, "the first loop never reached training"

    second = _cli(ws, "start", goal(base), "--watch", str(watch), "--once")
    _, err = second.communicate(timeout=60)
    assert second.returncode == 1 and f"another loop is already running on {ws}: pid {first.pid}" in err

    first.send_signal(signal.SIGKILL)  # mid-training
    first.wait(timeout=30)
    state = load_state(ws)
    assert state.current is not None and state.current.steps == ["curate"] and not state.rounds

    resumed = _cli(ws, "start", "--once")
    _, err = resumed.communicate(timeout=400)
    assert resumed.returncode == 0, err
    assert "round 1: continuing after curate" in err
    state = load_state(ws)
    assert len(state.rounds) == 1 and state.current is None
    r = state.rounds[0]
    assert r.steps == ["curate", "train", "evaluate", "deploy", "report"] and r.status == "done"
    runs = list(ws.glob("runs/loop-*"))
    assert [p.name for p in runs] == [r.run_id]  # one run for the round: not trained again from scratch
    steps = [json.loads(line)["step"] for line in (runs[0] / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == sorted(set(steps)) and steps[-1] == json.loads((runs[0] / "result.json").read_text())["steps"]

    # a running loop (waiting between checks) is seen by status and ends on `loop stop`
    running = _cli(ws, "start", "--every", "1h")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and load_state(ws).checks < 2:
        time.sleep(0.2)
    status = _cli(ws, "status")
    out, _ = status.communicate(timeout=60)
    assert f"running (pid {running.pid}" in out
    stop = _cli(ws, "stop")
    _, err = stop.communicate(timeout=60)
    assert stop.returncode == 0 and "stop requested" in err
    out, _ = running.communicate(timeout=30)
    assert running.returncode == 0 and "loop stopped after 1 rounds" in out

    # a finished loop: status shows the round, trigger asks for one, stop needs a running loop
    status = _cli(ws, "status")
    out, _ = status.communicate(timeout=60)
    assert status.returncode == 0 and "not running" in out and "round 1 " in out
    trigger = _cli(ws, "trigger", "--reason", "new product launch")
    _, err = trigger.communicate(timeout=60)
    assert trigger.returncode == 0 and "the next `modelcrew loop start` starts it" in err
    assert json.loads((ws / "loop" / "requests" / "trigger").read_text())["reason"] == "new product launch"
    stop = _cli(ws, "stop")
    _, err = stop.communicate(timeout=60)
    assert stop.returncode == 2 and "no loop is running" in err


def test_loop_commands_refuse_bad_input_in_one_line(cli, tmp_path):
    ws = tmp_path / "ws"
    goal_without_data = "fine-tune smollm2-135m-instruct with LoRA, deploy as desk-bot if it passes"
    cases = [
        (["loop", "start", goal_without_data], "error: --watch: the goal names no data; pass --watch PATH"),
        (["loop", "start", goal_without_data, "--watch", str(tmp_path), "--every", "5x"],
         "error: --every: expected a duration like 90s, 15m, 1h or 2d, got '5x'"),
        (["loop", "start", "fine-tune smollm2-135m-instruct with LoRA", "--watch", str(tmp_path / "absent")],
         f"error: --watch: {tmp_path / 'absent'} does not exist"),
        (["loop", "status"], f"error: no loop has run on {ws}"),
        (["loop", "stop"], f"error: no loop is running on {ws}"),
    ]
    for args, message in cases:
        result = cli(*args, "--workspace", str(ws))
        assert result.exit_code == 2 and result.stderr.startswith(message), (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1


def test_a_malformed_delivery_starts_no_round_and_leaves_nothing_half_written(tmp_path):
    ws, watch = tmp_path / "ws", tmp_path / "inbox"
    watch.mkdir()
    (watch / "batch1.jsonl").write_text('{"question": "Is it on?", "answer": "Yes."}\n{"question": "broken\n', encoding="utf-8")
    said: list[str] = []
    settings = LoopSettings(goal_text="fine-tune smollm2-135m-instruct with LoRA, deploy as desk-bot if it passes",
                            watch=str(watch), every_s=1)
    state = run_loop(ws, settings, once=True, echo=said.append)
    assert state.rounds == [] and state.current is None and state.checks == 1
    assert any(f"the watched data cannot be used yet: {watch / 'batch1.jsonl'}:2:" in line for line in said), said
    assert not (ws / "loop" / "rounds").exists() and not (ws / "loop" / "pool.jsonl").exists() and not (ws / "runs").exists()


def test_a_loop_on_a_model_in_production_does_not_retrain_on_what_production_learned(base, tmp_path):
    from crews.run import run_goal_text

    ws, watch = tmp_path / "ws", tmp_path / "inbox"
    first = write_jsonl(watch / "batch1.jsonl", ticket_rows(40, seed=1))
    crew = run_goal_text(f"fine-tune the model {base} on {first} with a full fine-tune for 60 steps, deploy as desk-bot "
                         "if it passes", ws)  # as `make demo` deploys support-bot before `make loop`
    assert crew["deployment"] == {"model_name": "desk-bot", "version": "v1", "alias": "production"}
    said: list[str] = []
    settings = LoopSettings(goal_text=goal(base), watch=str(watch), every_s=1)
    state = run_loop(ws, settings, once=True, echo=said.append)
    pool = read_pool(ws)
    assert state.rounds == [] and len(pool) == 40 and {e["status"] for e in pool.values()} == {"used"}
    assert any("holds no new records" in line for line in said)  # production's own data is not news
    write_jsonl(watch / "batch2.jsonl", ticket_rows(40, seed=2))
    state = run_loop(ws, None, once=True, echo=said.append)
    assert len(state.rounds) == 1 and state.rounds[0].new_records == 40 and state.rounds[0].triggers[0].kind == "data"
