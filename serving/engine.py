"""Text generation for the server: one worker thread per loaded model that batches requests continuously.

Requests wait in a queue. Between two decode steps the worker admits what is waiting, up to `max_batch`
running at once (the prompts of one call always together, after a few ms for stragglers when it was idle):
it prefills their prompts in one forward pass, computing the output layer only at each prompt's last
position (or at every prompt position for a request that scores its prompt: echo with logprobs), and
left-pads their KV cache rows into the running batch's. Each step then decodes one token for every running
request in one forward pass; a request leaves the batch as soon as it finishes, or at the next step once
its client has cancelled it, so a short request never waits for a long one. Each request keeps its own
sampling settings (temperature, top_p, seed), stop sequences and token budget, and receives its tokens as
events as soon as they are decoded (streaming), ending with exactly one finish reason (or one error).
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

DONE = object()  # sentinel: the worker finishes what is queued and running, then stops
ECHO_CHUNK = 512  # prompt positions scored at once for echo: bounds the [positions, vocab] logits of a long prompt


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
    ignore_eos: bool = False  # generate past the end token (fixed-length benchmarks); stops and max_tokens still end it
    cancelled: bool = False  # set by the server when its client went away: leaves the batch at the next step


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
        # the decoder and the output layer apart, as training's NextTokenLoss uses them: the output layer runs only
        # on the positions whose logits are needed (a prompt's [seq, vocab] logits are most of a prefill's memory)
        self.decoder, self.head = self.model.get_decoder(), self.model.get_output_embeddings()
        self.decoder_cache_arg = ("cache" if "cache" in inspect.signature(self.decoder.forward).parameters
                                  else "past_key_values")
        self.softcap = getattr(self.model.config, "final_logit_softcapping", None)
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

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden).float()
        return torch.tanh(logits / self.softcap) * self.softcap if self.softcap else logits


class _Row:
    """A request in the running batch: its sampler, what it has generated and sent, and its next input."""

    def __init__(self, req: Request) -> None:
        self.req = req
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(req.seed if req.seed is not None else torch.seed())
        self.generated: list[int] = []
        self.sent = ""
        self.position = len(req.prompt_ids)  # the position id of `token`, fed at the next step
        self.token: int | None = None  # sampled, not yet in the KV cache
        self.done = False

    def emit(self, event: dict) -> None:
        _emit(self.req, event)

    def finish(self, reason: str, **extra) -> None:
        self.done = True
        self.emit({"type": "finish", "reason": reason, "completion_tokens": len(self.generated), **extra})


def _emit(req: Request, event: dict) -> None:
    """Send an event; a listener that raises (its client is gone) cancels its request instead of failing the batch."""
    try:
        req.emit(event)
    except Exception:
        req.cancelled = True


class Batcher(threading.Thread):
    def __init__(self, loaded: LoadedModel, max_batch: int = 32, wait_ms: float = 5.0) -> None:
        super().__init__(daemon=True, name=f"batcher-{loaded.label}")
        self.loaded, self.max_batch, self.wait = loaded, max_batch, wait_ms / 1000
        self.queue: queue.Queue = queue.Queue()
        # for /health and tests: prefills (each admits the requests that join the batch together) and requests admitted;
        # decode steps, and those that served more than one request at once
        self.batches, self.batched_requests = 0, 0
        self.steps, self.shared_steps = 0, 0
        self.rows: list[_Row] = []  # the running batch, in the KV cache's row order
        self.cache = None
        self.mask: torch.Tensor | None = None  # [rows, cached positions + 1]: 0 where a row is left-padded
        self.mergeable: bool | None = None  # can rows join a running cache (plain or sliding-window layers)? known after a prefill
        self._joining: list[_Row] = []  # being prefilled and merged: a failure there must reach them too
        self._held: list[Request] | None = None  # a group with no room yet: it joins first when rows leave
        self._stopping = False
        self._lock = threading.Lock()  # submit vs exit: a request is either queued before the worker exits or refused
        self._closed = False

    def submit(self, *requests: Request) -> None:
        """Queue requests; those given together (one call's prompts) join the batch at the same step, in chunks
        of max_batch, so a list prompt never waits on the timing of its own parts."""
        with self._lock:
            if self._closed:  # stopped and exited: never leave a client waiting on a worker that is gone
                for r in requests:
                    _emit(r, {"type": "error", "message": "the model was unloaded before this request ran; send it again"})
                return
            for i in range(0, len(requests), self.max_batch):
                self.queue.put(list(requests[i:i + self.max_batch]))

    def stop(self) -> None:
        self.queue.put(DONE)

    def run(self) -> None:
        while True:
            try:
                self._admit()
                if self.rows:
                    self._step()
                elif self._stopping and self._exit():
                    return
            except Exception as err:  # a failure of the shared step or cache: every request in it gets its error
                self._fail(self.rows + self._joining, err)
                self.rows, self.cache, self.mask, self._joining = [], None, None, []

    def _exit(self) -> bool:
        with self._lock:
            if self._held is None and self.queue.empty():
                self._closed = True
                return True
        return False

    def _take(self, timeout: float | None) -> list[Request] | None:
        """The next group: the held one, else from the queue (waiting up to `timeout`; None: until one comes)."""
        if self._held is not None:
            group, self._held = self._held, None
            return group
        try:
            item = self.queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if item is DONE:
            self._stopping = True
            return None
        return item

    def _admit(self) -> None:
        """Prefill the groups waiting, as many as fit, and add them to the running batch."""
        if self.rows and self.mergeable is False:
            return  # this model's cache cannot take rows mid-way: new requests wait for the batch to drain
        joining: list[Request] = []
        deadline = None
        while True:
            if self.rows:
                timeout = 0.0  # never hold up the running batch
            elif joining:
                timeout = max(0.0, deadline - time.monotonic())  # stragglers of a burst join together
            else:
                timeout = 0.0 if self._stopping else None
            group = self._take(timeout)
            if group is None:
                break
            if len(self.rows) + len(joining) + len(group) > self.max_batch:
                self._held = group
                break
            joining.extend(group)
            deadline = deadline or time.monotonic() + self.wait
        for r in [r for r in joining if r.cancelled]:
            _emit(r, {"type": "finish", "reason": "cancelled", "completion_tokens": 0})
        joining = [r for r in joining if not r.cancelled]
        if joining:
            self._join(joining)

    @torch.no_grad()
    def _join(self, requests: list[Request]) -> None:
        loaded = self.loaded
        rows = self._joining = [_Row(r) for r in requests]
        try:
            cache, mask, logits, scored = self._prefill(rows)
        except Exception as err:
            self._joining = []
            if len(requests) == 1:
                self._fail(rows, err)
            else:  # whose prompt failed? each alone: only that one gets the error
                for r in requests:
                    self._join([r])
            return
        for row, entries in zip(rows, scored):
            if entries is not None:
                row.emit({"type": "prompt_logprobs", "entries": entries})
        if self.mergeable is None:
            self.mergeable = _joinable(cache)
        self.batches += 1
        self.batched_requests += len(rows)
        for row in rows:
            if row.req.max_tokens <= 0:
                row.finish("length")
        self._advance(rows, logits)
        keep = [i for i, row in enumerate(rows) if not row.done]
        self._joining = [rows[i] for i in keep]
        if not keep:
            return
        if len(keep) < len(rows):
            cache.batch_select_indices(torch.tensor(keep, device=loaded.device))
            mask = mask[keep]
        rows = [rows[i] for i in keep]
        if not self.rows:
            self.rows, self.cache, self.mask, self._joining = rows, cache, mask, []
            return
        # both sides left-padded to the longer cache: a row's real positions always end at the last column
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers):
            kept = _kept(mine, width)
            mine.keys = torch.cat([_left_pad(mine.keys, kept), _left_pad(theirs.keys, kept)])
            mine.values = torch.cat([_left_pad(mine.values, kept), _left_pad(theirs.values, kept)])
            if _sliding(mine):
                mine.cumulative_length = width
        self.mask = torch.cat([_left_pad(self.mask, width), _left_pad(mask, width)])
        self.rows, self._joining = self.rows + rows, []

    def _prefill(self, rows: list[_Row]):
        """The joining prompts in one forward pass: their KV cache, mask, next-token logits and (echo) prompt scores."""
        loaded, tok = self.loaded, self.loaded.tokenizer
        width = max(len(row.req.prompt_ids) for row in rows)
        ids = torch.full((len(rows), width), loaded.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):  # left padding: every prompt ends at the last column
            ids[i, width - len(row.req.prompt_ids):] = torch.tensor(row.req.prompt_ids)
            mask[i, width - len(row.req.prompt_ids):] = 1
        ids, mask = ids.to(loaded.device), mask.to(loaded.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = loaded.decoder(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        hidden = out.last_hidden_state
        scored: list[list[dict] | None] = []
        for i, row in enumerate(rows):
            r = row.req
            if not r.echo_logprobs:
                scored.append(None)
                continue
            start = width - len(r.prompt_ids)
            entries = [{"token": tok.decode([r.prompt_ids[0]]), "logprob": None, "top": None}]  # nothing to score it in
            for a in range(0, len(r.prompt_ids) - 1, ECHO_CHUNK):  # position j predicts prompt token j + 1
                b = min(a + ECHO_CHUNK, len(r.prompt_ids) - 1)
                logp = torch.log_softmax(loaded.logits(hidden[i, start + a:start + b]), -1)
                entries += [_logprob_entry(tok, logp[j - a], r.prompt_ids[j + 1], r.logprobs or 0) for j in range(a, b)]
            scored.append(entries)
        return _cache_of(out), mask, loaded.logits(hidden[:, -1]), scored

    @torch.no_grad()
    def _step(self) -> None:
        """Drop cancelled rows, then decode one token for every running request in one forward pass."""
        for row in self.rows:
            if row.req.cancelled:
                row.finish("cancelled")
        self._keep()
        if not self.rows:
            return
        loaded = self.loaded
        tokens = torch.tensor([[row.token] for row in self.rows], dtype=torch.long, device=loaded.device)
        positions = torch.tensor([[row.position] for row in self.rows], dtype=torch.long, device=loaded.device)
        self.mask = torch.cat([self.mask, torch.ones_like(tokens)], dim=1)
        out = loaded.decoder(input_ids=tokens, attention_mask=self.mask, position_ids=positions, use_cache=True,
                             **{loaded.decoder_cache_arg: self.cache})
        self.cache = _cache_of(out)
        self.steps += 1
        self.shared_steps += len(self.rows) > 1
        for row in self.rows:
            row.position += 1
        self._advance(self.rows, loaded.logits(out.last_hidden_state[:, -1]))
        self._keep()

    def _keep(self) -> None:
        """Drop finished rows from the batch and its cache, and the columns that are padding in every row left."""
        keep = [i for i, row in enumerate(self.rows) if not row.done]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache, self.mask = None, None
            return
        self.cache.batch_select_indices(torch.tensor(keep, device=self.mask.device))
        self.mask = self.mask[keep]
        lead = int((self.mask.cumsum(-1) == 0).sum(-1).min())  # rows are padded on the left only
        if lead and self.mergeable:
            self.mask = self.mask[:, lead:]
            width = self.mask.shape[1]
            for layer in self.cache.layers:  # a sliding window's cache holds the last columns only: it may keep them all
                kept = _kept(layer, width)
                layer.keys, layer.values = layer.keys[..., -kept:, :], layer.values[..., -kept:, :]
                if _sliding(layer):
                    layer.cumulative_length = width

    def _advance(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Sample each active row's next token from its logits, send it, and finish the rows that are done."""
        logp_all = None
        for i, row in enumerate(rows):
            if row.done:
                continue
            try:
                if row.req.logprobs is not None and logp_all is None:
                    logp_all = torch.log_softmax(logits, -1)
                self._next(row, logits[i], logp_all[i] if logp_all is not None else None)
            except Exception as err:  # one request's sampling or decoding: only it fails
                self._fail([row], err)

    def _next(self, row: _Row, logits: torch.Tensor, logp: torch.Tensor | None) -> None:
        loaded, tok, r = self.loaded, self.loaded.tokenizer, row.req
        token = _sample(logits, r, row.generator)
        entry = _logprob_entry(tok, logp, token, r.logprobs) if r.logprobs is not None else None
        if token in loaded.eos_ids and not r.ignore_eos:
            _flush(tok, row, final=True)
            # the end token's logprob rides on the finish event: completions list it (lm-eval's echo scoring
            # drops the last entry as the generated token, so one must be there); chat leaves it out
            row.finish("stop", logprob=entry)
            return
        row.generated.append(token)
        if _flush(tok, row, entry=entry):
            row.finish("stop")
        elif len(row.generated) >= r.max_tokens:
            _flush(tok, row, final=True)
            row.finish("length")
        else:
            row.token = token

    def _fail(self, rows: list[_Row], err: Exception) -> None:
        for row in rows:
            if not row.done:
                row.done = True
                row.emit({"type": "error", "message": f"{type(err).__name__}: {err}"})


def _joinable(cache) -> bool:
    """Whether rows can be padded into this cache mid-way: every layer a growing [batch, heads, seq, dim] one, either
    plain (every column) or a sliding window's (the last `sliding_window - 1` columns, as Gemma 3 alternates them)."""
    try:
        from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
    except ImportError:
        return False
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer or
                                (type(layer) is DynamicSlidingWindowLayer and not layer.record_past) for layer in layers)


def _sliding(layer) -> bool:
    return getattr(layer, "is_sliding", False)


def _kept(layer, width: int) -> int:
    """How many of a batch's `width` columns a layer keeps: all, or a sliding window's last `sliding_window - 1`.
    Every row shares one column space (left-padded), so a window's count (`cumulative_length`) is the batch's width
    and the mask built from it lines each row's real positions up at the end."""
    return min(width, layer.sliding_window - 1) if _sliding(layer) else width


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """Zeros before the sequence dimension (a mask's last, a cache's second to last) up to `width`."""
    dim = -1 if t.dim() == 2 else -2
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _hold_back(text: str, stops: list[str]) -> int:
    """How many trailing characters might be the start of a stop sequence (not yet safe to send)."""
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return hold


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


def _flush(tok, row: _Row, entry: dict | None = None, final: bool = False) -> bool:
    """Send the text decoded since the last event; True when a stop sequence ended the request."""
    r = row.req
    text = tok.decode(row.generated, skip_special_tokens=True)
    for s in r.stop:
        cut = text.find(s)
        if cut != -1:
            if cut > len(row.sent):
                row.emit({"type": "text", "text": text[len(row.sent):cut], "logprob": entry})
            row.sent = text[:cut]
            return True
    if not final and (text.endswith("\ufffd") or _hold_back(text, r.stop)):
        ready = text[: len(text) - max(_hold_back(text, r.stop), 1 if text.endswith("\ufffd") else 0)]
    else:
        ready = text
    if len(ready) > len(row.sent) or entry is not None:
        row.emit({"type": "text", "text": ready[len(row.sent):], "logprob": entry})
        row.sent = max(ready, row.sent, key=len)
    return False
