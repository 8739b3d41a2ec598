"""The production-feedback flywheel, closed: served answers, scripted users' ratings and corrections, a loop round
that trains on them, a better version served; and a round fed adversarial ratings, refused by the gate.

The rule has a right answer: a support answer must give the step its question asks for (an error code: unplug; a
reset: reset; a part that stopped working: reseat; options: where they are). Version 1 was trained on an older,
generic answer ("Thanks for ticket ...: our team will get back to you.") that gives no step. Users ask through the
official `openai` client against a real uvicorn server started with record on, rate every answer by the rule over
POST /v1/feedback and correct three in four of the bad ones with the answer it should have been. The retraining loop
(`--feedback support-bot`) turns that into the next version; the server follows the registry to it.

(A rule that asks the answer to copy the ticket's random id, as a person would, is out of a 0.8M-parameter model's
reach in seconds of training: tests/test_loop.py's ticket base repeats the templates, not the ids.)
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai

from crews.loop import run_loop
from crews.loop_policy import feedback_path
from crews.loop_state import LoopSettings, read_pool
from serving.feedback import read_feedback, stats
from serving.registry import Registry
from serving.server import create_app
from tests.helpers import ticket_rows, write_jsonl
from tests.test_serving import Server
from training.contracts import Budget, TrainPlan
from training.data import curate_to_workspace
from training.loop import train

KEY = "sekret"
MODEL = "support-bot"


# the step each kind of question asks for (examples/tickets.py's TEMPLATES), as the answer must say it
STEPS = {"shows error": "unplug the", "how can I reset": "to reset the", "stopped working": "reseat the",
         "where are the": "options of the"}


def step(question: str) -> str:
    return next(words for kind, words in STEPS.items() if kind in question)


def generic(row: dict) -> str:
    """The older answer style: no step at all."""
    return f"Thanks for {row['question'].split(':')[0].lower()}: our team will get back to you."


def ask(client: openai.OpenAI, rows: list[dict]) -> list[tuple[dict, object]]:
    """Each question as a user would ask it, several users at once (greedy answers: the same model answers the
    same way)."""
    def one(row):
        return row, client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": row["question"]}],
                                                   max_tokens=64, temperature=0)
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, rows))


def good(row: dict, completion) -> bool:
    return step(row["question"]) in completion.choices[0].message.content


def rate_of_good(asked) -> float:
    return sum(good(row, c) for row, c in asked) / len(asked)


def honest(i: int, row: dict, completion) -> tuple[int, str | None]:
    if good(row, completion):
        return 1, None
    return -1, (row["answer"] if i % 4 else None)  # three in four bad answers get corrected


def adversarial(i: int, row: dict, completion) -> tuple[int, str | None]:
    """Good answers rated bad and "corrected" to the old style; bad answers rated good."""
    return (-1, generic(row)) if good(row, completion) else (1, None)


def rate(server: Server, asked, judge) -> None:
    for i, (row, completion) in enumerate(asked):
        rating, correction = judge(i, row, completion)
        body = {"id": completion.id, "rating": rating, **({"correction": correction} if correction else {})}
        answer = httpx.post(server.url + "/v1/feedback", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
        assert answer.status_code == 200, answer.text


def test_a_feedback_round_serves_a_better_version_and_adversarial_ratings_are_refused(ticket_model, tmp_path, cli):
    ws = tmp_path / "ws"
    ws.mkdir()
    old = write_jsonl(tmp_path / "old.jsonl", [{"question": r["question"], "answer": generic(r)}
                                               for r in ticket_rows(80, seed=1)])
    # version 1: full fine-tuned on the old answers at 3e-4 (the crew's default for a full fine-tune, 5e-5, leaves
    # the base's answers in place in 150 steps), put in production by a person
    fp = curate_to_workspace(str(old), ws).summary.fingerprint
    v1 = train(TrainPlan(task="finetune", dataset=fp, base_model=str(ticket_model), method="full", lr=3e-4,
                         batch_size=8, seq_len=128, warmup_steps=5, budget=Budget(steps=150), eval_every=1000,
                         eval_batches=1, checkpoint_every=1000), ws, "old-style", show_progress=False)
    registry = Registry(ws)
    registry.register(MODEL, Path(v1.final_dir))
    assert registry.promote(MODEL, "v1", force=True, reason="in production before the loop").allowed

    settings = LoopSettings(goal_text=f"fine-tune the model {ticket_model} with a full fine-tune for 150 steps, "
                                      f"deploy as {MODEL} if it passes",
                            watch=str(feedback_path(ws)), feedback=MODEL, min_feedback=20, replay=0.2, every_s=1)
    said: list[str] = []
    app = create_app(f"{MODEL}@production", ws, api_key=KEY, record=True)
    with Server(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        fresh = ticket_rows(40, seed=3)  # questions nobody rates: each version's rate of good answers
        before = ask(client, fresh)
        users = ask(client, ticket_rows(60, seed=2))
        assert all(c.model == MODEL for _, c in users)

        # a few ratings are not yet a round
        rate(server, users[:6], honest)
        state = run_loop(ws, settings, once=True, echo=said.append)
        assert state.rounds == [] and "a round waits for 20" in said[-1], said[-3:]

        rate(server, users[6:], lambda i, row, c: honest(i + 6, row, c))
        rows = read_feedback(ws, MODEL)
        expected = stats(rows)["support-bot@v1"]
        state = run_loop(ws, settings, once=True, echo=said.append)
        r = state.rounds[-1]
        assert r.status == "done" and r.triggers[0].kind == "data" and r.warm_start == f"{MODEL} v1", (r, said[-5:])
        assert r.passed and r.deployed == "v2", r.reasons
        # corrections and good answers, as chat records, are what the round trained on
        corrected = sum(1 for x in rows if x["correction"]) + sum(1 for x in rows if x["rating"] == 1)
        assert r.new_records == corrected
        assert state.feedback_rates["support-bot@v1"] == expected

        # the server follows the registry to v2; v2 answers the fresh questions better than v1 did
        swap = app.state.slot.follow()
        assert swap is not None
        swap.result(timeout=120)
        after = ask(client, fresh)
        versions = {x["id"]: x["version"] for x in read_feedback(ws, MODEL)}
        assert {versions[c.id] for _, c in before} == {"support-bot@v1"}
        assert {versions[c.id] for _, c in after} == {"support-bot@v2"}
        v1_rate, v2_rate = rate_of_good(before), rate_of_good(after)
        assert v2_rate >= v1_rate + 0.3, (v1_rate, v2_rate, [(r["question"], c.choices[0].message.content)
                                                               for (r, c) in (before[:3] + after[:3])])

        # adversarial users: v2's good answers rated bad and "corrected" to the old style, bad ones rated good
        attack = ask(client, ticket_rows(60, seed=4))
        assert rate_of_good(attack) > 0.5
        rate(server, attack, adversarial)
        state = run_loop(ws, settings, once=True, echo=said.append)

    r = state.rounds[-1]
    assert r.number == 2 and r.status == "done" and r.passed is False and r.deployed is None, (r, said[-5:])
    assert r.candidate > r.production_value  # worse on the fixed evaluation set (round 1's held-out feedback)
    assert any(reason.startswith("production:") and "NOT met" in reason for reason in r.reasons), r.reasons
    assert Registry(ws).state(MODEL).aliases["production"] == "v2"
    assert {e["status"] for e in read_pool(ws).values() if e["round"] == 2} == {"quarantined"}

    # the loop report shows the rate of good answers by version
    md = (ws / "loop" / "report.md").read_text()
    assert "Production feedback on support-bot, by version" in md
    v1 = state.feedback_rates["support-bot@v1"]
    assert f"| support-bot@v1 | {v1['completions']} | {v1['rated']} | {v1['good']} |" in md
    assert "| support-bot@v2 |" in md
    status = cli("loop", "status", "--workspace", ws)
    assert status.exit_code == 0, status.stderr
    assert (f"feedback on support-bot@v1: {v1['completions']} answers, {v1['rated']} rated, "
            f"{v1['good_rate']:.0%} good, {v1['corrected']} corrected") in status.stdout


def test_a_feedback_loop_refuses_bad_input_in_one_line(cli, tmp_path):
    ws = tmp_path / "ws"
    goal = "fine-tune the model smollm2-135m-instruct for 10 steps, deploy as support-bot if it passes"
    result = cli("loop", "start", goal, "--feedback", MODEL, "--workspace", ws)
    assert result.exit_code == 2 and "no completions recorded for 'support-bot'" in result.stderr
    assert "serve it with --record" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    result = cli("loop", "start", goal, "--feedback", MODEL, "--watch", inbox, "--workspace", ws)
    assert result.exit_code == 2 and "give --watch or --feedback" in result.stderr
    result = cli("loop", "start", goal, "--feedback", "../etc", "--workspace", ws)
    assert result.exit_code == 2 and "--feedback" in result.stderr
    assert not (ws / "loop" / "state.json").exists()


def test_rated_answers_become_the_records_each_objective_trains_on(tmp_path):
    """From the server's own store on disk to curated datasets: SFT pairs, DPO pairs and KTO labels."""
    from serving.feedback import FeedbackStore, training_records
    from training.data import curate

    store = FeedbackStore(tmp_path, MODEL)
    chat = lambda i, q: {"id": f"chatcmpl-{i}", "index": 0, "created": "2026-12-02T00:00:00.000+00:00", "model": MODEL,  # noqa: E731
                         "version": "support-bot@v1", "kind": "chat", "messages": [{"role": "user", "content": q}],
                         "answer": f"answer {i}", "finish_reason": "stop", "usage": {}}
    store.record([chat(i, f"question {i}: mail me at ann@example.com") for i in range(6)])
    completion = {k: v for k, v in chat(6, "q").items() if k != "messages"}
    store.record([{**completion, "kind": "completion", "prompt": "The kettle"},
                  {**chat(7, "q"), "tools": [{"type": "function", "function": {"name": "f"}}]}])
    store.add_feedback("chatcmpl-0", 1)                                  # good as it was
    store.add_feedback("chatcmpl-1", -1)                                 # bad, no correction
    store.add_feedback("chatcmpl-2", -1, "the right answer 2")           # bad, corrected
    store.add_feedback("chatcmpl-3", 1, "an even better answer 3")       # good, and improved
    store.add_feedback("chatcmpl-4", -1, "answer 4")                     # a "correction" equal to the answer
    store.add_feedback("chatcmpl-6", -1, " boils water.")                # a completion, corrected
    store.add_feedback("chatcmpl-7", -1, "with a tool")                  # a conversation with tools: left out
    rows = read_feedback(tmp_path, MODEL)                                # chatcmpl-5: unrated, left out

    sft = training_records(rows, "sft")
    assert [r.get("messages", [{}])[-1].get("content", r.get("completion")) for r in sft] == [
        "answer 0", "the right answer 2", "an even better answer 3", " boils water."]
    assert sft[0]["messages"][0]["content"] == "question 0: mail me at <EMAIL>"  # scrubbed when recorded
    assert sft[-1] == {"prompt": "The kettle", "completion": " boils water."}
    dpo = training_records(rows, "dpo")
    assert [(r["chosen"], r["rejected"]) for r in dpo] == [("the right answer 2", "answer 2"),
                                                           ("an even better answer 3", "answer 3"),
                                                           (" boils water.", "answer 6")]
    assert dpo[-1]["prompt"] == [{"role": "user", "content": "The kettle"}]
    kto = training_records(rows, "kto")
    assert [(r["completion"], r["label"]) for r in kto] == [
        ("answer 0", True), ("answer 1", False), ("answer 2", False), ("the right answer 2", True), ("answer 3", True),
        ("an even better answer 3", True), ("answer 4", False), ("answer 6", False), (" boils water.", True)]

    # the curator reads each as its format
    for objective, records, fmt in (("sft", sft[:3], "chat"), ("dpo", dpo, "preference"), ("kto", kto, "feedback")):
        summary = curate(str(write_jsonl(tmp_path / f"{objective}.jsonl", records))).summary
        assert (summary.format, summary.records_after) == (fmt, len(records)), objective


def test_a_re_rated_answer_replaces_its_earlier_record_in_the_next_round(tmp_path):
    """A person changes a rating (a thumbs-down given by mistake, a better correction): the next round trains and
    evaluates on the latest rating only, never replaying the record the earlier one made."""
    import json

    from crews.loop_policy import round_dir, start_round
    from crews.loop_state import LoopState, add_to_pool
    from serving.feedback import FeedbackStore
    from training.contracts import Goal

    store = FeedbackStore(tmp_path, MODEL)
    rows = ticket_rows(30, seed=5)
    store.record([{"id": f"chatcmpl-{i}", "index": 0, "created": "2026-12-02T00:00:00.000+00:00", "model": MODEL,
                   "version": "support-bot@v1", "kind": "chat", "messages": [{"role": "user", "content": r["question"]}],
                   "answer": r["answer"], "finish_reason": "stop", "usage": {}} for i, r in enumerate(rows)])
    for i in range(30):
        store.add_feedback(f"chatcmpl-{i}", 1)
    goal = Goal(task="finetune", data=str(feedback_path(tmp_path)), base_model="smollm2-135m-instruct", method="full",
                metric="perplexity", deploy="if_passed", model_name=MODEL)
    state = LoopState(settings=LoopSettings(goal_text="g", watch=str(feedback_path(tmp_path)), feedback=MODEL,
                                            min_feedback=5, replay=0.9), goal=goal)
    said: list[str] = []
    first = start_round(tmp_path, state, read_pool(tmp_path), said.append)
    assert first is not None and first.new_records == 30, said
    taken = [json.loads(line) for line in (round_dir(tmp_path, first) / "new.jsonl").read_text().splitlines()]
    add_to_pool(tmp_path, [{**e, "round": 1, "status": "used"} for e in taken])  # as closing the round does
    state.rounds.append(first)
    state.source_signature = first.signature

    # answers 0-5 re-rated: wrong after all, with a correction each
    for i in range(6):
        store.add_feedback(f"chatcmpl-{i}", -1, f"Corrected answer {i}.")
    second = start_round(tmp_path, state, read_pool(tmp_path), said.append)
    assert second is not None and second.new_records == 6, said
    data = [json.loads(line) for line in (round_dir(tmp_path, second) / "data.jsonl").read_text().splitlines()]
    answers = [r["messages"][-1]["content"] for r in data]
    assert {f"Corrected answer {i}." for i in range(6)} <= set(answers)
    assert not {rows[i]["answer"] for i in range(6)} & set(answers)  # the superseded records: gone
    assert {rows[i]["answer"] for i in range(6, 30)} & set(answers)  # the others: replayed or evaluated on
