"""Benchmark of the server over real HTTP: its overhead against in-process `generate`, throughput and time to first
token as clients are added, a short request beside a long one, and the load test's mix.

    .venv/bin/python bench/bench_serve.py [--model DIR] [--prompts 12] [--max-tokens 32] [--clients 1,16,64] [--load-clients 200] [--quick]

Model: the embedded SmolLM2-135M-Instruct as converted into the workspace (dequantized from its Q4_1 GGUF; default
`.modelcrew/models/base/smollm2-135m-instruct`, made by `make demo` or any run that uses it). The server is
`modelcrew serve DIR` in its own process (uvicorn on 127.0.0.1, continuous batching, --max-batch 32); every request
goes through the official `openai` client with temperature 0 and `ignore_eos`, so both sides generate exactly the
tokens asked for. The clients run in this process, on the same cores as the server.
1. in-process baseline: transformers' `model.generate` (greedy, KV cache) on each prompt in turn, exactly
   --max-tokens new tokens; then the same prompts one at a time through the server: tokens/s of each.
2. streamed completions from each number of --clients, every client sending requests back to back (the prompts
   twice over, at least 2 each): total tokens/s, and time to first token p50/p99.
3. a 16-token request on an idle server, and again while a 256-token stream runs (median of 3 each).
4. serving/loadtest.py's mix: 200 clients, streaming and not, chat and completions, a quarter long, 10% closing
   their stream mid-answer, 4 sending bad token ids and 2 oversized bodies: unexpected outcomes, latency and
   time to first token p50/p99, tokens/s.
Targets (CPU, 2 cores): 1. the server >= 0.9x in-process; 2. 16 clients >= 3x one client, 64 clients >= 5x;
3. beside a long stream <= 2x idle. Writes bench/results/bench_serve.json and its section of bench/RESULTS.md.
`--quick`: 4 prompts, 16 tokens, 1 and 16 clients, an 8-token request beside a 64-token stream, 40 in the load mix.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import ROOT, WORKSPACE, result_json, stamp, stamp_rows, table, verdict, write_json, write_section
from common import parse

OUT = result_json("bench_serve")
TARGET_VS_GENERATE = 0.9
TARGET_VS_ONE = {16: 3.0, 64: 5.0}  # clients: tokens/s against one client
TARGET_BESIDE = 2.0
FAQ = ROOT / "examples" / "data" / "support_faq.jsonl"


def faq_prompts(n: int) -> tuple[list[str], list[str]]:
    """FAQ questions as completion prompts, and (for the load mix) question + answer as long ones."""
    rows = [json.loads(line) for line in FAQ.read_text(encoding="utf-8").splitlines() if line.strip()]
    short = [f"Question: {r['question']}\nAnswer:" for r in rows[:n]]
    long = [f"Question: {r['question']}\nAnswer: {r['answer']}\nQuestion: {r['question']} Explain it in detail.\nAnswer:"
            for r in rows[:n]]
    return short, long


def start_server(model: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """`modelcrew serve DIR` in its own process, as it is deployed. (In this process, its batcher thread and this
    thread's own torch work would share 2 cores through two OpenMP pools: measured, both run at about 0.6x.)"""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "cli", "serve", str(model), "--port", str(port)], cwd=ROOT,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"bench_serve: the server exited ({proc.returncode}); see {log}")
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
            return proc, f"http://127.0.0.1:{port}/v1"
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"bench_serve: the server did not answer within 300 s; see {log}")


def in_process(model_dir: Path, texts: list[str], max_tokens: int) -> dict:
    import torch

    from serving.engine import LoadedModel

    loaded = LoadedModel(model_dir, "bench")
    tok, model = loaded.tokenizer, loaded.model
    with torch.no_grad():
        for t in texts[:2]:  # warm-up
            model.generate(**tok(t, return_tensors="pt"), max_new_tokens=4, do_sample=False, pad_token_id=loaded.pad_id)
        t0, tokens = time.perf_counter(), 0
        for t in texts:
            enc = tok(t, return_tensors="pt", add_special_tokens=False)  # as the server tokenizes a text prompt
            out = model.generate(**enc, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=loaded.pad_id)
            tokens += out.shape[1] - enc["input_ids"].shape[1]
    seconds = time.perf_counter() - t0
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "vocab": loaded.vocab}


def one_at_a_time(client, name: str, texts: list[str], max_tokens: int) -> dict:
    ask = dict(model=name, max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True})
    for t in texts[:2]:
        client.completions.create(prompt=t, **{**ask, "max_tokens": 4})
    t0, tokens = time.perf_counter(), 0
    for t in texts:
        tokens += client.completions.create(prompt=t, **ask).usage.completion_tokens
    seconds = time.perf_counter() - t0
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def sweep(base_url: str, name: str, texts: list[str], max_tokens: int, clients: int, vocab: int) -> dict:
    from serving.loadtest import Mix, run, summarize

    rounds = max(2, -(-len(texts) // clients))  # one client: each prompt once (as the one-at-a-time pass); more: 2 rounds
    mix = Mix(clients=clients, rounds=rounds, disconnect=0, bad_ids=0, oversized=0, long_share=0, short_tokens=max_tokens,
              only="stream")
    outcomes = asyncio.run(run(base_url, name, mix, texts, texts, vocab))
    s = summarize(outcomes)
    assert not s["unexpected"], s["unexpected"][:3]
    return {"clients": clients, "requests": s["requests"], "tokens": s["tokens"], "seconds": s["wall_s"],
            "tokens_per_s": s["tokens_per_s"], "ttft_p50_s": s["ttft_p50_s"], "ttft_p99_s": s["ttft_p99_s"]}


def beside_long(client, name: str, text: str, long_tokens: int = 256, short_tokens: int = 16) -> dict:
    ask = dict(model=name, prompt=text, max_tokens=short_tokens, temperature=0, extra_body={"ignore_eos": True})

    def short() -> float:
        t0 = time.perf_counter()
        client.completions.create(**ask)
        return time.perf_counter() - t0

    idle = [short() for _ in range(3)]
    started, done = threading.Event(), threading.Event()
    timing: dict = {}

    def long() -> None:
        t0 = time.perf_counter()
        stream = client.completions.create(model=name, prompt=text, max_tokens=long_tokens, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                started.set()
        timing["long_s"] = time.perf_counter() - t0
        done.set()

    thread = threading.Thread(target=long)
    thread.start()
    started.wait(120)
    beside = [short() for _ in range(3)]
    still_running = not done.is_set()
    thread.join()
    return {"idle_s": statistics.median(idle), "beside_s": statistics.median(beside), "long_s": timing["long_s"],
            "long_tokens": long_tokens, "short_tokens": short_tokens, "long_still_running": still_running,
            "ratio": statistics.median(beside) / statistics.median(idle)}


def load_mix(base_url: str, name: str, short: list[str], long: list[str], vocab: int, clients: int) -> dict:
    from serving.loadtest import Mix, run, summarize

    mix = Mix(clients=clients)
    began = time.perf_counter()
    s = summarize(asyncio.run(run(base_url, name, mix, short, long, vocab)))
    return {**{k: s[k] for k in ("requests", "by_kind", "latency_p50_s", "latency_p99_s", "ttft_p50_s", "ttft_p99_s",
                                 "tokens", "tokens_per_s")},
            "unexpected": len(s["unexpected"]), "unexpected_first": s["unexpected"][:3], "seconds": time.perf_counter() - began,
            "clients": mix.clients, "short_tokens": mix.short_tokens, "long_tokens": mix.long_tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="default: the embedded SmolLM2 converted into .modelcrew")
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--clients", default="1,16,64", help="comma-separated numbers of concurrent clients (1 first)")
    ap.add_argument("--load-clients", type=int, default=200, help="clients of the load mix")
    ap.add_argument("--quick", action="store_true", help="4 prompts, 16 tokens, 1 and 16 clients, 40 in the load mix")
    a = parse(ap)
    if a.quick:
        a.prompts, a.max_tokens, a.clients, a.load_clients = 4, 16, "1,16", 40
    if a.model is None:  # converted from its GGUF on first use, as a goal naming it would
        from training.models import base_dir

        a.model = base_dir("smollm2-135m-instruct", WORKSPACE)
    if not (a.model / "config.json").exists():
        raise SystemExit(f"bench_serve: no model at {a.model} (run 'make demo' first, or pass --model DIR)")
    import openai
    import torch

    levels = [int(c) for c in a.clients.split(",")]
    short, long = faq_prompts(a.prompts)
    print("1. in-process generate ...", flush=True)
    generate = in_process(a.model, short, a.max_tokens)
    server, base_url = start_server(a.model, Path(tempfile.gettempdir()) / "bench_serve-server.log")
    name, vocab = a.model.name, generate.pop("vocab")
    client = openai.OpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=600)
    print("1. the server, one request at a time ...", flush=True)
    http1 = one_at_a_time(client, name, short, a.max_tokens)
    runs = {}
    for c in levels:
        print(f"2. {c} concurrent clients ...", flush=True)
        runs[c] = sweep(base_url, name, short, a.max_tokens, c, vocab)
    print("3. a short request beside a long stream ...", flush=True)
    side = beside_long(client, name, short[0], *((64, 8) if a.quick else (256, 16)))
    print(f"4. the load mix ({a.load_clients} clients) ...", flush=True)
    try:
        load = load_mix(base_url, name, short, long, vocab, a.load_clients)
    finally:
        server.terminate()
        server.wait(30)

    one = runs[levels[0]]["tokens_per_s"]
    out = {"model": name, "prompts": len(short), "max_tokens": a.max_tokens, "max_batch": 32,  # `modelcrew serve`'s default
           "generate": generate, "http_one_at_a_time": http1, "http_vs_generate": http1["tokens_per_s"] / generate["tokens_per_s"],
           "concurrency": {str(c): {**r, "vs_one": r["tokens_per_s"] / one} for c, r in runs.items()},
           "beside_long": side, "load": load, "threads": torch.get_num_threads(),
           "device": "cuda" if torch.cuda.is_available() else "cpu", **stamp(),
           "targets": {"vs_generate": TARGET_VS_GENERATE, "vs_one": {str(c): t for c, t in TARGET_VS_ONE.items()},
                       "beside_long": TARGET_BESIDE}}
    targets = TARGET_VS_ONE
    ok_http = out["http_vs_generate"] >= TARGET_VS_GENERATE
    ok_side = side["ratio"] <= TARGET_BESIDE
    out["summary"] = [
        {"target": f"serving over HTTP, one request at a time: >= {TARGET_VS_GENERATE:g}x in-process generate's tokens/s",
         "figure": f"{out['http_vs_generate']:.2f}x", "met": ok_http},
        *({"target": f"{c} concurrent clients: >= {t:g}x one client's tokens/s", "figure": f"{runs[c]['tokens_per_s'] / one:.2f}x",
           "met": runs[c]["tokens_per_s"] / one >= t} for c, t in targets.items() if c in runs),
        {"target": f"a short request beside a long stream: <= {TARGET_BESIDE:g}x its time on an idle server",
         "figure": f"{side['ratio']:.2f}x", "met": ok_side},
        {"target": f"load mix of {load['clients']} clients: no unexpected outcome", "figure": f"{load['unexpected']} unexpected",
         "met": load["unexpected"] == 0}]
    write_json(OUT, out)
    conc_rows = [(f"{c} client{'s' if c > 1 else ''} ({r['requests']} streamed requests)",
                  f"{r['tokens_per_s']:.1f} tokens/s ({r['tokens_per_s'] / one:.2f}x one client); first token p50 "
                  f"{r['ttft_p50_s']:.2f} s, p99 {r['ttft_p99_s']:.2f} s") for c, r in runs.items()]
    target_rows = [(f"target: {c} clients >= {t:g}x one client", f"{runs[c]['tokens_per_s'] / one:.2f}x -> "
                    f"{verdict(runs[c]['tokens_per_s'] / one >= t)}") for c, t in targets.items() if c in runs]
    dtype = "bfloat16" if out["device"] == "cuda" else "float32"
    lines = ["", "## Serving (`bench/bench_serve.py`)", "",
             f"Generated by `bench/bench_serve.py --prompts {len(short)} --max-tokens {a.max_tokens} --clients {a.clients} "
             f"--load-clients {a.load_clients}` "
             f"from `bench/results/bench_serve.json`. Model {name} ({dtype} on {out['device']}; dequantized from the Q4_1 GGUF "
             f"it is embedded as), greedy, FAQ questions as prompts, every answer exactly the tokens asked for (`ignore_eos`). "
             f"The server is `modelcrew serve` in its own process (continuous batching, at most {out['max_batch']} requests "
             "in a batch); the clients, the official `openai` client over loopback HTTP, run in the bench's process on the "
             "same cores.", "",
             *table([*stamp_rows(out, f"torch threads {out['threads']}, "),
                     ("in-process `model.generate`, one prompt at a time",
                      f"{generate['tokens_per_s']:.1f} tokens/s ({generate['tokens']} tokens in {generate['seconds']:.1f} s)"),
                     ("the server, one request at a time (HTTP)",
                      f"{http1['tokens_per_s']:.1f} tokens/s ({http1['tokens']} tokens in {http1['seconds']:.1f} s)"),
                     (f"target: the server >= {TARGET_VS_GENERATE:g}x in-process", f"{out['http_vs_generate']:.2f}x -> {verdict(ok_http)}"),
                     *conc_rows, *target_rows,
                     (f"a {side['short_tokens']}-token request, idle server / beside a {side['long_tokens']}-token stream "
                      "(median of 3)", f"{side['idle_s']:.2f} s / {side['beside_s']:.2f} s"
                      + ("" if side["long_still_running"] else " (the long stream had ended: not a fair test)")),
                     (f"target: beside a long stream <= {TARGET_BESIDE:g}x idle", f"{side['ratio']:.2f}x -> {verdict(ok_side)}"),
                     (f"load mix: {load['requests']} requests from {load['clients']} clients ({', '.join(f'{k} {v}' for k, v in load['by_kind'].items())})",
                      f"{load['unexpected']} unexpected outcomes; latency p50 {load['latency_p50_s']:.2f} s, p99 "
                      f"{load['latency_p99_s']:.2f} s; first token p50 {load['ttft_p50_s']:.2f} s, p99 {load['ttft_p99_s']:.2f} s; "
                      f"{load['tokens_per_s']:.1f} tokens/s over {load['seconds']:.1f} s")]), ""]
    write_section("bench_serve", lines)
    print("\n".join(lines[5:-1]))


if __name__ == "__main__":
    main()
