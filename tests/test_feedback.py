"""Recorded answers and feedback: a real uvicorn server started with record on, the official `openai` client for the
answers, httpx for POST /v1/feedback, the files on disk, and `modelcrew feedback stats` through the CLI.

Tiny models trained by tests/test_serving.py's `ws` fixture are registered as bot v1 and v2 (different weights).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import httpx
import openai
import pytest

from serving.feedback import MAX_CORRECTION_CHARS, FeedbackStore, append_rows, read_feedback, read_rows
from serving.server import create_app
from tests.test_serving import ROOT, Server, ws  # noqa: F401  (ws: the module fixture, shared)
from tests.test_serving_limits import KEY, _client, _events, _home, _slow_steps, _wait_for
from training.errors import InputError


@pytest.fixture(scope="module")
def served(ws, tmp_path_factory):  # noqa: F811
    home = tmp_path_factory.mktemp("recorded")
    _home(ws, home)
    app = create_app("bot@production", home, api_key=KEY, record=True)
    with Server(app) as server:
        yield server, app, home, _client(server)


def _post(server: Server, body, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, bytes):
        return httpx.post(server.url + "/v1/feedback", content=body,
                          headers={**headers, "Content-Type": "application/json"}, timeout=30)
    return httpx.post(server.url + "/v1/feedback", json=body, headers=headers, timeout=30)


def _lines(path: Path) -> list[dict]:
    """The file's rows, read strictly: whole lines only, each one JSON object."""
    data = path.read_bytes()
    assert data.endswith(b"\n")
    return [json.loads(line) for line in data.decode("utf-8").split("\n")[:-1]]


def _hi(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_every_delivered_answer_is_recorded_once_with_its_id_version_and_text(served):
    server, app, home, client = served
    tokenizer = app.state.slot.current.loaded.tokenizer
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How do I descale?"}]
    chat = client.chat.completions.create(model="bot", messages=conversation, max_tokens=8, temperature=0)
    chunks = list(client.chat.completions.create(model="bot", messages=_hi("Where are parts sold?"), max_tokens=8,
                                                 temperature=0, stream=True))
    comp = client.completions.create(model="bot", prompt="The water tank", max_tokens=6, temperature=0)
    cchunks = list(client.completions.create(model="bot", prompt="Brewly", max_tokens=6, temperature=0, stream=True))
    batch = client.completions.create(model="bot", prompt=[[5, 6, 7], [7, 8, 9]], max_tokens=4, temperature=0)
    echo = client.completions.create(model="bot", prompt="coffee", max_tokens=3, temperature=0, echo=True)

    rows = _lines(home / "feedback" / "bot" / "completions.jsonl")
    counts = Counter((r["id"], r["index"]) for r in rows)
    assert set(counts.values()) == {1}  # nothing recorded twice
    by = {(r["id"], r["index"]): r for r in rows}
    ids = [(chat.id, 0), (chunks[0].id, 0), (comp.id, 0), (cchunks[0].id, 0), (batch.id, 0), (batch.id, 1), (echo.id, 0)]
    assert all(key in by for key in ids), (ids, list(by))
    assert len({i for i, _ in ids}) == 6 and all(by[k]["version"] == "bot@v1" and by[k]["model"] == "bot" for k in ids)
    for key in ids:
        created = datetime.fromisoformat(by[key]["created"])
        assert created.tzinfo == timezone.utc and abs((datetime.now(timezone.utc) - created).total_seconds()) < 60

    row = by[(chat.id, 0)]
    assert (row["kind"], row["messages"], row["answer"], row["finish_reason"]) == (
        "chat", conversation, chat.choices[0].message.content, chat.choices[0].finish_reason)
    assert row["usage"] == {"prompt_tokens": chat.usage.prompt_tokens, "completion_tokens": chat.usage.completion_tokens,
                            "total_tokens": chat.usage.total_tokens}
    row = by[(chunks[0].id, 0)]
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert (row["kind"], row["messages"], row["answer"]) == ("chat", _hi("Where are parts sold?"), streamed)
    assert row["finish_reason"] == [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason][0]
    row = by[(comp.id, 0)]
    assert (row["kind"], row["prompt"], row["answer"], row["finish_reason"]) == (
        "completion", "The water tank", comp.choices[0].text, comp.choices[0].finish_reason)
    row = by[(cchunks[0].id, 0)]
    assert (row["prompt"], row["answer"]) == ("Brewly", "".join(c.choices[0].text for c in cchunks))
    # a batch of prompts: one row per prompt (token ids as text), each with its choice's text and its own usage
    first, second = by[(batch.id, 0)], by[(batch.id, 1)]
    assert (first["prompt"], second["prompt"]) == (tokenizer.decode([5, 6, 7]), tokenizer.decode([7, 8, 9]))
    assert [first["answer"], second["answer"]] == [c.text for c in batch.choices]
    assert first["usage"]["prompt_tokens"] == second["usage"]["prompt_tokens"] == 3
    assert first["usage"]["completion_tokens"] + second["usage"]["completion_tokens"] == batch.usage.completion_tokens
    # echo: the client gets prompt + answer; the record keeps the answer (the prompt is its own field)
    assert echo.choices[0].text == "coffee" + by[(echo.id, 0)]["answer"]


def test_personal_data_is_scrubbed_before_it_is_written(served, tmp_path):
    server, _, home, client = served
    said = "Write to jane.doe@example.com or call +1 415 555 0199 about card 4111 1111 1111 1111."
    chat = client.chat.completions.create(model="bot", messages=_hi(said), max_tokens=4)
    comp = client.completions.create(model="bot", prompt="mail bob@corp.io", max_tokens=2)
    answer = _post(server, {"id": chat.id, "rating": -1, "correction": "Ask support@brewly.com or 10.1.2.3."})
    assert answer.status_code == 200, answer.text
    assert answer.json()["correction"] == "Ask <EMAIL> or <IP>."
    folder = home / "feedback" / "bot"
    rows = {r["id"]: r for r in _lines(folder / "completions.jsonl")}
    assert rows[chat.id]["messages"][0]["content"] == "Write to <EMAIL> or call <PHONE> about card <CARD>."
    assert rows[comp.id]["prompt"] == "mail <EMAIL>"
    assert _lines(folder / "feedback.jsonl")[-1]["correction"] == "Ask <EMAIL> or <IP>."
    written = (folder / "completions.jsonl").read_bytes() + (folder / "feedback.jsonl").read_bytes()
    for raw in (b"jane.doe", b"555 0199", b"4111 1111", b"bob@corp", b"support@brewly", b"10.1.2.3"):
        assert raw not in written
    # the answer and tool-call arguments too (the tiny model will not say an address: the store is given one)
    store = FeedbackStore(tmp_path, "bot")
    store.record([{"id": "chatcmpl-x", "index": 0, "version": "bot@v1", "kind": "chat", "answer": "Call 415-555-0199.",
                   "messages": [{"role": "assistant", "content": None, "tool_calls": [
                       {"id": "c1", "type": "function", "function": {"name": "mail", "arguments": '{"to": "a@b.co"}'}}]}]}])
    row = _lines(tmp_path / "feedback" / "bot" / "completions.jsonl")[0]
    assert row["answer"] == "Call <PHONE>."
    assert row["messages"][0]["tool_calls"][0]["function"]["arguments"] == '{"to": "<EMAIL>"}'


def test_feedback_is_stored_and_joined_with_its_answer_by_id(served):
    server, _, home, client = served
    a = client.chat.completions.create(model="bot", messages=_hi("How do I descale?"), max_tokens=4)
    b = client.chat.completions.create(model="bot", messages=_hi("Is it dishwasher safe?"), max_tokens=4)
    c = client.completions.create(model="bot", prompt="The grinder", max_tokens=4)
    batch = client.completions.create(model="bot", prompt=["one", "two"], max_tokens=2)
    bodies = [{"id": a.id, "rating": 1}, {"id": b.id, "rating": -1, "correction": "Descale monthly with citric acid."},
              {"id": c.id, "rating": -1}, {"id": batch.id, "index": 1, "rating": 1}]
    stored = []
    for body in bodies:
        answer = _post(server, body)
        assert answer.status_code == 200, answer.text
        stored.append(answer.json())
    for body, row in zip(bodies, stored):
        assert {k: row[k] for k in ("id", "index", "rating", "correction", "version")} == {
            "index": 0, "correction": None, **body, "version": "bot@v1"}
    assert _lines(home / "feedback" / "bot" / "feedback.jsonl")[-4:] == stored
    joined = {(r["id"], r["index"]): r for r in read_feedback(home, "bot")}
    assert (joined[(a.id, 0)]["rating"], joined[(a.id, 0)]["correction"]) == (1, None)
    assert joined[(a.id, 0)]["answer"] == a.choices[0].message.content and joined[(a.id, 0)]["rated_at"] == stored[0]["created"]
    assert (joined[(b.id, 0)]["rating"], joined[(b.id, 0)]["correction"]) == (-1, "Descale monthly with citric acid.")
    assert (joined[(c.id, 0)]["rating"], joined[(c.id, 0)]["prompt"]) == (-1, "The grinder")
    assert joined[(batch.id, 1)]["rating"] == 1 and joined[(batch.id, 0)]["rating"] is None
    # rated again: the latest counts; both rows stay in the file
    assert _post(server, {"id": a.id, "rating": -1, "correction": "Use the descaling program."}).status_code == 200
    again = {(r["id"], r["index"]): r for r in read_feedback(home, "bot")}[(a.id, 0)]
    assert (again["rating"], again["correction"]) == (-1, "Use the descaling program.")
    assert [r["rating"] for r in _lines(home / "feedback" / "bot" / "feedback.jsonl") if r["id"] == a.id] == [1, -1]


def test_bad_feedback_is_a_4xx_in_openai_shape_and_writes_nothing(served):
    server, _, home, client = served
    folder = home / "feedback" / "bot"
    good = client.chat.completions.create(model="bot", messages=_hi("hi"), max_tokens=2).id
    assert _post(server, {"id": good, "rating": 1}).status_code == 200  # the file exists: "unchanged" means something
    cases = [
        ({"id": "chatcmpl-nope", "rating": 1}, KEY, 404, "id: no recorded answer 'chatcmpl-nope' on this server"),
        ({"id": good, "index": 1, "rating": 1}, KEY, 404, f"id: no recorded answer '{good}' (choice 1)"),
        ({"id": good, "rating": 0}, KEY, 400, "rating: Value error, give 1 (a good answer) or -1 (a bad one), not 0"),
        ({"id": good, "rating": 2}, KEY, 400, "rating: Value error, give 1"),
        ({"id": good, "rating": "good"}, KEY, 400, "rating: Input should be a valid integer"),
        ({"id": good, "rating": True}, KEY, 400, "rating: Input should be a valid integer"),
        ({"id": good, "rating": 1.0}, KEY, 400, "rating: Input should be a valid integer"),
        ({"id": good}, KEY, 400, "rating: Field required"),
        ({"rating": 1}, KEY, 400, "id: Field required"),
        ({"id": 7, "rating": 1}, KEY, 400, "id: Input should be a valid string"),
        ({"id": good, "rating": 1, "correction": "x" * (MAX_CORRECTION_CHARS + 1)}, KEY, 400,
         "correction: String should have at most 8000 characters"),
        ({"id": good, "rating": 1, "correction": " \n "}, KEY, 400, "correction: Value error, a blank correction"),
        ({"id": good, "rating": 1, "correction": 5}, KEY, 400, "correction: Input should be a valid string"),
        ({"id": good, "rating": 1, "comment": "nice"}, KEY, 400, "comment: Extra inputs are not permitted"),
        ({"id": good, "rating": 1, "index": -1}, KEY, 400, "index: Input should be greater than or equal to 0"),
        (b'{"id": "' + good.encode() + b'", "rating": 1', KEY, 400, "JSON decode error"),
        ([{"id": good, "rating": 1}], KEY, 400, "body: Input should be a valid dictionary"),
        ({"id": good, "rating": 1}, None, 401, "missing API key"),
        ({"id": good, "rating": 1}, "wrong", 401, "incorrect API key"),
    ]
    for body, key, status, message in cases:
        before = (folder / "feedback.jsonl").read_bytes(), (folder / "completions.jsonl").read_bytes()
        answer = _post(server, body, key)
        assert answer.status_code == status, (body, answer.text)
        error = answer.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
        assert message in error["message"], (body, error)
        assert ((folder / "feedback.jsonl").read_bytes(), (folder / "completions.jsonl").read_bytes()) == before, body
    # the limit itself is allowed
    at_limit = _post(server, {"id": good, "rating": -1, "correction": "y" * MAX_CORRECTION_CHARS})
    assert at_limit.status_code == 200 and _lines(folder / "feedback.jsonl")[-1]["correction"] == "y" * MAX_CORRECTION_CHARS


def test_a_server_without_record_records_nothing_and_refuses_feedback(ws, tmp_path):  # noqa: F811
    _home(ws, tmp_path)
    app = create_app("bot@production", tmp_path)
    with Server(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)
        answer = client.chat.completions.create(model="bot", messages=_hi("hi"), max_tokens=2)
        refused = _post(server, {"id": answer.id, "rating": 1})
        assert refused.status_code == 404
        assert refused.json()["error"]["code"] == "recording_off" and "--record" in refused.json()["error"]["message"]
        assert httpx.get(server.url + "/health", timeout=30).json()["recording"] is False
    assert not (tmp_path / "feedback").exists()
    with pytest.raises(InputError, match="recording needs a workspace"):
        create_app(str(ws / "runs" / "tiny-a" / "final"), None, record=True)


def test_answers_the_client_did_not_get_whole_are_not_recorded(served, monkeypatch):
    server, app, home, client = served
    path = home / "feedback" / "bot" / "completions.jsonl"
    client.completions.create(model="bot", prompt="warm up", max_tokens=1)  # the file exists
    events = _events(monkeypatch, app)
    _slow_steps(monkeypatch, app, 0.2)
    before = path.read_bytes()
    with client.chat.completions.with_streaming_response.create(
            model="bot", messages=_hi("Tell me everything"), max_tokens=40, stream=True, extra_body={"ignore_eos": True}) as r:
        chunks = r.parse()
        rid = next(chunks).id
        next(chunks)  # the first token; leaving the block closes the stream
    with pytest.raises(openai.APITimeoutError):  # a client that stops waiting for a plain answer
        _client(server, timeout=1.0).completions.create(model="bot", prompt="and more", max_tokens=40,
                                                        extra_body={"ignore_eos": True})
    assert _wait_for(lambda: len(events) == 2 and all(e and e[-1]["type"] == "finish" for e in events), 30)
    assert [e[-1]["reason"] for e in events] == ["cancelled", "cancelled"]
    assert _wait_for(lambda: app.state.slot.current.leases == 0)
    assert path.read_bytes() == before
    refused = _post(server, {"id": rid, "rating": -1})
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "completion_not_found"


def test_the_version_recorded_is_the_one_that_answered_across_a_promotion_and_stats_count_by_version(
        ws, tmp_path, monkeypatch, cli):  # noqa: F811
    reg = _home(ws, tmp_path)
    app = create_app("bot@production", tmp_path, record=True)
    with Server(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)
        hi = dict(model="bot", messages=_hi("How do I descale?"), max_tokens=8, temperature=0)
        a1 = client.chat.completions.with_raw_response.create(**hi)
        a2 = client.completions.create(model="bot", prompt="Brewly", max_tokens=4, temperature=0)
        assert a1.headers["x-model-version"] == "bot@v1"
        # a stream that starts on v1 and ends after the switch to v2 (its request held back until then)
        old = app.state.slot.current
        held, real_submit = [], old.batcher.submit
        monkeypatch.setattr(old.batcher, "submit", lambda *reqs: held.append(reqs))
        got: dict = {}

        def long_stream():
            with client.completions.with_streaming_response.create(model="bot", prompt="The water tank", max_tokens=6,
                                                                   stream=True) as r:
                chunks = list(r.parse())
            got["id"], got["text"] = chunks[0].id, "".join(c.choices[0].text for c in chunks)

        streaming = threading.Thread(target=long_stream)
        streaming.start()
        assert _wait_for(lambda: len(held) == 1)
        monkeypatch.setattr(old.batcher, "submit", real_submit)
        assert reg.promote("bot", "v2").allowed
        assert httpx.get(server.url + "/health", timeout=30).json()["version"] == "bot@v2"
        b1 = client.chat.completions.with_raw_response.create(**hi)
        b2_id = [c.id for c in client.chat.completions.create(stream=True, **hi)][0]
        assert b1.headers["x-model-version"] == "bot@v2" and old.leases == 1 and "id" not in got
        real_submit(*held[0])  # the v1 stream now runs, on v1, after v2 has answered
        streaming.join(30)
        for body in ({"id": a1.parse().id, "rating": 1}, {"id": a2.id, "rating": -1, "correction": "Brewly makes coffee."},
                     {"id": b1.parse().id, "rating": 1}, {"id": got["id"], "rating": -1}):
            assert _post(server, body, None).status_code == 200
    versions = {r["id"]: r["version"] for r in read_feedback(tmp_path, "bot")}
    assert versions == {a1.parse().id: "bot@v1", a2.id: "bot@v1", got["id"]: "bot@v1", b1.parse().id: "bot@v2",
                        b2_id: "bot@v2"}
    assert {r["id"]: r["answer"] for r in read_feedback(tmp_path, "bot")}[got["id"]] == got["text"]

    stats = cli("feedback", "stats", "bot", "--workspace", tmp_path, "--json")
    assert stats.exit_code == 0, stats.stderr
    assert stats.json() == [
        {"model": "bot", "version": "bot@v1", "completions": 3, "rated": 3, "good": 1, "bad": 2, "corrected": 1,
         "good_rate": pytest.approx(1 / 3)},
        {"model": "bot", "version": "bot@v2", "completions": 2, "rated": 1, "good": 1, "bad": 0, "corrected": 0,
         "good_rate": 1.0}]
    table = cli("feedback", "stats", "--workspace", tmp_path)
    assert table.exit_code == 0, table.stderr
    lines = [line for line in table.stdout.splitlines() if "bot@v" in line]
    cells = [[c.strip() for c in line.strip("│┃ ").split("│")] for line in lines]
    assert cells == [["bot", "bot@v1", "3", "3", "1", "2", "1", "33%"], ["bot", "bot@v2", "2", "1", "1", "0", "0", "100%"]]
    unknown = cli("feedback", "stats", "nobody", "--workspace", tmp_path)
    assert unknown.exit_code == 2
    assert unknown.stderr.strip() == f"error: no completions recorded for 'nobody' in {tmp_path / 'feedback'} (recorded: bot)"
    assert cli("feedback", "stats", "../bot", "--workspace", tmp_path).exit_code == 2
    empty = cli("feedback", "stats", "--workspace", tmp_path / "empty", "--json")
    assert (empty.exit_code, empty.json()) == (0, [])


def test_feedback_posted_at_once_leaves_one_whole_line_each(served):
    server, _, home, client = served
    ids = [client.completions.create(model="bot", prompt=f"question {i}", max_tokens=2).id for i in range(4)]
    path = home / "feedback" / "bot" / "feedback.jsonl"
    before = len(_lines(path)) if path.exists() else 0
    n, start = 24, threading.Barrier(24)
    corrections = [f"{i:02d}" + "é" * 6000 for i in range(n)]  # 12 kB a row: far past PIPE_BUF's 4 kB

    def post(i: int) -> int:
        start.wait()
        return _post(server, {"id": ids[i % 4], "rating": 1 if i % 2 else -1, "correction": corrections[i]}).status_code

    results = [None] * n
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, post(i))) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [200] * n
    rows = _lines(path)
    assert len(rows) == before + n
    assert sorted(r["correction"] for r in rows[before:]) == corrections


WRITER = """
import sys
from pathlib import Path
from serving.feedback import append_rows
path, who = Path(sys.argv[1]), sys.argv[2]
for i in range(150):
    append_rows(path, [{"who": who, "i": i, "pad": "x" * (20000 + i)}])
"""


def test_processes_appending_while_another_reads_leave_and_see_whole_rows_only(tmp_path):
    path = tmp_path / "rows.jsonl"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), who], cwd=ROOT) for who in "abc"]
    partial_reads = 0
    while any(w.poll() is None for w in writers):
        rows, _ = read_rows(path)  # raises on a line that is not JSON: a torn row
        assert all(len(r["pad"]) == 20000 + r["i"] for r in rows)
        partial_reads += 0 < len(rows) < 450
    assert [w.returncode for w in writers] == [0, 0, 0] and partial_reads > 0  # the reads overlapped the writes
    rows = _lines(path)
    assert len(rows) == 450 and Counter(r["who"] for r in rows) == {"a": 150, "b": 150, "c": 150}
    for who in "abc":
        assert [r["i"] for r in rows if r["who"] == who] == list(range(150))  # each writer's rows in its order


def test_a_torn_tail_left_by_a_dead_writer_is_skipped_then_cut(tmp_path):
    path = tmp_path / "feedback" / "bot" / "completions.jsonl"
    path.parent.mkdir(parents=True)
    whole = {"id": "cmpl-1", "index": 0, "version": "bot@v1", "answer": "ok"}
    path.write_bytes(json.dumps(whole).encode() + b"\n" + b'{"id": "cmpl-2", "index": 0, "vers')
    assert read_rows(path)[0] == [whole]
    store = FeedbackStore(tmp_path, "bot")
    assert store.version_of("cmpl-1") == "bot@v1" and store.version_of("cmpl-2") is None
    store.record([{"id": "cmpl-3", "index": 0, "version": "bot@v2", "answer": "fine"}])
    assert [r["id"] for r in _lines(path)] == ["cmpl-1", "cmpl-3"]
    # another process's appends are found without re-reading the file from the start
    append_rows(path, [{"id": "cmpl-4", "index": 0, "version": "bot@v2", "answer": "more"}])
    assert store.version_of("cmpl-4") == "bot@v2"
    assert store._offset == path.stat().st_size
