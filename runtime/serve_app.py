"""The OpenAI-compatible ASGI app (FastAPI): ``POST /v1/chat/completions`` (plain and Server-Sent Events),
``GET /v1/models``, ``GET /health`` and ``GET /metrics``. Every refusal is one JSON error in OpenAI's shape
(``{"error": {"message", "type", "code"}}``): 4xx for the request's problems, 429 with ``Retry-After`` when full.

The app reads its state through ``get_state`` so that one app serves both ``prune-serve`` (state made before
uvicorn starts) and a Ray Serve replica (state made in the replica's constructor)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlmprune.bundle import bucket_for
from vlmprune.errors import VlmpruneError

from .sampling import check_generation_args
from .serve_engine import Busy, Engine
from .serve_metrics import Metrics
from .serve_openai import Limits, StopMatcher, parse_chat


@dataclass
class ServeState:
    engine: Engine
    metrics: Metrics
    limits: Limits
    max_body_bytes: int = 32 * 2**20
    replica: str = ""  # Ray Serve: which replica answered (in the response's headers)
    _bound: bool = False

    def ready(self) -> Engine:
        if not self._bound:  # asyncio objects are made in the loop that serves
            self.engine.bind_loop()
            self._bound = True
        return self.engine


def make_state(engine: Engine, limits: Limits, metrics: Metrics, max_body_bytes: int) -> ServeState:
    metrics.watch(engine)
    return ServeState(engine, metrics, limits, max_body_bytes)


def error(status: int, message: str, code: str, headers: dict | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status,
                        headers=headers)


class _TooLarge(Exception):
    pass


async def _read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise _TooLarge()
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge()
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(get_state: Callable[[], ServeState]) -> FastAPI:
    app = FastAPI(title="vlmprune", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc):  # unknown paths and methods: the same JSON shape
        return error(exc.status_code, str(exc.detail), "not_found" if exc.status_code == 404 else "http_error")

    @app.exception_handler(Exception)
    async def _internal(request, exc):  # a bug: one JSON line, never a traceback in the response
        get_state().metrics.requests.labels("error").inc()
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        return error(500, f"internal error: {type(exc).__name__}: {first}", "internal_error")

    @app.get("/health")
    async def health():
        state = get_state()
        engine = state.engine
        return {"status": "ok", "models": list(engine.bundles), "in_flight": engine.inflight,
                "running": engine.running, "replica": state.replica}

    @app.get("/metrics")
    async def metrics():
        state = get_state()
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    @app.get("/v1/models")
    async def models():
        engine = get_state().engine
        data = []
        for b in engine.bundles.values():
            meta = {"object": "model", "created": 0, "owned_by": "vlmprune", "root": b.name,
                    "family": b.manifest.get("model", {}).get("family", {}).get("name"),
                    "method": b.buckets[0]["method"] if b.buckets else None, "keeps": b.keeps()}
            data.append({"id": b.name, **meta})
            data += [{"id": f"{b.name}@{k}", **meta} for k in b.keeps()]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        state = get_state()
        engine = state.ready()
        m = state.metrics
        arrival = time.perf_counter()
        try:
            body = await _read_body(request, state.max_body_bytes)
        except _TooLarge:
            m.requests.labels("bad_request").inc()
            return error(413, f"the request body is larger than {state.max_body_bytes} bytes; send a smaller image "
                              "or fewer messages", "body_too_large")
        try:
            try:
                data = json.loads(body)
            except (ValueError, UnicodeDecodeError):
                raise VlmpruneError("the request body is not JSON", "send a JSON object") from None
            req = parse_chat(data, state.limits)
            bundle, keep = engine.resolve(req.model, req.keep)
            if keep is not None:
                bucket_for(bundle.manifest, keep)  # a keep no bucket serves is refused before queueing
            check_generation_args(req.max_tokens, req.temperature, req.top_p, req.seed)
        except VlmpruneError as exc:
            m.requests.labels("bad_request").inc()
            return error(400, str(exc), "bad_request")
        return await _generate(state, request, req, bundle, keep, arrival)

    return app


async def _generate(state: ServeState, request: Request, req, bundle, keep, arrival: float):
    engine, m = state.engine, state.metrics
    timeout = engine.config.request_timeout
    deadline = time.monotonic() + timeout
    cancel = threading.Event()
    matcher = StopMatcher(req.stop)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    started = {}

    def on_text(piece: str) -> None:
        released = matcher.feed(piece)
        if req.stream and released:
            loop.call_soon_threadsafe(events.put_nowait, ("text", released))

    def work(pipe):
        started["t"] = time.perf_counter()
        pipe.reuse.cancel = lambda: cancel.is_set() or matcher.stopped or time.monotonic() > deadline
        try:
            return pipe.generate(req.image, req.conversation, keep=keep, max_new_tokens=req.max_tokens,
                                 temperature=req.temperature, top_p=req.top_p, seed=req.seed, on_text=on_text,
                                 ignore_eos=req.ignore_eos), pipe.reuse.reused
        finally:
            pipe.reuse.cancel = None

    def admitted(wait: float) -> None:
        m.queue_wait.labels(bundle.name).observe(wait)

    task = asyncio.ensure_future(asyncio.wait_for(engine.execute(bundle, work, cancel, admitted), timeout))

    watcher = asyncio.ensure_future(_watch_disconnect(request, cancel))

    def finished(t: asyncio.Future) -> None:
        """Counted here, whatever becomes of the response (a streaming client may be gone already)."""
        watcher.cancel()
        if t.cancelled() or t.exception() is not None:
            exc = asyncio.CancelledError() if t.cancelled() else t.exception()
            _failure(state, exc, cancel, deadline)  # counts the outcome
            events.put_nowait(("error", exc))
        else:
            result, reused = t.result()
            _observe(state, bundle, result, reused, arrival, started, _outcome(result, matcher, cancel, deadline))
            events.put_nowait(("done", t.result()))

    task.add_done_callback(finished)
    try:
        first = await events.get()  # a failure before the first token is still a plain JSON error
    except asyncio.CancelledError:
        cancel.set()
        raise
    if first[0] == "error":
        return _failure(state, first[1], cancel, deadline, count=False)
    if not req.stream:
        while first[0] != "done":
            first = await events.get()
        if first[0] == "error":
            return _failure(state, first[1], cancel, deadline, count=False)
        return _complete(state, bundle, req, matcher, first[1], arrival, started, cancel, deadline)
    # streaming: the watcher goes on (a closed connection shows as http.disconnect), and so does the count above
    return StreamingResponse(_stream(state, bundle, req, matcher, first, events, arrival, started, cancel, deadline),
                             media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _watch_disconnect(request: Request, cancel: threading.Event) -> None:
    while not cancel.is_set():
        if await request.is_disconnected():
            cancel.set()
            return
        await asyncio.sleep(0.02)


def _failure(state: ServeState, exc: BaseException, cancel: threading.Event, deadline: float, *,
             count: bool = True) -> JSONResponse:
    """The response for a request that ended without an answer (and its count, by outcome)."""
    config = state.engine.config
    limit = config.request_timeout
    if isinstance(exc, Busy):
        outcome, response = "rejected", error(
            429, f"the server is full ({config.max_concurrency} running, {config.max_queue} waiting); retry after "
                 "Retry-After seconds", "rate_limit_exceeded", headers={"Retry-After": "1"})
    elif isinstance(exc, VlmpruneError):
        outcome, response = "bad_request", error(400, str(exc), "bad_request")
    elif isinstance(exc, (asyncio.TimeoutError, TimeoutError)) or (not cancel.is_set() and time.monotonic() > deadline):
        outcome, response = "timeout", error(504, f"no answer within --request-timeout {limit} s; retry later or "
                                                  "send fewer max_tokens", "timeout")
    elif isinstance(exc, asyncio.CancelledError) or cancel.is_set():
        outcome, response = "cancelled", error(499, "the client closed the request", "cancelled")
    else:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        outcome, response = "error", error(500, f"internal error: {type(exc).__name__}: {first}", "internal_error")
    if count:
        state.metrics.requests.labels(outcome).inc()
    return response


def _finish_reason(result, matcher: StopMatcher) -> str:
    if matcher.stopped or result.stop_reason == "eos":
        return "stop"
    return "length"


def _outcome(result, matcher, cancel: threading.Event, deadline: float) -> str:
    if result.stop_reason != "cancelled" or matcher.stopped:
        return "ok"
    return "cancelled" if cancel.is_set() else "timeout"


def _usage(result, reused: int) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.tokens_generated,
            "total_tokens": result.prompt_tokens + result.tokens_generated,
            "prompt_tokens_details": {"cached_tokens": reused, "visual_tokens_kept": result.visual_tokens_kept,
                                      "visual_tokens_total": result.visual_tokens_total}}


def _observe(state: ServeState, bundle, result, reused: int, arrival: float, started: dict, outcome: str) -> None:
    m = state.metrics
    m.requests.labels(outcome).inc()
    t = result.timings
    if t.ttft_ms:
        m.ttft.labels(bundle.name).observe(started.get("t", arrival) - arrival + t.ttft_ms / 1e3)
    if result.tokens_generated > 1:
        m.tpot.labels(bundle.name).observe(t.tpot_ms / 1e3)
    for kind, n in (("prompt", result.prompt_tokens), ("completion", result.tokens_generated),
                    ("visual_kept", result.visual_tokens_kept), ("cached", reused)):
        m.tokens.labels(bundle.name, kind).inc(n)


def _complete(state, bundle, req, matcher, done, arrival, started, cancel, deadline):
    result, reused = done
    outcome = _outcome(result, matcher, cancel, deadline)
    if outcome != "ok":
        return _failure(state, TimeoutError() if outcome == "timeout" else asyncio.CancelledError(), cancel, deadline,
                        count=False)
    text = matcher.text if req.stop else result.text
    return JSONResponse({
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
        "model": f"{bundle.name}@{result.keep}", "system_fingerprint": state.replica or None,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": _finish_reason(result, matcher), "logprobs": None}],
        "usage": _usage(result, reused)}, headers={"X-Vlmprune-Replica": state.replica} if state.replica else None)


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


async def _stream(state, bundle, req, matcher, first, events, arrival, started, cancel, deadline):
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(delta: dict, finish: str | None = None, model: str = bundle.name) -> dict:
        return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                "system_fingerprint": state.replica or None,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

    item = first
    try:
        yield _sse(chunk({"role": "assistant", "content": ""}))
        while True:
            if item[0] == "text":
                yield _sse(chunk({"content": item[1]}))
            elif item[0] == "error":
                yield _sse(json.loads(_failure(state, item[1], cancel, deadline, count=False).body))
                break
            else:
                result, reused = item[1]
                outcome = _outcome(result, matcher, cancel, deadline)
                if outcome != "ok":
                    why = TimeoutError() if outcome == "timeout" else asyncio.CancelledError()
                    yield _sse(json.loads(_failure(state, why, cancel, deadline, count=False).body))
                    break
                rest = matcher.flush()
                if rest:
                    yield _sse(chunk({"content": rest}))
                yield _sse(chunk({}, _finish_reason(result, matcher), f"{bundle.name}@{result.keep}"))
                if req.include_usage:
                    final = chunk({}, None)
                    final["choices"], final["usage"] = [], _usage(result, reused)
                    yield _sse(final)
                break
            item = await events.get()
        yield b"data: [DONE]\n\n"
    finally:
        cancel.set()  # the client went away (or the answer is complete): the decode loop stops at its next step
