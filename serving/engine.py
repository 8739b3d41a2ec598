"""Text generation for the server: one worker thread per loaded model that batches concurrent requests.

Requests wait in a queue; the worker takes every request waiting (up to `max_batch`, after a few ms
for stragglers; the prompts of one call always together), left-pads their prompts into one batch and
decodes them together with a KV cache — one forward pass per token for the whole batch instead of one
per request. Each request keeps its own sampling settings (temperature, top_p, seed), stop sequences
and token budget, and receives its tokens as events as soon as they are decoded (streaming), ending
with exactly one finish reason.
"""

from __future__ import annotations

import inspect
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

DONE = object()  # sentinel: the worker finishes what is queued, then stops


@dataclass
class Request:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # top alternatives per token (0 = only the chosen token's logprob)
    echo_logprobs: bool = False  # also score the prompt's tokens (completions with echo)
    emit: Callable[[dict], None] = print  # called from the worker thread with each event


class LoadedModel:
    """A model and tokenizer from a directory (full weights, or an adapter over its base)."""

    def __init__(self, model_dir: Path, label: str, device: str | None = None) -> None:
        import json

        from training.models import load_base

        self.label, self.dir = label, Path(model_dir)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if (self.dir / "adapter_config.json").exists():
            from peft import PeftModel

            base_dir = json.loads((self.dir / "lineage.json").read_text(encoding="utf-8"))["base_dir"]
            base, self.tokenizer = load_base(Path(base_dir), dtype=self._dtype())
            self.model = PeftModel.from_pretrained(base, str(self.dir)).merge_and_unload()
        else:
            self.model, self.tokenizer = load_base(self.dir, dtype=self._dtype())
        self.model.to(self.device).eval()
        # transformers >= 5.2x names the KV cache `cache`; earlier versions `past_key_values`
        self.cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        config = self.model.config
        self.context = int(getattr(config, "max_position_embeddings", 2048) or 2048)
        eos = config.eos_token_id if config.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}
        if getattr(self.tokenizer, "chat_template", None):  # a turn ends at the template's end of turn, EOS or not
            from training.evaluate import end_of_turn_ids

            self.eos_ids |= set(end_of_turn_ids(self.tokenizer))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        # ids a client may send: the tokenizer must decode them (echo) and the embedding must hold them
        self.vocab = min(len(self.tokenizer), int(getattr(config, "vocab_size", None) or len(self.tokenizer)))

    def _dtype(self):
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32


class Batcher(threading.Thread):
    def __init__(self, loaded: LoadedModel, max_batch: int = 32, wait_ms: float = 5.0) -> None:
        super().__init__(daemon=True, name=f"batcher-{loaded.label}")
        self.loaded, self.max_batch, self.wait = loaded, max_batch, wait_ms / 1000
        self.queue: queue.Queue = queue.Queue()
        self.batches, self.batched_requests = 0, 0  # for /health and tests: how much batching happened

    def submit(self, *requests: Request) -> None:
        """Queue requests; those given together (one call's prompts) are decoded in the same batch, in chunks
        of max_batch, so a list prompt never waits on the timing of its own parts."""
        for i in range(0, len(requests), self.max_batch):
            self.queue.put(list(requests[i:i + self.max_batch]))

    def stop(self) -> None:
        self.queue.put(DONE)

    def run(self) -> None:
        held = None  # a group that did not fit the last batch: it starts the next one
        while True:
            first, held = (held if held is not None else self.queue.get()), None
            if first is DONE:
                return
            batch, stopping = list(first), False
            deadline = time.monotonic() + self.wait
            while len(batch) < self.max_batch:
                try:
                    nxt = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is DONE:
                    stopping = True
                    break
                if len(batch) + len(nxt) > self.max_batch:
                    held = nxt
                    break
                batch.extend(nxt)
            self.batches += 1
            self.batched_requests += len(batch)
            try:
                generate(self.loaded, batch)
            except Exception as err:  # never leave a client waiting: every request gets its error
                for r in batch:
                    r.emit({"type": "error", "message": f"{type(err).__name__}: {err}"})
            if stopping:
                return


def _hold_back(text: str, stops: list[str]) -> int:
    """How many trailing characters might be the start of a stop sequence (not yet safe to send)."""
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return hold


@torch.no_grad()
def generate(loaded: LoadedModel, batch: list[Request]) -> None:
    model, tok, device = loaded.model, loaded.tokenizer, loaded.device
    width = max(len(r.prompt_ids) for r in batch)
    ids = torch.full((len(batch), width), loaded.pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, r in enumerate(batch):  # left padding: every prompt ends at the last column
        ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
        mask[i, width - len(r.prompt_ids):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    past, logits = _cache_of(out), out.logits[:, -1, :].float()

    for i, r in enumerate(batch):
        if r.echo_logprobs:
            logp = torch.log_softmax(out.logits[i, width - len(r.prompt_ids):-1].float(), -1)
            first = {"token": tok.decode([r.prompt_ids[0]]), "logprob": None, "top": None}  # nothing to score it in
            scored = [first] + [_logprob_entry(tok, logp[j], r.prompt_ids[j + 1], r.logprobs or 0)
                                for j in range(len(r.prompt_ids) - 1)]
            r.emit({"type": "prompt_logprobs", "entries": scored})
    del out

    generators = []
    for r in batch:
        g = torch.Generator(device="cpu")
        g.manual_seed(r.seed if r.seed is not None else torch.seed())
        generators.append(g)
    generated: list[list[int]] = [[] for _ in batch]
    sent = [""] * len(batch)
    active = [r.max_tokens > 0 for r in batch]
    for i, r in enumerate(batch):
        if not active[i]:
            r.emit({"type": "finish", "reason": "length", "completion_tokens": 0})
    last_pos = positions[:, -1:]
    while any(active):
        logp_all = torch.log_softmax(logits, -1)
        next_ids = []
        for i, r in enumerate(batch):
            if not active[i]:
                next_ids.append(loaded.pad_id)
                continue
            token = _sample(logits[i], r, generators[i])
            next_ids.append(token)
            if token in loaded.eos_ids:
                active[i] = False
                _flush(tok, r, generated[i], sent, i, final=True)
                # the end token's logprob rides on the finish event: completions list it (lm-eval's echo scoring
                # drops the last entry as the generated token, so one must be there); chat leaves it out
                entry = _logprob_entry(tok, logp_all[i], token, r.logprobs) if r.logprobs is not None else None
                r.emit({"type": "finish", "reason": "stop", "completion_tokens": len(generated[i]), "logprob": entry})
                continue
            generated[i].append(token)
            entry = _logprob_entry(tok, logp_all[i], token, r.logprobs) if r.logprobs is not None else None
            stopped = _flush(tok, r, generated[i], sent, i, entry=entry)
            if stopped:
                active[i] = False
                r.emit({"type": "finish", "reason": "stop", "completion_tokens": len(generated[i])})
            elif len(generated[i]) >= r.max_tokens:
                active[i] = False
                _flush(tok, r, generated[i], sent, i, final=True)
                r.emit({"type": "finish", "reason": "length", "completion_tokens": len(generated[i])})
        if not any(active):
            break
        step = torch.tensor(next_ids, dtype=torch.long, device=device).unsqueeze(1)
        mask = torch.cat([mask, torch.ones_like(step)], dim=1)
        last_pos = last_pos + 1
        out = model(input_ids=step, attention_mask=mask, position_ids=last_pos, use_cache=True, **{loaded.cache_arg: past})
        past, logits = _cache_of(out), out.logits[:, -1, :].float()


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _sample(logits: torch.Tensor, r: Request, generator: torch.Generator) -> int:
    if r.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / r.temperature, -1).cpu()
    if r.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < r.top_p  # the smallest set whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


def _logprob_entry(tok, logp: torch.Tensor, token: int, top: int) -> dict:
    entry = {"token": tok.decode([token]), "logprob": float(logp[token]), "top": {}}
    if top:
        values, indices = torch.topk(logp, top)
        entry["top"] = {tok.decode([int(i)]): float(v) for v, i in zip(values, indices)}
    return entry


def _flush(tok, r: Request, generated: list[int], sent: list[str], i: int, entry: dict | None = None,
           final: bool = False) -> bool:
    """Send the text decoded since the last event; True when a stop sequence ended the request."""
    text = tok.decode(generated, skip_special_tokens=True)
    for s in r.stop:
        cut = text.find(s)
        if cut != -1:
            if cut > len(sent[i]):
                r.emit({"type": "text", "text": text[len(sent[i]):cut], "logprob": entry})
            sent[i] = text[:cut]
            return True
    if not final and (text.endswith("\ufffd") or _hold_back(text, r.stop)):
        ready = text[: len(text) - max(_hold_back(text, r.stop), 1 if text.endswith("\ufffd") else 0)]
    else:
        ready = text
    if len(ready) > len(sent[i]) or entry is not None:
        r.emit({"type": "text", "text": ready[len(sent[i]):], "logprob": entry})
        sent[i] = max(ready, sent[i], key=len)
    return False
