"""An OpenAI-compatible HTTP server over a registry reference or a model directory (FastAPI + uvicorn).

    GET  /health                 GET /v1/models
    POST /v1/completions         (echo + logprobs, so lm-evaluation-harness's local-completions can score it)
    POST /v1/chat/completions    (the model's chat template)

A completion's `prompt` is text, token ids, or a list of either: several prompts are decoded as one batch
and answered as one choice each, in order, with summed usage (streaming takes one prompt).

Streaming is server-sent events in OpenAI's chunk format ending with `data: [DONE]`. Errors come in
OpenAI's shape: bad parameters 400, missing or wrong key 401 (when an API key is set), unknown model 404.
Serving `name@production` follows promotions and rollbacks without a restart: each request resolves
the reference, a new version is loaded when it changed, and requests already running finish on the
version they started with.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from serving.engine import Batcher, LoadedModel, Request
from training.errors import InputError


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


MAX_STOPS = 16


class StreamOptions(BaseModel):
    include_usage: bool = False


class CommonParams(BaseModel):
    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        # OpenAI allows 4; lm-eval's local-completions sends a task's `until` plus the end-of-text string (often more)
        if len(stops) > MAX_STOPS or any(not s for s in stops):
            raise APIError(400, f"stop: at most {MAX_STOPS} non-empty sequences", param="stop")
        return stops


class CompletionParams(CommonParams):
    prompt: str | list  # text, token ids, or a list of either; checked by _prompts for a clear message
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    max_tokens: int | None = Field(16, ge=0)


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatParams(CommonParams):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_completion_tokens: int | None = Field(None, ge=0)


class Slot:
    """What a reference points to now, loaded, with its batcher; swapped when the registry moves."""

    def __init__(self, ref: str, workspace: Path | None, max_batch: int, device: str | None) -> None:
        self.ref, self.workspace, self.max_batch, self.device = ref, workspace, max_batch, device
        self.lock = threading.Lock()
        self.current: tuple[str, LoadedModel, Batcher] | None = None
        path = Path(ref)
        self.static = path.is_dir()
        self.name = path.name if self.static else ref.partition("@")[0]

    def _target(self) -> tuple[str, Path]:
        if self.static:
            return str(Path(self.ref).resolve()), Path(self.ref)
        from serving.registry import Registry

        name, version, path = Registry(self.workspace).resolve(self.ref)
        return f"{name}@{version.version}", path

    def get(self) -> tuple[str, LoadedModel, Batcher]:
        key, path = self._target()
        with self.lock:
            if self.current is None or self.current[0] != key:
                loaded = LoadedModel(path, key, self.device)
                batcher = Batcher(loaded, self.max_batch)
                batcher.start()
                if self.current is not None:
                    self.current[2].stop()  # finishes what it has queued (in-flight requests), then exits
                self.current = (key, loaded, batcher)
            return self.current


def create_app(ref: str, workspace: Path | None = None, api_key: str | None = None, max_batch: int = 32,
               device: str | None = None) -> FastAPI:
    slot = Slot(ref, workspace, max_batch, device)
    slot.get()  # load now: a bad reference fails at start, not at the first request
    app = FastAPI(title="modelcrew", docs_url=None, redoc_url=None)
    app.state.slot = slot

    @app.exception_handler(APIError)
    async def _api_error(_, err: APIError):
        return JSONResponse(error_body(err.message, err.type, err.param, err.code), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        return JSONResponse(error_body(f"{param or 'body'}: {first['msg']}", "invalid_request_error", param), status_code=400)

    @app.exception_handler(InputError)
    async def _input_error(_, err: InputError):
        return JSONResponse(error_body(str(err), "invalid_request_error"), status_code=400)

    @app.middleware("http")
    async def _auth(request: HTTPRequest, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            header = request.headers.get("authorization", "")
            if header != f"Bearer {api_key}":
                why = "missing API key" if not header else "incorrect API key"
                return JSONResponse(error_body(f"{why}: pass it as 'Authorization: Bearer KEY'", "invalid_request_error",
                                               code="invalid_api_key"), status_code=401)
        return await call_next(request)

    def served_ids() -> set[str]:
        return {slot.name, slot.ref}

    def check_model(model: str) -> None:
        if model not in served_ids():
            raise APIError(404, f"model {model!r} does not exist; this server serves {slot.name!r}", code="model_not_found")

    @app.get("/health")
    def health():
        key, _, batcher = slot.get()
        return {"status": "ok", "model": slot.name, "version": key, "batches": batcher.batches,
                "batched_requests": batcher.batched_requests}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": slot.name, "object": "model", "created": 0, "owned_by": "modelcrew"}]}

    @app.post("/v1/completions")
    async def completions(params: CompletionParams):
        check_model(params.model)
        key, loaded, batcher = slot.get()
        prompts = _prompts(params.prompt, loaded)
        if params.stream and len(prompts) > 1:
            raise APIError(400, f"stream: streaming takes one prompt, not {len(prompts)}; send a list without stream",
                           param="stream")
        reqs = [_request(params, ids, loaded, params.max_tokens, params.logprobs, params.echo and params.logprobs is not None)
                for ids, _ in prompts]  # all checked before any is queued: a bad prompt fails the whole request
        echoes = [text for _, text in prompts] if params.echo else None
        return await _respond(reqs, batcher, params, "text_completion", key, echoes)

    @app.post("/v1/chat/completions")
    async def chat(params: ChatParams):
        check_model(params.model)
        key, loaded, batcher = slot.get()
        if not getattr(loaded.tokenizer, "chat_template", None):
            raise APIError(400, f"{slot.name} has no chat template; use /v1/completions", param="messages")
        from training.batches import render_chat

        ids = render_chat(loaded.tokenizer, [m.model_dump() for m in params.messages], add_generation_prompt=True)
        top = (params.top_logprobs or 0) if params.logprobs else None
        req = _request(params, ids, loaded, params.max_completion_tokens or params.max_tokens, top, False)
        return await _respond([req], batcher, params, "chat.completion", key)

    return app


def _request(params: CommonParams, ids: list[int], loaded: LoadedModel, max_tokens: int | None, logprobs: int | None,
             echo_logprobs: bool) -> Request:
    room = loaded.context - len(ids)
    if room < 0 or (room == 0 and max_tokens != 0):  # scoring a prompt alone (max_tokens 0) may fill the context
        raise APIError(400, f"the prompt has {len(ids)} tokens but the model's context is {loaded.context}; shorten it",
                       param="messages" if isinstance(params, ChatParams) else "prompt", code="context_length_exceeded")
    if max_tokens is not None and max_tokens > room:
        raise APIError(400, f"max_tokens {max_tokens} + the prompt's {len(ids)} tokens exceed the model's context of "
                       f"{loaded.context}", param="max_tokens", code="context_length_exceeded")
    return Request(prompt_ids=list(ids), max_tokens=room if max_tokens is None else max_tokens,
                   temperature=params.temperature, top_p=params.top_p, seed=params.seed, stop=params.stops(),
                   logprobs=logprobs, echo_logprobs=echo_logprobs)


def _prompts(prompt: str | list, loaded: LoadedModel) -> list[tuple[list[int], str]]:
    """Each prompt's token ids and text: a string, token ids, or a non-empty list of strings or of token-id lists."""
    def is_ids(x) -> bool:
        return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    if isinstance(prompt, str) or (prompt and is_ids(prompt)):
        items = [prompt]
    elif prompt and (all(isinstance(p, str) for p in prompt) or all(isinstance(p, list) and is_ids(p) for p in prompt)):
        items = prompt
    else:
        raise APIError(400, "prompt: an empty list" if prompt == [] else "prompt: give a string, a list of strings, a list "
                       "of token ids or a list of lists of token ids (not a mix)", param="prompt")
    out = []
    for i, item in enumerate(items):
        where = "prompt" if len(items) == 1 else f"prompt[{i}]"
        if isinstance(item, str):
            ids = loaded.tokenizer(item, add_special_tokens=False)["input_ids"]
        else:
            ids = item
            bad = next((t for t in ids if not 0 <= t < loaded.vocab), None)
            if bad is not None:
                raise APIError(400, f"{where}: token id {bad} is outside the vocabulary (size {loaded.vocab})", param="prompt")
        if not ids:
            raise APIError(400, f"{where}: empty", param="prompt")
        out.append((list(ids), item if isinstance(item, str) else loaded.tokenizer.decode(ids)))
    return out


async def _respond(reqs: list[Request], batcher: Batcher, params, kind: str, version: str, echoes: list[str] | None = None):
    """Queue every request at once (the batcher decodes them together) and answer one choice per request, in order."""
    loop = asyncio.get_running_loop()
    queues: list[asyncio.Queue] = []
    for req in reqs:
        events: asyncio.Queue = asyncio.Queue()
        req.emit = lambda event, q=events: loop.call_soon_threadsafe(q.put_nowait, event)
        queues.append(events)
    rid = f"{'cmpl' if kind == 'text_completion' else 'chatcmpl'}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    model = params.model
    batcher.submit(*reqs)

    if params.stream:
        req, events, echo = reqs[0], queues[0], echoes[0] if echoes else None
        prompt_tokens = len(req.prompt_ids)

        async def stream():
            def chunk(payload: dict) -> str:
                return f"data: {json.dumps(payload)}\n\n"

            if kind == "chat.completion":
                yield chunk({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                             "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
            elif echo:
                yield chunk({"id": rid, "object": "text_completion", "created": created, "model": model,
                             "choices": [{"index": 0, "text": echo, "logprobs": None, "finish_reason": None}]})
            while True:
                event = await events.get()
                if event["type"] == "error":
                    yield chunk(error_body(event["message"], "server_error"))
                    break
                if event["type"] == "text" and event["text"]:
                    if kind == "chat.completion":
                        yield chunk({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                                     "choices": [{"index": 0, "delta": {"content": event["text"]}, "finish_reason": None}]})
                    else:
                        yield chunk({"id": rid, "object": "text_completion", "created": created, "model": model,
                                     "choices": [{"index": 0, "text": event["text"], "logprobs": None, "finish_reason": None}]})
                elif event["type"] == "finish":
                    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": event["completion_tokens"],
                             "total_tokens": prompt_tokens + event["completion_tokens"]}
                    last = ({"index": 0, "delta": {}, "finish_reason": event["reason"]} if kind == "chat.completion"
                            else {"index": 0, "text": "", "logprobs": None, "finish_reason": event["reason"]})
                    obj = "chat.completion.chunk" if kind == "chat.completion" else "text_completion"
                    yield chunk({"id": rid, "object": obj, "created": created, "model": model, "choices": [last]})
                    if params.stream_options and params.stream_options.include_usage:
                        yield chunk({"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage})
                    break
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"X-Model-Version": version})

    async def collect(events: asyncio.Queue) -> tuple[str, list[dict], list | None, dict]:
        text, entries, prompt_entries = [], [], None
        while True:
            event = await events.get()
            if event["type"] == "error":
                raise APIError(500, event["message"], "server_error")
            if event["type"] == "prompt_logprobs":
                prompt_entries = event["entries"]
            elif event["type"] == "text":
                text.append(event["text"])
                if event.get("logprob"):
                    entries.append(event["logprob"])
            elif event["type"] == "finish":
                return "".join(text), entries, prompt_entries, event

    choices, completion_tokens = [], 0
    for index, (req, (completion, entries, prompt_entries, finish)) in enumerate(
            zip(reqs, await asyncio.gather(*(collect(q) for q in queues)))):
        completion_tokens += finish["completion_tokens"]
        if kind == "chat.completion":
            choices.append({"index": index, "message": {"role": "assistant", "content": completion},
                            "finish_reason": finish["reason"],
                            "logprobs": {"content": [{"token": e["token"], "logprob": e["logprob"], "bytes": list(e["token"].encode()),
                                                      "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in e["top"].items()]}
                                                     for e in entries]} if req.logprobs is not None else None})
        else:
            echo = echoes[index] if echoes else None
            if finish.get("logprob"):
                entries = entries + [finish["logprob"]]
            choices.append({"index": index, "text": (echo or "") + completion, "finish_reason": finish["reason"],
                            "logprobs": _completion_logprobs(prompt_entries, entries, echo) if req.logprobs is not None else None})
    prompt_tokens = sum(len(r.prompt_ids) for r in reqs)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    body = {"id": rid, "object": kind, "created": created, "model": model, "choices": choices, "usage": usage}
    return JSONResponse(body, headers={"X-Model-Version": version})


def _completion_logprobs(prompt_entries: list | None, entries: list[dict], echo: str | None) -> dict:
    """The legacy completions `logprobs` object: tokens, token_logprobs, top_logprobs, text_offset."""
    scored = (prompt_entries or []) if echo is not None else []
    rows = [(e["token"], e["logprob"], e["top"]) for e in scored + entries]
    tokens, offsets, pos = [], [], 0
    for token, _, _ in rows:
        tokens.append(token or "")
        offsets.append(pos)
        pos += len(token or "")
    return {"tokens": tokens, "token_logprobs": [r[1] for r in rows], "top_logprobs": [r[2] for r in rows], "text_offset": offsets}


def serve(ref: str, workspace: Path | None, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_batch: int = 32) -> None:
    import uvicorn

    uvicorn.run(create_app(ref, workspace, api_key, max_batch), host=host, port=port, log_level="warning")
