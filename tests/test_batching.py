"""Continuous batching (serving/engine.py): requests join and leave the running batch between decode steps.

A tiny model pretrained here (one step: its answers still depend on every token before them) drives the
`Batcher` directly, and through the server (the official `openai` client; a stream its client closes). Joins
are timed from inside a request's event callback (the worker thread), so the step at which one joins is exact.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from serving.engine import Batcher, LoadedModel, Request
from serving.server import create_app
from tests.helpers import pretrain_tiny_base
from tests.test_serving import TINY, Server


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return pretrain_tiny_base(tmp_path_factory.mktemp("batching-ws"), "tiny", steps=1, seed=3, **TINY)


@pytest.fixture(scope="module")
def loaded(model_dir) -> LoadedModel:
    loaded = LoadedModel(model_dir, "tiny", device="cpu")
    loaded.eos_ids = set()  # every request runs to its max_tokens: lengths (and so timings) are known in advance
    return loaded


@pytest.fixture
def batcher(loaded):
    b = Batcher(loaded, max_batch=8)
    b.start()
    yield b
    b.stop()
    b.join(timeout=30)
    assert not b.is_alive()


class Sink:
    """A request's events as the server would receive them, with arrival times; `on_text(n)` runs after the n-th."""

    def __init__(self, on_text=None) -> None:
        self.events: list[dict] = []
        self.times: list[float] = []
        self.done = threading.Event()
        self.on_text = on_text
        self.submitted = 0.0

    def __call__(self, event: dict) -> None:
        assert not self.done.is_set(), f"an event after the request ended: {event}"
        self.events.append(event)
        self.times.append(time.perf_counter())
        if event["type"] in ("finish", "error"):
            self.done.set()
        elif event["type"] == "text" and self.on_text:
            self.on_text(len(self.texts))

    @property
    def texts(self) -> list[dict]:
        return [e for e in self.events if e["type"] == "text"]

    @property
    def finish(self) -> dict:
        assert self.done.wait(60), "the request never ended"
        [end] = [e for e in self.events if e["type"] in ("finish", "error")]
        return end

    @property
    def ended_at(self) -> float:
        self.finish
        return self.times[-1]

    def tokens(self) -> list[tuple[str, float]]:
        """Each generated token with its logprob (requests ask logprobs=0: one entry per token)."""
        return [(e["logprob"]["token"], e["logprob"]["logprob"]) for e in self.texts]


def ids(loaded: LoadedModel, text: str) -> list[int]:
    return loaded.tokenizer(text, add_special_tokens=False)["input_ids"]


def request(loaded: LoadedModel, text: str, max_tokens: int, on_text=None, **kw) -> tuple[Request, Sink]:
    sink = Sink(on_text)
    kw = {"temperature": 0, "logprobs": 0, **kw}
    return Request(prompt_ids=ids(loaded, text), max_tokens=max_tokens, emit=sink, **kw), sink


def alone(batcher: Batcher, loaded: LoadedModel, text: str, max_tokens: int, **kw) -> Sink:
    req, sink = request(loaded, text, max_tokens, **kw)
    sink.submitted = time.perf_counter()
    batcher.submit(req)
    sink.finish
    return sink


def same_tokens(a: Sink, b: Sink) -> None:
    assert a.finish["type"] == "finish", a.finish
    assert [t for t, _ in a.tokens()] == [t for t, _ in b.tokens()]
    assert [lp for _, lp in a.tokens()] == pytest.approx([lp for _, lp in b.tokens()], abs=1e-4)
    assert (a.finish["reason"], a.finish["completion_tokens"]) == (b.finish["reason"], b.finish["completion_tokens"])


# ---- a short request never waits for a long one ---------------------------------------------------------


def test_a_short_request_finishes_while_a_long_one_is_still_generating(batcher, loaded):
    question = "How do I descale my brewer?"
    alone(batcher, loaded, question, 8)  # warm-up
    solo = [alone(batcher, loaded, question, 8) for _ in range(3)]
    solo_s = min(s.ended_at - s.submitted for s in solo)

    long_req, long_sink = request(loaded, "The water tank", 120)
    started = threading.Event()
    long_sink.on_text = lambda n: n == 5 and started.set()
    batcher.submit(long_req)
    assert started.wait(60)
    beside = []
    for _ in range(3):
        req, sink = request(loaded, question, 8)
        t0 = time.perf_counter()
        batcher.submit(req)
        assert sink.finish["reason"] == "length" and sink.finish["completion_tokens"] == 8
        beside.append((sink.ended_at - t0, len(long_sink.texts), sink.ended_at))
        same_tokens(sink, solo[0])
    assert long_sink.finish["completion_tokens"] == 120
    # each short answer arrived while the long one was mid-way (static batching: only after its 120th token)
    assert all(tokens_then < 100 and at < long_sink.ended_at for _, tokens_then, at in beside), beside
    # and about as fast as alone: at most one step's wait to join, then steps shared with the long one
    assert min(s for s, _, _ in beside) <= 2 * solo_s + 0.1, (beside, solo_s)
    assert batcher.shared_steps > 0


# ---- joining mid-way changes nothing --------------------------------------------------------------------


def test_greedy_output_is_the_same_alone_or_joined_mid_batch(batcher, loaded):
    long_text, wide_text = "The water tank", "How do I descale my brewer? " * 5  # the joiner's prompt outgrows the cache
    scored_text, seeded_text = "Brewly", "coffee beans"
    refs = {"long": alone(batcher, loaded, long_text, 60),
            "wide": alone(batcher, loaded, wide_text, 10),
            "scored": alone(batcher, loaded, scored_text, 12, echo_logprobs=True, logprobs=2),
            "seeded": alone(batcher, loaded, seeded_text, 12, temperature=1.0, top_p=0.9, seed=11)}
    assert len(ids(loaded, wide_text)) > len(ids(loaded, long_text)) + 3

    wide, wide_sink = request(loaded, wide_text, 10)
    scored, scored_sink = request(loaded, scored_text, 12, echo_logprobs=True, logprobs=2)
    seeded, seeded_sink = request(loaded, seeded_text, 12, temperature=1.0, top_p=0.9, seed=11)

    def joins(n: int) -> None:  # on the worker thread after the long one's n-th token: they join at the next step
        if n == 3:
            batcher.submit(wide)  # pads the running rows on the left to its longer prompt
        elif n == 30:
            batcher.submit(scored, seeded)  # a group of two, padded to the running cache (after `wide` left and was trimmed)

    long_req, long_sink = request(loaded, long_text, 60, on_text=joins)
    steps_before = batcher.shared_steps
    batcher.submit(long_req)
    for name, sink in (("long", long_sink), ("wide", wide_sink), ("scored", scored_sink), ("seeded", seeded_sink)):
        same_tokens(sink, refs[name])
    assert [e["text"] for e in seeded_sink.texts] == [e["text"] for e in refs["seeded"].texts]
    [prompt] = [e["entries"] for e in scored_sink.events if e["type"] == "prompt_logprobs"]
    [ref_prompt] = [e["entries"] for e in refs["scored"].events if e["type"] == "prompt_logprobs"]
    assert [e["token"] for e in prompt] == [e["token"] for e in ref_prompt] and prompt[0]["logprob"] is None
    assert [e["logprob"] for e in prompt[1:]] == pytest.approx([e["logprob"] for e in ref_prompt[1:]], abs=1e-4)
    for mine, ref in zip(prompt[1:], ref_prompt[1:]):
        assert list(mine["top"]) == list(ref["top"])
        assert list(mine["top"].values()) == pytest.approx(list(ref["top"].values()), abs=1e-4)
    # they really ran together: the joiners ended before the long one, and steps served several requests
    assert wide_sink.ended_at < long_sink.ended_at and seeded_sink.ended_at < long_sink.ended_at
    assert batcher.shared_steps - steps_before >= 10 + 12 - 2


# ---- cancellation --------------------------------------------------------------------------------------


def test_a_cancelled_request_stops_within_a_step_and_the_others_finish(batcher, loaded):
    ref = alone(batcher, loaded, "The water tank", 40)
    keep, keep_sink = request(loaded, "The water tank", 40)
    gone, gone_sink = request(loaded, "Brewly", 40)

    def cancel(n: int) -> None:  # the server sets the flag when the client disconnects; here after the 5th token
        if n == 5:
            gone.cancelled = True

    gone_sink.on_text = cancel
    batcher.submit(keep, gone)
    assert gone_sink.finish == {"type": "finish", "reason": "cancelled", "completion_tokens": 5}
    assert len(gone_sink.texts) == 5
    same_tokens(keep_sink, ref)

    # from another thread, as the server does: no more than one step after the flag is seen
    other, other_sink = request(loaded, "Brewly", 100)
    started = threading.Event()
    other_sink.on_text = lambda n: n == 3 and started.set()
    batcher.submit(other)
    assert started.wait(60)
    other.cancelled = True
    at_cancel = len(other_sink.texts)
    assert other_sink.finish["reason"] == "cancelled"
    assert other_sink.finish["completion_tokens"] <= at_cancel + 1 < 100

    # cancelled while still queued: never prefilled
    before = batcher.batched_requests
    queued, queued_sink = request(loaded, "Brewly", 10)
    queued.cancelled = True
    batcher.submit(queued)
    assert queued_sink.finish == {"type": "finish", "reason": "cancelled", "completion_tokens": 0}
    assert batcher.batched_requests == before


def test_a_listener_that_raises_cancels_only_its_request(batcher, loaded):
    ref = alone(batcher, loaded, "The water tank", 20)
    keep, keep_sink = request(loaded, "The water tank", 20)
    calls = []

    def broken(event: dict) -> None:  # the server's queue is gone (its client disconnected)
        calls.append(event)
        if len(calls) >= 3:
            raise RuntimeError("Event loop is closed")

    gone = Request(prompt_ids=ids(loaded, "Brewly"), max_tokens=20, temperature=0, logprobs=0, emit=broken)
    batcher.submit(keep, gone)
    same_tokens(keep_sink, ref)
    assert len(calls) <= 4 and calls[-1] == {"type": "finish", "reason": "cancelled", "completion_tokens": 3}
    assert alone(batcher, loaded, "Brewly", 3).finish["completion_tokens"] == 3  # the worker lives on


# ---- failures stay with their request ---------------------------------------------------------------


def test_a_prompt_that_fails_its_prefill_fails_only_itself(batcher, loaded):
    ref = alone(batcher, loaded, "Brewly", 10)
    running, running_sink = request(loaded, "The water tank", 30)
    good, good_sink = request(loaded, "Brewly", 10)
    bad_sink = Sink()
    bad = Request(prompt_ids=[1, loaded.model.config.vocab_size + 5], max_tokens=10, emit=bad_sink)  # outside the embedding

    def join(n: int) -> None:
        if n == 2:
            batcher.submit(good, bad)  # one group: prefilled together, then each alone when that fails

    running_sink.on_text = join
    batcher.submit(running)
    assert bad_sink.finish["type"] == "error" and "index" in bad_sink.finish["message"].lower()
    same_tokens(good_sink, ref)
    assert running_sink.finish["completion_tokens"] == 30


# ---- the prefill computes logits only where they are needed ----------------------------------------------


def test_the_prefill_runs_the_output_layer_only_on_the_positions_it_needs(batcher, loaded):
    shapes: list[tuple[int, ...]] = []
    hook = loaded.model.get_output_embeddings().register_forward_hook(lambda _m, args, _out: shapes.append(tuple(args[0].shape)))
    try:
        texts = ["How do I descale my brewer? " * 3, "Brewly", "The water tank is empty", "coffee"]
        reqs, sinks = zip(*(request(loaded, t, 2) for t in texts))
        batcher.submit(*reqs)
        for s in sinks:
            assert s.finish["completion_tokens"] == 2
        hidden = loaded.model.config.hidden_size
        # one row of hidden states per request and step: never [batch, seq, vocab] for the prompts
        assert shapes and all(len(s) == 2 and s[0] <= len(texts) and s[1] == hidden for s in shapes), shapes
        assert shapes[0] == (len(texts), hidden)  # the prefill: each prompt's last position

        shapes.clear()
        scored, scored_sink = request(loaded, texts[0], 1, echo_logprobs=True)
        plain, plain_sink = request(loaded, texts[2], 1)
        batcher.submit(scored, plain)
        assert scored_sink.finish["type"] == plain_sink.finish["type"] == "finish"
        n = len(scored.prompt_ids)
        # echo: the prompt positions of that request alone, then the last position of each
        assert shapes == [(n - 1, hidden), (2, hidden)], shapes
    finally:
        hook.remove()


# ---- the batcher's surface ---------------------------------------------------------------------------


def test_groups_join_together_and_stop_finishes_what_is_queued(loaded):
    b = Batcher(loaded, max_batch=4)
    b.start()
    reqs, sinks = zip(*(request(loaded, f"question {i}", 3) for i in range(6)))
    b.submit(*reqs)  # one call's six prompts: 4 join together, then 2 when they leave
    b.stop()
    b.join(timeout=60)
    assert not b.is_alive()
    assert [s.finish["completion_tokens"] for s in sinks] == [3] * 6
    assert (b.batches, b.batched_requests) == (2, 6)
    late, late_sink = request(loaded, "Brewly", 3)
    b.submit(late)  # after the worker exited: an error, not a request left waiting forever
    assert late_sink.finish["type"] == "error" and "unloaded" in late_sink.finish["message"]


def test_through_the_server_a_short_completion_returns_while_a_long_stream_runs(model_dir):
    with Server(create_app(str(model_dir))) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        name = model_dir.name
        chunks_at: list[float] = []
        first = threading.Event()

        def long() -> str:
            text = []
            for chunk in client.completions.create(model=name, prompt="The water tank", max_tokens=120, temperature=0,
                                                   stream=True):
                chunks_at.append(time.perf_counter())
                first.set()
                text.append(chunk.choices[0].text)
            return "".join(text)

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            streamed = pool.submit(long)
            assert first.wait(60)
            short = client.completions.create(model=name, prompt="How do I descale my brewer?", max_tokens=4,
                                              temperature=0)
            answered = time.perf_counter()
            assert short.usage.completion_tokens == 4
            assert len(streamed.result(timeout=60)) > 50  # the tiny model says " it it it ...": no end token
        assert answered < chunks_at[-1], "the short completion waited for the long stream to finish"
        alone = client.completions.create(model=name, prompt="How do I descale my brewer?", max_tokens=4, temperature=0)
        assert alone.choices[0].text == short.choices[0].text


def test_through_the_server_a_closed_stream_stops_decoding_for_it(model_dir):
    with Server(create_app(str(model_dir))) as server:
        batcher = server.server.config.app.state.slot.get()[2]
        ended: list[dict] = []
        submit = batcher.submit

        def spy(*reqs: Request) -> None:  # what the worker sends the server, seen on the way
            for r in reqs:
                r.emit = lambda event, emit=r.emit: (event["type"] != "text" and ended.append(event), emit(event))
            submit(*reqs)

        batcher.submit = spy
        body = {"model": model_dir.name, "prompt": "The water tank", "max_tokens": 120, "temperature": 0, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")  # it is generating; then the client goes away
        deadline = time.monotonic() + 30
        while not ended and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ended and ended[0]["reason"] == "cancelled" and ended[0]["completion_tokens"] < 120, ended
        assert not batcher.rows


# ---- sliding-window models batch continuously too -----------------------------------------------------------


@pytest.fixture(scope="module")
def gemma_loaded(model_dir, tmp_path_factory) -> LoadedModel:
    """A tiny Gemma 3 (random weights, seeded) with a sliding window of 4 on its first layer and full attention on the
    second, as Gemma 3 alternates them, saved with the tiny model's tokenizer."""
    import torch
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    config = Gemma3TextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4,
                              layer_types=["sliding_attention", "full_attention"], max_position_embeddings=128,
                              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("gemma3") / "tiny-gemma3"
    Gemma3ForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    loaded = LoadedModel(out, "tiny-gemma3", device="cpu")
    loaded.eos_ids = set()  # every request runs to its max_tokens
    return loaded


def test_a_sliding_window_model_joins_requests_mid_batch_and_answers_the_same(gemma_loaded):
    """Rows join and leave a cache whose first layer keeps only the window's last 3 columns: a joiner wider than the
    running batch (the running rows are padded), one narrower than the window (its window is padded), a group of two,
    and the trim when rows leave must all give each request the tokens and logprobs it gets alone."""
    loaded = gemma_loaded
    b = Batcher(loaded, max_batch=8)
    b.start()
    try:
        window = loaded.model.config.sliding_window
        long_text, wide_text, tiny_text = "The water tank", "How do I descale my brewer? Again and again", "Hi"
        group_texts = ("coffee beans", "Brewly grinder settings")
        assert len(ids(loaded, tiny_text)) < window - 1 < len(ids(loaded, long_text)) + 3 < len(ids(loaded, wide_text))
        refs = {"long": alone(b, loaded, long_text, 40), "wide": alone(b, loaded, wide_text, 8),
                "tiny": alone(b, loaded, tiny_text, 10), **{t: alone(b, loaded, t, 6) for t in group_texts}}
        assert b.mergeable is True  # plain and sliding-window layers: rows can be padded into the running cache
        assert len({t for t, _ in refs["long"].tokens()}) > 1  # the random model says more than one thing

        wide, wide_sink = request(loaded, wide_text, 8)
        tiny, tiny_sink = request(loaded, tiny_text, 10)
        group = [request(loaded, t, 6) for t in group_texts]

        def joins(n: int) -> None:  # on the worker thread after the long one's n-th token: they join at the next step
            if n == 3:
                b.submit(wide)  # its prompt is wider than the running cache: the long row is padded on the left
            elif n == 15:
                b.submit(tiny)  # after `wide` left (the cache was trimmed); its 2 columns are padded to the window's 3
            elif n == 28:
                b.submit(*(r for r, _ in group))

        long_req, long_sink = request(loaded, long_text, 40, on_text=joins)
        batches, shared = b.batches, b.shared_steps
        b.submit(long_req)
        same_tokens(long_sink, refs["long"])
        for name, sink in (("wide", wide_sink), ("tiny", tiny_sink), *zip(group_texts, (s for _, s in group))):
            same_tokens(sink, refs[name])
            assert sink.ended_at < long_sink.ended_at, name  # it ran beside the long one, not after it
        assert b.batches - batches == 4  # the long one, then three joins: each its own prefill
        assert b.shared_steps - shared >= (8 - 1) + (10 - 1) + (6 - 1)  # steps that decoded the joiners with the long one

        # one call's prompts start together (left-padded to the longer one in one prefill), and match alone
        together = [request(loaded, long_text, 40), request(loaded, tiny_text, 10)]
        b.submit(*(r for r, _ in together))
        same_tokens(together[0][1], refs["long"])
        same_tokens(together[1][1], refs["tiny"])
    finally:
        b.stop()
        b.join(timeout=30)
    assert not b.is_alive()
