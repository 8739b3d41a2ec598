"""A load generator for an OpenAI-compatible server: many concurrent clients, a mix of requests, and what each got.

tests/test_serving_load.py holds the server to it (every well-formed request answered, bad ones 4xx, memory back
to its baseline, a promotion in the middle); bench/bench_serve.py reports its latencies and tokens/s. It speaks
through the official `openai` client (the dev extra), as users' programs do.

What client i sends is fixed by i (`kinds`), so two runs of one mix send the same requests:
- every `1/disconnect`-th client streams and closes the connection after `disconnect_after` chunks;
- `bad_ids` clients send a token id outside the vocabulary (a 400 is expected), `oversized` clients a body over
  the server's limit (a 413);
- the others cycle through completion, streamed completion, chat and streamed chat (or all send `only`); a
  quarter of them (by default) send a long prompt with a long answer, the rest a short one.
Each client sends `rounds` requests one after another. Well-formed requests ask for `ignore_eos` (vLLM's
extension) so that every answer has its planned length.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

WELL_FORMED = ("completion", "stream", "chat", "chat_stream")
EXPECTED_STATUS = {"bad_ids": 400, "oversized": 413}
KEEPALIVE_EXPIRY_S = 2.0  # below the server's keep-alive timeout (see run)


@dataclass(frozen=True)
class Mix:
    clients: int = 200
    rounds: int = 1
    disconnect: float = 0.10  # share of clients that close their stream mid-answer
    disconnect_after: int = 2  # chunks read before closing
    bad_ids: int = 4
    oversized: int = 2
    oversized_bytes: int = (1 << 20) + 4096  # over the server's default limit of 1 MiB
    long_share: float = 0.25
    short_tokens: int = 16
    long_tokens: int = 64
    disconnect_tokens: int = 64
    only: str | None = None  # one of WELL_FORMED for every client that is not disconnecting or bad (a sweep of one kind)

    def kinds(self) -> list[tuple[str, bool]]:
        """(kind, long) for each client."""
        every = round(1 / self.disconnect) if self.disconnect > 0 else 0
        long_every = round(1 / self.long_share) if self.long_share > 0 else 0
        out, plain = [], 0
        for i in range(self.clients):
            if every and i % every == every - 1:
                out.append(("disconnect", False))
            elif self.bad_ids and i % max(1, self.clients // self.bad_ids) == 1 and sum(k == "bad_ids" for k, _ in out) < self.bad_ids:
                out.append(("bad_ids", False))
            elif (self.oversized and i % max(1, self.clients // self.oversized) == 3
                  and sum(k == "oversized" for k, _ in out) < self.oversized):
                out.append(("oversized", False))
            else:
                kind = self.only or WELL_FORMED[plain % 4]
                out.append((kind, bool(long_every) and (plain // 4) % long_every == 0))
                plain += 1
        return out


@dataclass
class Outcome:
    client: int
    round: int
    kind: str
    long: bool
    started: float  # time.monotonic()
    ended: float
    status: int  # HTTP status; 0 when no answer came (connection error, timeout)
    first: float | None = None  # the first generated text (streams)
    tokens: int = 0  # completion tokens, from usage
    finish: str | None = None
    version: str | None = None  # the X-Model-Version header
    error: str | None = None  # set when the outcome is not what this kind of request should get

    @property
    def latency(self) -> float:
        return self.ended - self.started


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    import numpy as np

    return float(np.percentile(values, q))


def summarize(outcomes: list[Outcome]) -> dict:
    """Counts, the unexpected outcomes, p50/p99 latency (well-formed, answered) and time to first text (streams),
    and tokens/s over the wall time from the first start to the last end."""
    answered = [o for o in outcomes if o.kind in WELL_FORMED and o.error is None]
    streams = [o.first - o.started for o in answered if o.first is not None]
    wall = max(o.ended for o in outcomes) - min(o.started for o in outcomes) if outcomes else 0.0
    tokens = sum(o.tokens for o in answered)
    return {
        "requests": len(outcomes), "by_kind": dict(Counter(o.kind for o in outcomes)),
        "unexpected": [f"client {o.client} round {o.round} ({o.kind}): {o.error}" for o in outcomes if o.error],
        "latency_p50_s": _percentile([o.latency for o in answered], 50),
        "latency_p99_s": _percentile([o.latency for o in answered], 99),
        "ttft_p50_s": _percentile(streams, 50), "ttft_p99_s": _percentile(streams, 99),
        "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall if wall else 0.0,
        "versions": dict(Counter(o.version for o in answered)),
    }


async def _one(client, model: str, i: int, rnd: int, kind: str, long: bool, mix: Mix, prompt: str, vocab: int) -> Outcome:
    import openai

    out = Outcome(i, rnd, kind, long, time.monotonic(), 0.0, 0)
    max_tokens = mix.long_tokens if long else mix.short_tokens
    extra = {"ignore_eos": True}
    chat = kind.startswith("chat")
    try:
        if kind in ("completion", "chat"):
            if chat:
                raw = await client.chat.completions.with_raw_response.create(
                    model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
                    extra_body=extra)
                answer = raw.parse()
            else:
                raw = await client.completions.with_raw_response.create(
                    model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body=extra)
                answer = raw.parse()
            out.status, out.version = raw.status_code, raw.headers.get("x-model-version")
            out.tokens, out.finish = answer.usage.completion_tokens, answer.choices[0].finish_reason
        elif kind in ("stream", "chat_stream", "disconnect"):
            tokens = mix.disconnect_tokens if kind == "disconnect" else max_tokens
            args = dict(model=model, max_tokens=tokens, temperature=0, stream=True, extra_body=extra,
                        stream_options={"include_usage": True})
            make = (client.chat.completions.with_streaming_response.create(messages=[{"role": "user", "content": prompt}], **args)
                    if chat else client.completions.with_streaming_response.create(prompt=prompt, **args))
            async with make as response:
                out.status, out.version = response.status_code, response.headers.get("x-model-version")
                chunks = 0
                async for chunk in await response.parse():
                    if chunk.usage is not None:
                        out.tokens = chunk.usage.completion_tokens
                    for c in chunk.choices:
                        text = c.delta.content if chat else c.text
                        if text:
                            chunks += 1
                            out.first = out.first or time.monotonic()
                        out.finish = c.finish_reason or out.finish
                    if kind == "disconnect" and chunks >= mix.disconnect_after:
                        break  # leaving the block closes the connection mid-answer
        elif kind == "bad_ids":
            await client.completions.create(model=model, prompt=[1, 2, vocab + 1000], max_tokens=4)
            out.status = 200
        elif kind == "oversized":
            await client.completions.create(model=model, prompt="x " * (mix.oversized_bytes // 2), max_tokens=4)
            out.status = 200
    except openai.APIStatusError as err:
        out.status, out.error = err.status_code, f"{err.status_code}: {err.message}"
    except (openai.APIConnectionError, openai.APITimeoutError) as err:
        out.error = f"no answer: {type(err).__name__}: {err}"
    out.ended = time.monotonic()
    if kind in EXPECTED_STATUS:
        out.error = None if out.status == EXPECTED_STATUS[kind] else f"expected {EXPECTED_STATUS[kind]}, got {out.status}: {out.error}"
    elif out.error is None:
        if kind == "disconnect":
            out.error = None if out.status == 200 else f"status {out.status}"
        elif out.status != 200 or out.finish != "length" or out.tokens != max_tokens:
            out.error = f"status {out.status}, finish {out.finish}, {out.tokens} of {max_tokens} tokens"
    return out


async def run(base_url: str, model: str, mix: Mix, short_prompts: list[str], long_prompts: list[str], vocab: int,
              api_key: str = "unused", timeout: float = 300.0,
              on_outcome: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Run the mix against `base_url` (ending in /v1); `vocab` is the served model's vocabulary size (bad ids lie
    past it). `on_outcome` is called as each request ends (a test promotes a version from it)."""
    import httpx
    import openai

    # idle connections are dropped after 2 s, well before any uvicorn server closes them (5 s by default, 30 s under
    # `modelcrew serve`): with httpx's default of 5 s, equal to uvicorn's, a connection reused after ~5 s idle could
    # meet the server's close and fail with no answer (max_retries=0 here, so that a server fault is never hidden)
    http = httpx.AsyncClient(limits=httpx.Limits(max_connections=mix.clients + 8, max_keepalive_connections=mix.clients,
                                                 keepalive_expiry=KEEPALIVE_EXPIRY_S), timeout=timeout)
    client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=timeout, http_client=http)
    kinds = mix.kinds()
    outcomes: list[Outcome] = []

    async def one_client(i: int) -> None:
        kind, long = kinds[i]
        for rnd in range(mix.rounds):
            prompts = long_prompts if long else short_prompts
            o = await _one(client, model, i, rnd, kind, long, mix, prompts[(i + rnd) % len(prompts)], vocab)
            outcomes.append(o)
            if on_outcome is not None:
                on_outcome(o)

    try:
        await asyncio.gather(*(one_client(i) for i in range(mix.clients)))
    finally:
        await client.close()
    return sorted(outcomes, key=lambda o: (o.client, o.round))
