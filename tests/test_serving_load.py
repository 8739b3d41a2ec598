"""The server under load on loopback: 200 concurrent clients of the official `openai` client (serving/loadtest.py's
mix: streaming and not, chat and completions, long and short, 10% closing their stream mid-answer, some sending bad
token ids or oversized bodies), with a promotion in the middle.

Tiny models trained by tests/test_serving.py's `ws` fixture are registered and served by a real uvicorn server in
this process, so the test sees the server's memory and the requests its batchers received.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import json
import time

import httpx
import torch

import serving.engine as engine
from serving.loadtest import Mix, run, summarize
from serving.registry import Registry
from serving.server import KEEP_ALIVE_S, create_app
from tests.test_serving import FAQ, Server, _evaluation, _gate, ws  # noqa: F401  (ws: the module fixture, shared)


def _rss_mb() -> float:
    """This process's resident memory after a full collection, with freed heap handed back to the OS (glibc keeps
    freed pages otherwise, which would read as a leak)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/statm") as f:  # (gc.get_objects() before this would leave its big list's pages behind)
        return int(f.read().split()[1]) * 4096 / 2**20


def _live(kind: type) -> int:
    gc.collect()
    return sum(isinstance(o, kind) for o in gc.get_objects())


def _prompts(tokenizer) -> tuple[list[str], list[str]]:
    """Short questions, and long ones of 48 tokens: room for a 64-token answer in the tiny model's context of 128."""
    rows = [json.loads(line) for line in FAQ.read_text(encoding="utf-8").splitlines() if line.strip()]
    short = [r["question"][:40] for r in rows[:8]]
    long = [tokenizer.decode(tokenizer(r["question"] + " " + r["answer"])["input_ids"][:48]) for r in rows[:8]]
    return short, long


def test_200_concurrent_clients_with_disconnects_bad_input_and_a_promotion(ws, tmp_path, monkeypatch):  # noqa: F811
    reg = Registry(tmp_path)
    reg.register("bot", ws / "runs" / "tiny-a" / "final", _evaluation("tiny-a", 20.0), _gate(True))
    reg.register("bot", ws / "runs" / "tiny-b" / "final", _evaluation("tiny-b", 19.0), _gate(True))
    reg.promote("bot", "v1")
    app = create_app("bot@production", tmp_path)
    slot = app.state.slot
    vocab = slot.current.loaded.vocab
    short, long = _prompts(slot.current.loaded.tokenizer)

    # every request a batcher receives must end with exactly one finish or error event, whatever its client did
    ends: list[str] = []
    real_submit = engine.Batcher.submit

    def submit(self, *reqs):
        for r in reqs:
            emit = r.emit

            def spy(event, emit=emit):
                if event["type"] in ("finish", "error"):
                    ends.append(event.get("reason") or "error")
                emit(event)

            r.emit = spy
        real_submit(self, *reqs)

    monkeypatch.setattr(engine.Batcher, "submit", submit)

    def load(server: Server, mix: Mix, promote: str | None = None):
        """Run the mix; with `promote`, that version goes to production once a third of the requests have ended, and
        /health is asked (it answers once the version is loaded). Returns the outcomes and when /health answered."""
        done, promoted = [0], {}

        def on_outcome(o) -> None:
            done[0] += 1
            if promote and "at" not in promoted and done[0] >= mix.clients * mix.rounds // 3:
                assert reg.promote("bot", promote).allowed
                promoted["at"] = time.monotonic()

        async def go():
            outcomes = asyncio.ensure_future(run(server.url + "/v1", "bot", mix, short, long, vocab, on_outcome=on_outcome))
            if not promote:
                return await outcomes, None, None
            async with httpx.AsyncClient(timeout=120) as http:
                while "at" not in promoted:
                    await asyncio.sleep(0.01)
                health = (await http.get(server.url + "/health")).json()
                switched = time.monotonic()
            return await outcomes, health, switched

        return asyncio.run(go())

    server = Server(app)
    # served as `modelcrew serve` serves: idle connections kept 30 s, longer than the load clients' pool keeps them
    # (uvicorn's default of 5 s met httpx's 5 s: a connection reused after ~5 s idle failed 1 run in 10)
    server.server.config.timeout_keep_alive = KEEP_ALIVE_S
    with server:
        # warm-up, with a swap and a rollback, the second wave shaped as the measured one: what stays for a process's
        # life is allocated here (the allocator's arenas of the threads that run batchers and load models). Measured:
        # resident memory grows by 50-70 MB in each of the first two waves, then holds within 20-30 MB of that
        # through further waves of 600 requests, swaps included, with no trend
        for promote, rounds in ((None, 1), ("v2", 3)):
            warm, _, _ = load(server, Mix(clients=200, rounds=rounds), promote)
            assert summarize(warm)["unexpected"] == []
        reg.rollback("bot")
        assert httpx.get(server.url + "/health", timeout=60).json()["version"] == "bot@v1"
        old = slot.current
        tensors = _live(torch.Tensor)
        baseline = _rss_mb()
        ends.clear()

        mix = Mix(clients=200, rounds=3)
        began = time.monotonic()
        outcomes, health, switched = load(server, mix, promote="v2")
        wall = time.monotonic() - began
        summary = summarize(outcomes)
        print(f"\nload: {summary['requests']} requests in {wall:.1f} s, latency p50 {summary['latency_p50_s']:.3f} s "
              f"p99 {summary['latency_p99_s']:.3f} s, first text p50 {summary['ttft_p50_s']:.3f} s "
              f"p99 {summary['ttft_p99_s']:.3f} s, {summary['tokens_per_s']:.0f} tokens/s, versions {summary['versions']}")

        # every well-formed request answered in full; every bad one refused with its 4xx
        assert summary["unexpected"] == []
        kinds = summary["by_kind"]
        assert kinds["disconnect"] == 60 and kinds["bad_ids"] == 12 and kinds["oversized"] == 6
        assert sum(kinds[k] for k in ("completion", "stream", "chat", "chat_stream")) == 522
        # the promotion moved new requests to v2 with none failing: all requests started once /health saw v2 went there
        assert health["version"] == "bot@v2"
        later = [o for o in outcomes if o.started > switched and o.kind in ("completion", "stream", "chat", "chat_stream")]
        assert later and {o.version for o in later} == {"bot@v2"}
        assert summary["versions"].get("bot@v1", 0) > 0  # and the first half was answered by v1

        # every request that reached a batcher ended exactly once; closed streams were dropped as cancelled
        answered = [o for o in outcomes if o.kind in ("completion", "stream", "chat", "chat_stream", "disconnect")]
        deadline = time.monotonic() + 10
        while len(ends) < len(answered) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(ends) == len(answered) and "error" not in ends
        # well-formed requests all ran to their length (checked above); the 60 closed streams (64 tokens asked, closed
        # after 2 chunks) end cancelled unless all 62 of their remaining decode steps ran before the server's event loop
        # saw the close (one loop turn: starlette's disconnect listener). A step of up to 32 rows (the default
        # max_batch) takes ~30 ms here (about 1000 tokens/s), so that needs the loop to stall for ~2 s; measured: 60 of
        # 60 cancelled in each of 11 runs. 80% leaves room for a few closes behind a busy loop, and fails if closes are
        # not acted on as a rule (a stream that runs on after its client left)
        cancelled = ends.count("cancelled")
        print(f"closed streams that ended cancelled: {cancelled} of {kinds['disconnect']}")
        assert ends.count("length") + cancelled == len(ends)
        assert cancelled >= 0.8 * kinds["disconnect"], f"{cancelled} of {kinds['disconnect']} closed streams cancelled"
        # nothing left behind: the batcher is idle, v1's has stopped, no request is alive, memory is back
        current = slot.current
        assert current.key == "bot@v2" and current.batcher.rows == [] and current.batcher.queue.empty()
        assert current.leases == 0 and old.retired
        old.batcher.join(10)
        assert not old.batcher.is_alive()
        ends.clear()
        del old, current
        after = _rss_mb()
        assert _live(engine.Request) == 0
        # exact: no tensor outlives the load, v1's weights included (CI saw 7 fewer after it than before: warm-up leftovers freed)
        assert _live(torch.Tensor) <= tensors
        print(f"resident memory: {baseline:.0f} MB after the warm-up, {after:.0f} MB after the load")
        # resident memory is noisier: glibc's per-thread arenas held 20-40 MB more after the load on CI machines (with
        # no trend over further waves). The bound still catches a per-request leak worth the name: a KV cache kept
        # for each request answered would be 114 MB
        config = slot.current.loaded.model.config
        kv_mb = 2 * config.num_hidden_layers * config.hidden_size * 4 * (48 + 64) / 2**20
        assert kv_mb * 522 > 64 * 1.5
        assert after - baseline < 64, f"memory grew by {after - baseline:.0f} MB under load"
