"""An OpenAI-compatible HTTP server over a registry reference or a model directory (FastAPI + uvicorn).

    GET  /health                 the version loaded and, for a registry reference, the version each alias names
    GET  /v1/models
    POST /v1/completions         (echo + logprobs, so lm-evaluation-harness's local-completions can score it)
    POST /v1/chat/completions    (the model's chat template; tool calls, tool results and a `tools` list too)
    POST /v1/feedback            a rating (and correction) of a recorded answer, when the server records (below)

A completion's `prompt` is text, token ids, or a list of either (at most MAX_PROMPTS = 64): several prompts are
decoded as one batch and answered as one choice each, in order, with summed usage (streaming takes one prompt).

Bounds: a request body of at most 1 MiB (413 beyond); token ids inside the vocabulary (a negative id too is a 400
naming it); `max_tokens` left out is 16 for completions (OpenAI's documented default) and 256 for chat, either cut
to the room the prompt leaves in the context, while an explicit `max_tokens` past the context is a 400; n = 1;
completions `logprobs` <= 5 and chat `top_logprobs` <= 20 (OpenAI's limits); at most 16 stop sequences; at most
128 tools. The API key is compared in constant time. `ignore_eos` (vLLM's extension) generates past the end token,
for benchmarks that need a fixed output length.

Chat takes what the `openai` client and CrewAI send: content as text or text parts, assistant messages with
`tool_calls` (content null), `tool` messages with their `tool_call_id`, and `tools` (+ `tool_choice`; "none"
leaves them out). The tools go through the chat template when it takes them, otherwise into a system message as
JSON schemas; tool calls are rendered as the template renders them, or as JSON in the assistant's text. The answer
is plain assistant text: tool calls are not parsed out of it.

Streaming is server-sent events in OpenAI's chunk format ending with `data: [DONE]`. Errors come in OpenAI's
shape: bad parameters 400, missing or wrong key 401 (when an API key is set), unknown model 404, body too large
413, a failure of ours 500. A client that goes away (a stream closed, or a connection dropped while waiting for
an answer) marks its requests `cancelled`, for the batcher to drop them.

Recording (`record=True`, `modelcrew serve --record`; off by default): every answer delivered is appended, PII
scrubbed, to <workspace>/feedback/<model>/completions.jsonl (serving/feedback.py has the layout and the rows), with
the exact version that answered. One row per choice: a completions request with several prompts gives one per
prompt, each with its `index`. A stream is recorded when its last token is out, before its final chunk is sent, so
a client that has the whole answer can rate it at once. Not recorded: requests that failed, and requests whose
client went away before the answer was complete (a closed stream, a dropped connection): nothing whole was
delivered, so there is nothing to rate, and a cut-off answer would teach the retraining loop a truncated reply.
A failure to write a record is logged and the answer still goes out.

    POST /v1/feedback   {"id": "chatcmpl-…", "rating": 1 | -1, "correction": "…" (optional), "index": 0 (optional)}

rates a recorded answer (behind the same API key): 200 with the stored row; 400 for a rating other than the
integers 1 and -1, a correction over 8,000 characters or blank, a field of the wrong type or a field we do not
know; 404 for an id (and index) this server has not recorded, and 404 from a server started without recording.
Rejected feedback writes nothing. An answer may be rated again; the latest rating counts.

Serving `name@production` follows promotions and rollbacks without a restart: each request resolves the
reference; when it moved, the new version loads in a background thread (one load at a time) while the old one
keeps answering, then new requests switch to it at once. Requests already running finish on the version they
started with, whose batcher stops when the last of them ends. A version that fails to load leaves the old one
serving (retried after 30 s; /health shows the error). `/health` answers once a load the reference calls for is
done.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Awaitable, Callable, Literal

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.engine import Batcher, LoadedModel, Request
from serving.feedback import MAX_CORRECTION_CHARS, MAX_ID_CHARS, FeedbackStore, UnknownCompletion, now
from training.errors import InputError


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


MAX_STOPS = 16
MAX_PROMPTS = 64  # prompts in one completions request (lm-eval sends its batch size, 4-8 as we run it)
# 1 MiB, refused before it is parsed; create_app(max_body_bytes=...) raises it for batches of long token-id prompts
# (about 7 bytes an id: 8 prompts of 16k tokens come near it)
MAX_BODY_BYTES = 1 << 20
MAX_TOOLS = 128  # OpenAI's limit
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's documented default for /v1/completions
# OpenAI's chat default is whatever the context leaves: a client that forgets max_tokens would hold a batch slot
# for the whole context, so chat gets a bound (still cut to the room the prompt leaves)
DEFAULT_CHAT_TOKENS = 256
RETRY_LOAD_S = 30.0  # a version that failed to load is tried again after this long, not on every request
# How long an idle keep-alive connection stays open. uvicorn's default (5 s) equals httpx's pool expiry (5 s, the
# `openai` client's): a client that reuses a connection idle for about 5 s can send its request just as the server
# closes it, and gets "Server disconnected" (APIConnectionError) for a request the server never saw. Measured with
# 200 connections reused after ~5 s idle (max_retries=0): 3 of 600 failed with 5 s on both sides, 0 of 600 with
# 30 s here. Longer than common clients' pools, so the client always drops an idle connection first.
KEEP_ALIVE_S = 30
log = logging.getLogger(__name__)


class StreamOptions(BaseModel):
    include_usage: bool = False


class CommonParams(BaseModel):
    model: str
    max_tokens: int | None = Field(None, ge=0)  # None: the endpoint's default, cut to the context (see _request)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    # vLLM's extension, for benchmarks and load tests that need a fixed output length: the end token does not stop
    # the answer (a stop sequence or max_tokens still does)
    ignore_eos: bool = False

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


class ContentPart(BaseModel):
    type: str
    text: str | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str = "{}"  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None  # null: an assistant message that only calls tools
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDef(BaseModel):
    name: str
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: dict[str, str]  # {"name": ...}


class ChatParams(CommonParams):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_completion_tokens: int | None = Field(None, ge=0)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # accepted; we do not produce tool calls


class FeedbackParams(BaseModel):
    """POST /v1/feedback: strict types (a rating of true, 1.0 or "1" is refused), no fields beyond these."""

    model_config = ConfigDict(extra="forbid")
    id: StrictStr = Field(min_length=1, max_length=MAX_ID_CHARS)
    rating: StrictInt
    correction: StrictStr | None = Field(None, max_length=MAX_CORRECTION_CHARS)
    index: StrictInt = Field(0, ge=0, lt=MAX_PROMPTS)  # the choice, for a completions request with several prompts

    @field_validator("rating")
    @classmethod
    def _good_or_bad(cls, rating: int) -> int:
        if rating not in (1, -1):
            raise ValueError(f"give 1 (a good answer) or -1 (a bad one), not {rating}")
        return rating

    @field_validator("correction")
    @classmethod
    def _not_blank(cls, correction: str | None) -> str | None:
        if correction is not None and not correction.strip():
            raise ValueError("a blank correction; leave the field out to rate without one")
        return correction


class Deployment:
    """One loaded version with its batcher; its batcher stops once it is retired and no request holds it."""

    def __init__(self, key: str, loaded: LoadedModel, batcher: Batcher) -> None:
        self.key, self.loaded, self.batcher = key, loaded, batcher
        self.leases, self.retired = 0, False


class Lease:
    """A request's hold on the deployment it started on (released once, however the request ends)."""

    def __init__(self, slot: "Slot", deployment: Deployment) -> None:
        self.slot, self.deployment, self.released = slot, deployment, False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.slot._release(self.deployment)


class Slot:
    """What a reference points to now, loaded, with its batcher; swapped in the background when the registry moves."""

    def __init__(self, ref: str, workspace: Path | None, max_batch: int, device: str | None) -> None:
        self.ref, self.workspace, self.max_batch, self.device = ref, workspace, max_batch, device
        self.lock = threading.Lock()  # guards current, leases and loading (the loader thread and the loop share them)
        self.loader = ThreadPoolExecutor(1, thread_name_prefix="model-load")  # one load at a time
        self.loading: tuple[str, Future] | None = None
        self.error: tuple[str | None, float, str] | None = None  # (key, when, why) of the last failed load or resolve
        path = Path(ref)
        self.static = path.is_dir()
        self.name = path.name if self.static else ref.partition("@")[0]
        self.current = self._load(*self._target())  # now: a bad reference fails at start, not at the first request

    def _target(self) -> tuple[str, Path]:
        if self.static:
            return str(Path(self.ref).resolve()), Path(self.ref)
        from serving.registry import Registry

        name, version, path = Registry(self.workspace).resolve(self.ref)
        return f"{name}@{version.version}", path

    def _load(self, key: str, path: Path) -> Deployment:
        loaded = LoadedModel(path, key, self.device)
        batcher = Batcher(loaded, self.max_batch)
        batcher.start()
        return Deployment(key, loaded, batcher)

    def get(self) -> tuple[str, LoadedModel, Batcher]:
        """What serves new requests now (no reload)."""
        d = self.current
        return d.key, d.loaded, d.batcher

    def follow(self) -> Future | None:
        """Start loading what the reference points to when it moved; the load in flight, if any. Never blocks."""
        if self.static:
            return None
        try:
            key, path = self._target()
        except InputError as err:  # the registry changed under us (an alias unset...): what is loaded keeps serving
            self.error = (None, time.monotonic(), f"resolving {self.ref}: {err}")
            return None
        with self.lock:
            if self.loading is not None and not self.loading[1].done():
                return self.loading[1]  # one load at a time; a further move is picked up when it ends
            if key == self.current.key:
                self.error = None
                return None
            if self.error and self.error[0] == key and time.monotonic() - self.error[1] < RETRY_LOAD_S:
                return None
            future = self.loader.submit(self._swap, key, path)
            self.loading = (key, future)
            return future

    def _swap(self, key: str, path: Path) -> None:  # in the loader thread
        try:
            new = self._load(key, path)
        except Exception as err:
            self.error = (key, time.monotonic(), f"loading {key}: {type(err).__name__}: {err}")
            log.warning("%s; %s keeps serving", self.error[2], self.current.key)
            raise
        with self.lock:  # the switch: the next lease gets the new version
            old, self.current = self.current, new
            old.retired = True
            idle = old.leases == 0
        self.error = None
        if idle:
            old.batcher.stop()

    def lease(self) -> Lease:
        self.follow()
        with self.lock:
            d = self.current
            d.leases += 1
        return Lease(self, d)

    def _release(self, d: Deployment) -> None:
        with self.lock:
            d.leases -= 1
            idle = d.retired and d.leases == 0
        if idle:  # the last request on a replaced version has ended: nothing can reach its batcher any more
            d.batcher.stop()

    async def settle(self) -> None:
        """Wait, off the event loop, for the loads the reference calls for (a failed load ends the wait)."""
        for _ in range(3):  # the reference may move again during a load
            future = self.follow()
            if future is None:
                return
            try:
                await asyncio.wrap_future(future)
            except Exception:
                return  # recorded in self.error; the old version serves on


class _Gate:
    """API key and body size, as plain ASGI: a BaseHTTPMiddleware would stand between a streaming response and
    the client's disconnect."""

    def __init__(self, app, api_key: str | None, max_body: int) -> None:
        self.app, self.max_body = app, max_body
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.expected is not None and scope["path"].startswith("/v1/"):
            header = headers.get(b"authorization", b"")
            if not hmac.compare_digest(header, self.expected):  # constant time: no key guessing by timing
                why = "missing API key" if not header else "incorrect API key"
                return await JSONResponse(error_body(f"{why}: pass it as 'Authorization: Bearer KEY'",
                                                     "invalid_request_error", code="invalid_api_key"),
                                          status_code=401)(scope, receive, send)
        # read the body up to the limit here (a chunked upload declares no length), then hand it on
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            declared = 0
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
            if size > self.max_body or declared > self.max_body:
                # drain (a bounded amount) before answering: closing on unread data resets the connection and
                # the client would see that instead of the 413
                while more and size <= 8 * self.max_body:
                    message = await receive()
                    size += len(message.get("body", b""))
                    more = message.get("more_body", False) and message["type"] == "http.request"
                limit = f"{self.max_body} bytes" + (f" ({self.max_body >> 20} MiB)" if self.max_body % (1 << 20) == 0 else "")
                return await JSONResponse(error_body(f"request body: larger than the limit of {limit}",
                                                     "invalid_request_error", code="request_too_large"),
                                          status_code=413)(scope, receive, send)
            chunks.append(message.get("body", b""))
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the server's disconnect notice

        await self.app(scope, replay, send)


def create_app(ref: str, workspace: Path | None = None, api_key: str | None = None, max_batch: int = 32,
               device: str | None = None, max_body_bytes: int = MAX_BODY_BYTES, record: bool = False) -> FastAPI:
    """The app; `record` appends every delivered answer under <workspace>/feedback/ and takes POST /v1/feedback."""
    if record and workspace is None:
        raise InputError("record: recording needs a workspace to write to")
    slot = Slot(ref, workspace, max_batch, device)
    store = FeedbackStore(workspace, slot.name) if record else None
    app = FastAPI(title="modelcrew", docs_url=None, redoc_url=None)
    app.state.slot = slot
    app.state.feedback = store
    app.add_middleware(_Gate, api_key=api_key, max_body=max_body_bytes)

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

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_, err: StarletteHTTPException):  # unknown paths and methods: 404 / 405
        return JSONResponse(error_body(str(err.detail), "invalid_request_error"), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def _server_error(_, err: Exception):
        return JSONResponse(error_body(f"{type(err).__name__}: {err}", "server_error"), status_code=500)

    def served_ids() -> set[str]:
        return {slot.name, slot.ref}

    def check_model(model: str) -> None:
        if model not in served_ids():
            raise APIError(404, f"model {model!r} does not exist; this server serves {slot.name!r}", code="model_not_found")

    @app.get("/health")
    async def health():
        await slot.settle()
        d = slot.current
        aliases, error = None, slot.error[2] if slot.error else None
        if not slot.static:
            from serving.registry import Registry

            try:
                aliases = dict(Registry(slot.workspace).state(slot.name).aliases)
            except InputError as err:
                error = error or str(err)
        loading = slot.loading[0] if slot.loading is not None and not slot.loading[1].done() else None
        return {"status": "ok", "model": slot.name, "reference": slot.ref, "version": d.key, "aliases": aliases,
                "loading": loading, "error": error, "batches": d.batcher.batches,
                "batched_requests": d.batcher.batched_requests, "recording": store is not None}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": slot.name, "object": "model", "created": 0, "owned_by": "modelcrew"}]}

    def recorder(params: CommonParams, version: str, inputs: Callable[[int], dict]) -> Recorder | None:
        """What records a request's answers (None when recording is off): `inputs(i)` is choice i's request part."""
        if store is None:
            return None

        async def record(rid: str, results: list[dict]) -> None:
            at = now()
            rows = [{"id": rid, "index": r["index"], "created": at, "model": params.model, "version": version,
                     **inputs(r["index"]), "answer": r["answer"], "finish_reason": r["finish_reason"],
                     "usage": r["usage"]} for r in results]
            try:  # off the event loop: scrubbing and the write (under a file lock another process may hold)
                await asyncio.to_thread(store.record, rows)
            except Exception:  # the client still gets its answer; the operator sees why it was not recorded
                log.exception("recording %s (%s) failed", rid, version)

        return record

    async def answer(params: CommonParams, http: HTTPRequest, kind: str,
                     build: Callable[[LoadedModel], tuple[list[Request], list[str] | None]],
                     inputs: Callable[[int], dict]):
        check_model(params.model)
        lease = slot.lease()
        try:
            reqs, echoes = build(lease.deployment.loaded)  # all checked before any is queued
            response = await _respond(reqs, lease, params, kind, echoes, http,
                                      recorder(params, lease.deployment.key, inputs))
        except BaseException:
            lease.release()
            raise
        if not params.stream:  # a stream's response releases its lease when it closes
            lease.release()
        return response

    @app.post("/v1/completions")
    async def completions(params: CompletionParams, http: HTTPRequest):
        texts: list[str] = []  # each prompt as text, for the record

        def build(loaded: LoadedModel):
            prompts = _prompts(params.prompt, loaded)
            texts.extend(text for _, text in prompts)
            if params.stream and len(prompts) > 1:
                raise APIError(400, f"stream: streaming takes one prompt, not {len(prompts)}; send a list without stream",
                               param="stream")
            reqs = [_request(params, ids, loaded, params.max_tokens, DEFAULT_COMPLETION_TOKENS, params.logprobs,
                             params.echo and params.logprobs is not None) for ids, _ in prompts]
            return reqs, [text for _, text in prompts] if params.echo else None

        return await answer(params, http, "text_completion", build, lambda i: {"kind": "completion", "prompt": texts[i]})

    @app.post("/v1/chat/completions")
    async def chat(params: ChatParams, http: HTTPRequest):
        def build(loaded: LoadedModel):
            if not getattr(loaded.tokenizer, "chat_template", None):
                raise APIError(400, f"{slot.name} has no chat template; use /v1/completions", param="messages")
            ids = _chat_ids(loaded.tokenizer, params)
            top = (params.top_logprobs or 0) if params.logprobs else None
            wanted = params.max_completion_tokens if params.max_completion_tokens is not None else params.max_tokens
            return [_request(params, ids, loaded, wanted, DEFAULT_CHAT_TOKENS, top, False)], None

        def conversation(_: int) -> dict:
            messages = []
            for i, m in enumerate(params.messages):
                row = {"role": m.role, "content": _text(m, i)}
                if m.tool_calls:
                    row["tool_calls"] = [c.model_dump(exclude_none=True) for c in m.tool_calls]
                row.update({k: v for k, v in (("tool_call_id", m.tool_call_id), ("name", m.name)) if v is not None})
                messages.append(row)
            tools = {"tools": [t.model_dump(exclude_none=True) for t in params.tools]} if params.tools else {}
            return {"kind": "chat", "messages": messages, **tools}

        return await answer(params, http, "chat.completion", build, conversation)

    @app.post("/v1/feedback")
    async def feedback(params: FeedbackParams):
        if store is None:
            raise APIError(404, "feedback: this server does not record its answers, so it takes no feedback; "
                           "start it with `modelcrew serve ... --record`", code="recording_off")
        try:  # off the event loop: scrubbing, the lock and the fsync
            return await asyncio.to_thread(store.add_feedback, params.id, params.rating, params.correction, params.index)
        except UnknownCompletion:
            which = f"{params.id!r}" + (f" (choice {params.index})" if params.index else "")
            raise APIError(404, f"id: no recorded answer {which} on this server", param="id",
                           code="completion_not_found") from None

    return app


def _request(params: CommonParams, ids: list[int], loaded: LoadedModel, max_tokens: int | None, default: int,
             logprobs: int | None, echo_logprobs: bool) -> Request:
    room = loaded.context - len(ids)
    if room < 0 or (room == 0 and max_tokens != 0):  # scoring a prompt alone (max_tokens 0) may fill the context
        raise APIError(400, f"the prompt has {len(ids)} tokens but the model's context is {loaded.context}; shorten it",
                       param="messages" if isinstance(params, ChatParams) else "prompt", code="context_length_exceeded")
    if max_tokens is None:  # left out: the endpoint's default, as much of it as the context holds
        max_tokens = min(default, room)
    elif max_tokens > room:  # asked for: refused rather than silently cut
        raise APIError(400, f"max_tokens {max_tokens} + the prompt's {len(ids)} tokens exceed the model's context of "
                       f"{loaded.context}", param="max_tokens", code="context_length_exceeded")
    return Request(prompt_ids=list(ids), max_tokens=max_tokens, temperature=params.temperature, top_p=params.top_p,
                   seed=params.seed, stop=params.stops(), logprobs=logprobs, echo_logprobs=echo_logprobs,
                   ignore_eos=params.ignore_eos)


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
    if len(items) > MAX_PROMPTS:
        raise APIError(400, f"prompt: at most {MAX_PROMPTS} prompts in one request, not {len(items)}", param="prompt")
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


# ---- chat: messages, tool calls and tools through the chat template ----------------------------------------------


def _text(m: Message, i: int) -> str:
    """A message's content as text: text parts joined; null only where OpenAI allows it (an assistant's)."""
    if m.content is None:
        if m.role != "assistant":
            raise APIError(400, f"messages[{i}].content: a {m.role} message needs content", param=f"messages[{i}].content")
        return ""
    if isinstance(m.content, str):
        return m.content
    texts = []
    for part in m.content:
        if part.type not in ("text", "refusal") or part.text is None:  # refusal: an assistant's earlier refusal
            raise APIError(400, f"messages[{i}].content: this model reads text parts, not {part.type!r}",
                           param=f"messages[{i}].content")
        texts.append(part.text)
    return "\n".join(texts)


def _arguments(text: str):
    """A tool call's arguments as templates expect them (an object), or the text when it is not a JSON object."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, dict) else text


def _tools_note(tools: list[dict], choice) -> str:
    lines = ["You can call these tools (JSON schemas):"] + [json.dumps(t["function"]) for t in tools]
    if choice == "required":
        lines.append("Call one of them.")
    elif isinstance(choice, NamedToolChoice):
        lines.append(f"Call {choice.function.get('name')}.")
    return "\n".join(lines)


def _chat_ids(tokenizer, params: ChatParams) -> list[int]:
    """The conversation as token ids. Templates that know tools get them (and tool calls) natively; for the rest,
    tool calls become JSON in the assistant's text and the tools a system message. A template that refuses the
    conversation (roles it does not know) gets it once more as system/user/assistant turns only."""
    from jinja2 import TemplateError

    from training.batches import render_chat

    tools = [t.model_dump(exclude_none=True) for t in params.tools or []] if params.tool_choice != "none" else []
    if isinstance(params.tool_choice, NamedToolChoice):
        name = params.tool_choice.function.get("name")
        if name not in {t["function"]["name"] for t in tools}:
            raise APIError(400, f"tool_choice: no tool named {name!r} in tools", param="tool_choice")
    template = tokenizer.get_chat_template(tools=tools or None)
    native_tools, native_calls = "tools" in template, "tool_calls" in template
    texts = [_text(m, i) for i, m in enumerate(params.messages)]

    def calls_json(m: Message) -> str:
        return json.dumps({"tool_calls": [{"id": c.id, "name": c.function.name, "arguments": _arguments(c.function.arguments)}
                                          for c in m.tool_calls]})

    def render(plain: bool) -> list[int]:
        messages = []
        for m, text in zip(params.messages, texts):
            if plain or not native_calls:
                if m.tool_calls:
                    text = f"{text}\n{calls_json(m)}" if text else calls_json(m)
                if plain and m.role == "tool":
                    m_role, text = "user", f"Result of tool call {m.tool_call_id or m.name or ''}: {text}"
                else:
                    m_role = "system" if plain and m.role == "developer" else m.role
                d = {"role": m_role, "content": text}
                if not plain and m.tool_call_id:
                    d["tool_call_id"] = m.tool_call_id
            else:
                d = {"role": m.role, "content": text}
                if m.tool_calls:
                    d["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                        "name": c.function.name, "arguments": _arguments(c.function.arguments)}} for c in m.tool_calls]
                if m.tool_call_id:
                    d["tool_call_id"] = m.tool_call_id
                if m.name:
                    d["name"] = m.name
            messages.append(d)
        if tools and (plain or not native_tools):
            note = _tools_note(tools, params.tool_choice)
            if messages[0]["role"] == "system":
                messages[0] = {**messages[0], "content": f"{messages[0]['content']}\n\n{note}"}
            else:
                messages.insert(0, {"role": "system", "content": note})
        if tools and native_tools and not plain:
            out = tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, add_generation_prompt=True)
            return list(out["input_ids"] if hasattr(out, "keys") else out)
        return render_chat(tokenizer, messages, add_generation_prompt=True)

    try:
        return render(plain=False)
    except TemplateError:
        try:
            return render(plain=True)
        except TemplateError as err:
            raise APIError(400, f"messages: the model's chat template refuses them: {err}", param="messages") from None


# ---- answers -------------------------------------------------------------------------------------------------------


class _Stream(StreamingResponse):
    """A streaming response that runs `on_close` however it ends: finished, client gone, or never started."""

    def __init__(self, content, on_close: Callable[[], None], **kwargs) -> None:
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def _disconnected(receive) -> None:
    """Returns when the client closes the connection (the body was read already: the server's next message is that)."""
    while (await receive())["type"] != "http.disconnect":
        pass


Recorder = Callable[[str, list[dict]], Awaitable[None]]  # (response id, one result per choice) -> recorded


async def _respond(reqs: list[Request], lease: Lease, params, kind: str, echoes: list[str] | None,
                   http: HTTPRequest, record: Recorder | None = None):
    """Queue every request at once (the batcher decodes them together) and answer one choice per request, in order.
    `record`, when given, gets each finished answer (index, answer text, finish_reason, usage) before the client has
    the end of it; an answer that failed or whose client went away is not given to it."""
    loop = asyncio.get_running_loop()
    queues: list[asyncio.Queue] = []
    for req in reqs:
        events: asyncio.Queue = asyncio.Queue()
        req.emit = lambda event, q=events: loop.call_soon_threadsafe(q.put_nowait, event)
        queues.append(events)
    rid = f"{'cmpl' if kind == 'text_completion' else 'chatcmpl'}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    model, version = params.model, lease.deployment.key
    lease.deployment.batcher.submit(*reqs)

    if params.stream:
        req, events, echo = reqs[0], queues[0], echoes[0] if echoes else None
        prompt_tokens = len(req.prompt_ids)
        finished = False
        sent: list[str] = []  # the answer's text as streamed, for the record

        async def stream():
            nonlocal finished

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
                    finished = True
                    yield chunk(error_body(event["message"], "server_error"))
                    break
                if event["type"] == "text" and event["text"]:
                    sent.append(event["text"])
                    if kind == "chat.completion":
                        yield chunk({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                                     "choices": [{"index": 0, "delta": {"content": event["text"]}, "finish_reason": None}]})
                    else:
                        yield chunk({"id": rid, "object": "text_completion", "created": created, "model": model,
                                     "choices": [{"index": 0, "text": event["text"], "logprobs": None, "finish_reason": None}]})
                elif event["type"] == "finish":
                    finished = True
                    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": event["completion_tokens"],
                             "total_tokens": prompt_tokens + event["completion_tokens"]}
                    if record is not None and event["reason"] != "cancelled":  # before the end: rateable at [DONE]
                        await record(rid, [{"index": 0, "answer": "".join(sent), "finish_reason": event["reason"],
                                            "usage": usage}])
                    last = ({"index": 0, "delta": {}, "finish_reason": event["reason"]} if kind == "chat.completion"
                            else {"index": 0, "text": "", "logprobs": None, "finish_reason": event["reason"]})
                    obj = "chat.completion.chunk" if kind == "chat.completion" else "text_completion"
                    yield chunk({"id": rid, "object": obj, "created": created, "model": model, "choices": [last]})
                    if params.stream_options and params.stream_options.include_usage:
                        yield chunk({"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage})
                    break
            yield "data: [DONE]\n\n"

        def close() -> None:
            if not finished:  # the client went away mid-answer: the batcher drops the request within a step
                req.cancelled = True
            lease.release()

        return _Stream(stream(), close, media_type="text/event-stream", headers={"X-Model-Version": version})

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

    collecting = asyncio.ensure_future(asyncio.gather(*(collect(q) for q in queues)))
    watching = asyncio.ensure_future(_disconnected(http.receive))
    gone = False
    try:
        await asyncio.wait({collecting, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        if not collecting.done():  # the client went away (or this handler was cancelled): stop decoding for it
            gone = True
            for req in reqs:
                req.cancelled = True
            collecting.cancel()
    # (not collecting.cancelled(): a gather's future reads cancelled only once its children have finished cancelling,
    # a loop turn later; reading its result before then raised InvalidStateError, a 500 traceback per such client)
    if gone:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    choices, completion_tokens, results = [], 0, []
    for index, (req, (completion, entries, prompt_entries, finish)) in enumerate(zip(reqs, collecting.result())):
        completion_tokens += finish["completion_tokens"]
        results.append({"index": index, "answer": completion, "finish_reason": finish["reason"],
                        "usage": {"prompt_tokens": len(req.prompt_ids), "completion_tokens": finish["completion_tokens"],
                                  "total_tokens": len(req.prompt_ids) + finish["completion_tokens"]}})
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
    if record is not None:
        await record(rid, [r for r in results if r["finish_reason"] != "cancelled"])
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
          max_batch: int = 32, max_body_bytes: int = MAX_BODY_BYTES, record: bool = False) -> None:
    import uvicorn

    uvicorn.run(create_app(ref, workspace, api_key, max_batch, max_body_bytes=max_body_bytes, record=record), host=host,
                port=port, log_level="warning", timeout_keep_alive=KEEP_ALIVE_S)
