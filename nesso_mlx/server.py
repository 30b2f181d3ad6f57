"""`nesso-mlx serve`: an OpenAI- and Anthropic-compatible HTTP server for agent frameworks and clients.

Endpoints: POST /v1/chat/completions (tools with tool_choice and parallel calls streamed as
OpenAI deltas, response_format json_object/json_schema, logprobs, SSE streaming with usage),
POST /v1/completions (text or token ids, echo with prompt logprobs for lm-evaluation-harness),
POST /v1/responses with GET/DELETE /v1/responses/{id} (OpenAI's Responses API) and POST
/v1/messages with /v1/messages/count_tokens (Anthropic's Messages API), GET /v1/models, GET
/health. Each protocol is a module of `nesso_mlx.request` over one request core (docs/server.md
has their field policies): it validates the body, and builds the reply or its stream from the
core's events; this module only routes and runs them. A bad request gets a 400 with the API's
error object naming the field, never a traceback; an unexpected failure is a 500 with a JSON
error (the traceback goes to the server's log only). A request nested deeper than
`request.core.MAX_JSON_DEPTH` is a 400; one holding far more text than the window takes is
refused before it is tokenized; with `max_queue`, a full queue answers 429.

Why Starlette and uvicorn: the two standard, well-kept pieces of Python's ASGI stack (FastAPI
is built on them), small, pure Python and quick to import. Starlette gives routing, request
bodies read as a stream (for the size limit), streaming responses for server-sent events with
client-disconnect detection, and a CORS middleware; uvicorn is the HTTP/1.1 server (h11). A
framework on top (FastAPI) would add pydantic models duplicating `nesso_mlx.request`'s
validation, whose errors must be the protocols' own objects anyway (docs/server.md measures
that choice); aiohttp would be a second, less common stack.

All MLX work runs in one worker thread (`server_engine.Engine`); the asyncio side parses,
queues and writes, and a small thread pool templates, tokenizes and compiles each request's
grammar (`server_engine.prepare_chat`, `completions.prompt_ids`) so that none of that holds up
decoding; the pool is shut down when the server stops. Security: binds 127.0.0.1 unless told
otherwise; with an API key every endpoint but GET /health (for load balancers' checks; it
reveals only load counters) needs `Authorization: Bearer KEY` or `x-api-key: KEY`
(constant-time comparison), else 401; bodies over `max_body_bytes` get 413; CORS is off unless
origins are named.

Run: `python -m nesso_mlx.server --model PATH [--port 8080] [--api-key KEY]` (or `nesso-mlx serve`).
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .errors import NessoError
from .request.core import MAX_JSON_DEPTH, RequestError, chat_prompt_ids, check_depth, dumps
from .server_engine import DEFAULT_PROMPT_CACHE_BYTES, Engine, Job, chat_job, completion_job, prepare_chat

log = logging.getLogger("nesso_mlx.server")

DEFAULT_PORT = 8080
DEFAULT_MAX_CONCURRENCY = 8
DEFAULT_MAX_BODY_BYTES = 8 * 2**20
PREPARE_THREADS = 2  # threads templating, tokenizing and compiling grammars for requests
API_KEY_ENV = "NESSO_MLX_API_KEY"


class PayloadTooLarge(Exception):
    pass


class QueueFull(Exception):
    """Every slot is busy and `max_queue` requests already wait: a 429 with Retry-After."""


def _error_body(message: str, error_type: str = "invalid_request_error", param: str | None = None, code: str | None = None):
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def _finite_float(text: str) -> float:
    """A JSON number as a float; one past a float's range (1e400) is refused, not read as infinity."""
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


async def read_body(request: Any, limit: int) -> bytes:
    """The request body, read up to `limit` bytes (PayloadTooLarge past it)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise PayloadTooLarge
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise PayloadTooLarge
    if not body:
        raise RequestError("the request has no body; send a JSON object")
    return bytes(body)


async def read_json(request: Any, limit: int) -> Any:
    """The request body as JSON, read up to `limit` bytes (PayloadTooLarge past it)."""
    return parse_json_body(await read_body(request, limit))


def parse_json_body(body: bytes, text_limit: int | None = None, context_window: int = 0) -> Any:
    """A body's JSON, checked: nesting past `MAX_JSON_DEPTH` and (with `text_limit`) more text than
    the window could take are `RequestError`s. The walks run only when the bytes allow either:
    a body of fewer `[`/`{` than the depth limit cannot nest past it, and one no longer than
    `text_limit` bytes holds no more characters of text (the server runs this off its event loop)."""
    try:
        value = json.loads(body.decode("utf-8"), parse_constant=_reject_constant, parse_float=_finite_float)
    except UnicodeDecodeError:
        raise RequestError("the body is not UTF-8") from None
    except RecursionError:
        raise RequestError("the body's JSON is nested too deeply") from None
    except ValueError as e:
        raise RequestError(f"the body is not valid JSON ({str(e).splitlines()[0][:120]})") from None
    if body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH:
        check_depth(value, "the body")
    if _SURROGATE_ESCAPE.search(body):
        value = _replace_lone_surrogates(value)
    if text_limit is not None and len(body) > text_limit:
        check_text_size(value, text_limit, context_window)
    return value


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _replace_lone_surrogates(value: Any) -> Any:
    """`value` with U+FFFD for every lone surrogate in its strings. JSON may escape one
    (`"\\ud800"`); no UTF-8 text can hold it, so the tokenizer could not encode it. A pair of
    escapes that makes one character was joined by the JSON parser and is kept."""
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_replace_lone_surrogates(item) for item in value]
    if isinstance(value, dict):
        return {_replace_lone_surrogates(k): _replace_lone_surrogates(v) for k, v in value.items()}
    return value


class _NotFound(Exception):
    """A stored object that is not there: a 404."""


def check_text_size(body: Any, limit: int, context_window: int) -> None:
    """Refuse a body whose strings hold more than `limit` characters of text (the window times
    the longest token's length: more cannot fit), before anything is templated or tokenized, so
    that a multi-megabyte message costs its parse only."""
    total, stack = 0, [body]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, dict):  # keys are text too (a schema's property names)
            total += sum(len(key) for key in item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    if total > limit:
        raise RequestError(
            f"the request holds {total} characters of text, more than the model's context window of {context_window} "
            f"tokens can take ({limit} characters at most, even at the longest token); shorten the prompt",
            None,
            "context_length_exceeded",
        )


class _Call:
    """A job on its way through the engine, seen from the asyncio side: its events and the watcher
    that cancels it when the client disconnects."""

    def __init__(self, engine: Engine, request: Any, work: Callable, max_queue: int | None = None, preparing: int = 0) -> None:
        self.admit(engine, max_queue, preparing)
        loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()

        def sink(event: dict) -> None:
            try:
                loop.call_soon_threadsafe(self.events.put_nowait, event)
            except RuntimeError:  # the loop is closed: the server is going down
                self.job.cancel()

        self.job = Job(work, sink)
        self.request = request
        engine.submit(self.job)
        self.watcher = asyncio.ensure_future(self._watch())

    @staticmethod
    def admit(engine: Engine, max_queue: int | None, preparing: int = 0) -> None:
        """Raise `QueueFull` when every slot is busy and `max_queue` requests already wait
        (`preparing`: requests being prepared for the queue, which count as waiting)."""
        if max_queue is not None and engine.active + engine.queued + preparing >= engine.max_concurrency + max_queue:
            raise QueueFull

    async def _watch(self) -> None:
        try:
            while True:
                message = await self.request.receive()
                if message["type"] == "http.disconnect":
                    self.job.cancel()
                    self.events.put_nowait({"type": "disconnected"})
                    return
        except Exception:  # the connection is gone in some other way; the response's end closes the job
            return

    async def next(self) -> dict:
        return await self.events.get()

    def close(self) -> None:
        self.job.cancel()
        self.watcher.cancel()


def _json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None):
    from starlette.responses import Response

    return Response(dumps(body), status_code=status, media_type="application/json", headers=headers)


def _event_response(event: dict):
    return _json_response(event["error"], event["status"])


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def create_app(
    engine: Engine,
    *,
    model_id: str | None = None,
    api_key: str | None = None,
    cors: Sequence[str] | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_queue: int | None = None,
):
    """The Starlette application serving `engine` (started) under the OpenAI and Anthropic APIs.

    `max_queue` bounds the requests waiting for a generation slot (None: unbounded); past it a
    request gets a 429 with Retry-After.
    """
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    from .request import anthropic_messages as anthropic
    from .request import chat_completions as chat_api
    from .request import completions as completions_api
    from .request import responses

    model_id = model_id or engine.model_name
    created = int(time.time())

    store = responses.ResponseStore()
    token_chars: list[int] = []  # the vocabulary's longest token, for the early size check (computed once)

    async def parse(request: Any, parser: Callable, size_check: bool = True, **kwargs: Any) -> Any:
        raw = await read_body(request, max_body_bytes)
        window = engine.context_window
        if size_check and not token_chars:
            token_chars.append(await off_worker(lambda: engine.runtime.tokenizer.max_token_chars))
        limit = token_chars[0] * window if size_check else None
        body = await off_worker(parse_json_body, raw, limit, window)  # a big body's walks off the event loop
        return parser(body, context_window=window, vocab_size=engine.vocab_size, **kwargs)

    def open_call(request: Any, work: Callable) -> _Call:
        # Requests still being prepared count as waiting (a chat request's own has ended by now).
        return _Call(engine, request, work, max_queue, preparing[0])

    # Templating, tokenizing and grammar compilation run here, not on the MLX worker thread.
    pool = ThreadPoolExecutor(max_workers=PREPARE_THREADS, thread_name_prefix="nesso-mlx-prepare")

    async def off_worker(function: Callable, *args: Any) -> Any:
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, function, *args)
        except RequestError:
            raise
        except NessoError as e:  # one-line messages about the request (template, tokenizer)
            raise RequestError(str(e)) from None

    preparing = [0]  # requests in the pool on their way to the queue: a burst cannot all pass admission

    async def prepare(function: Callable, *args: Any) -> Any:
        """`function(*args)` (a request's templating, tokenizing, grammar compilation) in the
        preparation pool; while it runs, with `max_queue`, the request counts as waiting."""
        _Call.admit(engine, max_queue, preparing[0])  # a request that will be refused costs no preparation
        preparing[0] += 1
        try:
            return await off_worker(function, *args)
        finally:
            preparing[0] -= 1

    async def prepare_chat_request(chat: Any) -> Any:
        rt = engine.runtime
        return await prepare(prepare_chat, rt.tokenizer, engine.context_window, engine.vocab_size, chat, rt.default_max_tokens)

    async def health(request: Any):
        return _json_response({"status": "ok", "active": engine.active, "queued": engine.queued})

    def model_card() -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "nesso-mlx"}

    async def models(request: Any):
        return _json_response({"object": "list", "data": [model_card()]})

    async def model(request: Any):
        if request.path_params["name"] != model_id:
            name = request.path_params["name"]
            body = _error_body(
                f"the model {name!r} does not exist; this server runs {model_id!r}", param="model", code="model_not_found"
            )
            return _json_response(body, 404)
        return _json_response(model_card())

    async def chat_completions(request: Any):
        parsed = await parse(request, chat_api.parse_chat_request)
        prepared = await prepare_chat_request(parsed)
        builder = chat_api.ChatCompletionStream(model_id, parsed.include_usage)
        return await protocol_reply(request, builder, parsed.stream, lambda rt: chat_job(rt, parsed, parsed.stream, prepared))

    async def completions(request: Any):
        parsed = await parse(request, completions_api.parse_completion_request)
        prompts = await prepare(completions_api.prompt_ids, engine.runtime.tokenizer, parsed, engine.context_window)
        builder = completions_api.CompletionStream(model_id, parsed.include_usage)
        return await protocol_reply(
            request, builder, parsed.stream, lambda rt: completion_job(rt, parsed, parsed.stream, prompts)
        )

    async def chat_reply(request: Any, chat: Any, builder: Any, on_done: Callable[[], None] | None = None):
        """A chat request of the Messages or Responses API: the builder always takes the deltas
        (its reply is built from them, streamed or not)."""
        prepared = await prepare_chat_request(chat)
        return await protocol_reply(request, builder, chat.stream, lambda rt: chat_job(rt, chat, True, prepared), on_done)

    async def protocol_reply(request: Any, builder: Any, stream: bool, work: Callable, on_done: Callable[[], None] | None = None):
        """Run `work` (a prepared job) and answer with `builder`, the protocol's stream builder
        (see `nesso_mlx.request`): its SSE events when `stream`, else its `body()` once the job is
        done. `on_done` runs once the reply is complete (before the stream says so)."""
        call = open_call(request, work)
        streaming = False
        try:
            first = await call.next()
            if first["type"] != "ready":
                return _event_response(first) if first["type"] == "error" else _json_response({}, 499)
            head = builder.start(first)
            if stream:
                streaming = True
                return StreamingResponse(
                    _protocol_stream(call, builder, head, on_done), media_type="text/event-stream", headers=SSE_HEADERS
                )
            while (event := await call.next())["type"] == "delta":
                builder.delta(event)
            if event["type"] != "done":
                return _event_response(event) if event["type"] == "error" else _json_response({}, 499)
            builder.finish(event)
            if on_done is not None:
                on_done()
            return _json_response(builder.body())
        finally:
            if not streaming:
                call.close()

    async def messages(request: Any):
        parsed = await parse(request, anthropic.parse_messages_request)
        return await chat_reply(request, parsed, anthropic.MessageStream(parsed.model or model_id))

    async def count_tokens(request: Any):
        # Text past what the window could take is refused uncounted: counting it would hold the
        # preparation pool (and, through the tokenizer, the worker) for seconds.
        parsed = await parse(request, anthropic.parse_messages_request, count_only=True)
        # It uses the preparation threads: with --max-queue it counts as waiting, so counts cannot starve chats.
        ids = await prepare(chat_prompt_ids, engine.runtime.tokenizer, parsed)
        return _json_response({"input_tokens": len(ids)})

    async def create_response(request: Any):
        parsed = await parse(request, responses.parse_responses_request, store=store)
        builder = responses.ResponseStream(parsed, parsed.chat.model or model_id)
        return await chat_reply(request, parsed.chat, builder, lambda: keep(parsed, builder))

    def keep(parsed: Any, builder: Any) -> None:
        if parsed.store:
            store.put(builder.response, [*parsed.conversation, builder.assistant_message()])

    def stored_response(request: Any) -> tuple[str, Any]:
        response_id = request.path_params["id"]
        item = store.get(response_id)
        if item is None:
            raise _NotFound(f"no stored response with id {response_id!r}")
        return response_id, item

    async def get_response(request: Any):
        return _json_response(stored_response(request)[1][0])

    async def delete_response(request: Any):
        response_id, _ = stored_response(request)
        store.delete(response_id)
        return _json_response({"id": response_id, "object": "response", "deleted": True})

    async def _protocol_stream(call: _Call, builder: Any, head: str, on_done: Callable | None = None) -> AsyncIterator[str]:
        try:
            if head:
                yield head
            while True:
                event = await call.next()
                if event["type"] == "delta":
                    text = builder.delta(event)
                    if text:
                        yield text
                elif event["type"] == "done":
                    final = builder.finish(event)
                    if on_done is not None:
                        on_done()  # stored before the client hears it is done: its next request may name it
                    yield final
                    return
                elif event["type"] == "error":
                    yield builder.error(event)
                    return
                else:  # disconnected
                    return
        finally:
            call.close()

    async def request_error(request: Any, exc: Exception):
        assert isinstance(exc, RequestError)
        return _json_response(exc.to_dict(), 400)

    async def too_large(request: Any, exc: Exception):
        return _json_response(
            _error_body(f"the request body is larger than {max_body_bytes} bytes", code="request_too_large"),
            413,
            {"Connection": "close"},
        )

    async def http_error(request: Any, exc: Exception):
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            message = f"Invalid URL ({request.method} {request.url.path})"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        if request.url.path.startswith("/v1/messages"):
            return _json_response(anthropic.error_body(exc.status_code, message), exc.status_code, getattr(exc, "headers", None))
        return _json_response(_error_body(message), exc.status_code, getattr(exc, "headers", None))

    async def server_error(request: Any, exc: Exception):
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return _json_response(_error_body("internal server error (see the server's log)", "server_error"), 500)

    middleware = []
    if cors:
        from starlette.middleware.cors import CORSMiddleware

        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(cors),
                allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
                allow_headers=["*"],  # the OpenAI SDKs send their own X-Stainless-* headers
            )
        )
    if api_key:
        middleware.append(Middleware(BearerAuth, api_key=api_key, open_paths={"/health"}))

    def guarded(endpoint: Callable) -> Callable:
        """The endpoint, with its errors as OpenAI error objects: 400, 413, or a 500 whose traceback
        goes to the log only (Starlette's own last-resort handler would also re-raise)."""

        async def run(request: Any):
            try:
                return await endpoint(request)
            except (RequestError, PayloadTooLarge) as e:
                return await (request_error if isinstance(e, RequestError) else too_large)(request, e)
            except QueueFull:
                message = (
                    f"the server is busy: {engine.max_concurrency} requests are generating and {max_queue} waiting; retry later"
                )
                return _json_response(_error_body(message, "rate_limit_error", code="queue_full"), 429, {"Retry-After": "1"})
            except _NotFound as e:
                return _json_response(_error_body(str(e), code="not_found"), 404)
            except Exception as e:
                return await server_error(request, e)

        return run

    def anthropic_shaped(endpoint: Callable) -> Callable:
        """The endpoint with its error bodies in Anthropic's shape, {"type": "error", "error": {...}}."""
        inner = guarded(endpoint)

        async def run(request: Any):
            response = await inner(request)
            if response.status_code < 400 or response.media_type != "application/json":
                return response
            try:
                message = json.loads(response.body)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = "request failed"
            headers = {k: v for k, v in response.headers.items() if k.lower() in ("retry-after", "connection")}
            return _json_response(anthropic.error_body(response.status_code, message), response.status_code, headers)

        return run

    routes = [
        Route("/health", guarded(health), methods=["GET"]),
        Route("/v1/models", guarded(models), methods=["GET"]),
        Route("/v1/models/{name:path}", guarded(model), methods=["GET"]),
        Route("/v1/chat/completions", guarded(chat_completions), methods=["POST"]),
        Route("/v1/completions", guarded(completions), methods=["POST"]),
        Route("/v1/messages", anthropic_shaped(messages), methods=["POST"]),
        Route("/v1/messages/count_tokens", anthropic_shaped(count_tokens), methods=["POST"]),
        Route("/v1/responses", guarded(create_response), methods=["POST"]),
        Route("/v1/responses/{id}", guarded(get_response), methods=["GET"]),
        Route("/v1/responses/{id}", guarded(delete_response), methods=["DELETE"]),
    ]
    handlers = {HTTPException: http_error, Exception: server_error}
    app = Starlette(routes=routes, middleware=middleware, exception_handlers=handlers)
    app.state.prepare_pool = pool
    # For `serve` when the server stops: requests still waiting for preparation are dropped.
    app.state.close = lambda: pool.shutdown(wait=False, cancel_futures=True)
    return app


class BearerAuth:
    """ASGI middleware: every HTTP request but those to `open_paths` needs `Authorization: Bearer KEY`."""

    def __init__(self, app: Any, api_key: str, open_paths: set[str] = frozenset()) -> None:
        self.app = app
        self.key = api_key.encode()
        self.open_paths = open_paths

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        given = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    given = token.strip()
            elif name == b"x-api-key" and not given:  # Anthropic's clients
                given = value.strip()
        if not hmac.compare_digest(given, self.key):
            message = "missing API key: send Authorization: Bearer KEY or x-api-key: KEY" if not given else "incorrect API key"
            if scope["path"].startswith("/v1/messages"):
                from .request.anthropic_messages import error_body

                body = dumps(error_body(401, message)).encode()
            else:
                body = dumps(_error_body(message, code="invalid_api_key")).encode()
            headers = [
                (b"content-type", b"application/json"),
                (b"www-authenticate", b"Bearer"),
                (b"content-length", str(len(body)).encode()),
            ]
            await send({"type": "http.response.start", "status": 401, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


def serve(
    model: str,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    api_key: str | None = None,
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    prompt_cache_bytes: int = DEFAULT_PROMPT_CACHE_BYTES,
    cors: Sequence[str] | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    *,
    default_max_tokens: int | None = None,
    dtype: str | None = None,
    log_level: str = "info",
    prompt_lookup: bool = True,
    max_queue: int | None = None,
) -> None:
    """Load `model` (an alias, repo id or folder) and serve the OpenAI API on host:port until interrupted.

    `api_key` protects every endpoint but /health; `max_concurrency` requests generate at once (the
    rest queue); `prompt_cache_bytes` bounds the KV caches kept for reuse across requests (0 turns
    the prompt cache off); `cors` names the browser origins allowed (none by default);
    `max_body_bytes` bounds request bodies; `default_max_tokens` caps chat replies whose request sets
    no max_tokens (None: up to the context window, as OpenAI); `prompt_lookup` turns on
    prompt-lookup decoding for a request while it decodes alone; `max_queue` bounds the requests
    waiting for a slot (past it: 429 with Retry-After; None: unbounded). Raises NessoError when the model
    cannot be loaded.
    """
    import uvicorn

    if max_concurrency < 1:
        raise NessoError(f"max_concurrency must be at least 1, got {max_concurrency}")
    if max_body_bytes < 1 or prompt_cache_bytes < 0:
        raise NessoError("max_body_bytes must be positive and prompt_cache_bytes not negative")
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s: %(message)s")
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning("serving on %s without an API key: anyone who can reach this address can use the model", host)
    if default_max_tokens is not None and default_max_tokens < 1:
        raise NessoError(f"default_max_tokens must be at least 1, got {default_max_tokens}")
    if max_queue is not None and max_queue < 0:
        raise NessoError(f"max_queue must not be negative, got {max_queue}")
    engine = Engine(
        model,
        dtype=dtype,
        max_concurrency=max_concurrency,
        prompt_cache_bytes=prompt_cache_bytes,
        default_max_tokens=default_max_tokens,
        prompt_lookup=prompt_lookup,
    )
    engine.start()
    app = create_app(engine, model_id=model, api_key=api_key, cors=cors, max_body_bytes=max_body_bytes, max_queue=max_queue)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off", timeout_graceful_shutdown=5)
    try:
        sock = config.bind_socket()  # bound here, so that port 0 (any free port) can say which it got
        if port == 0:
            where = f"[{host}]" if ":" in host else host
            print(f"nesso-mlx serve: listening on http://{where}:{sock.getsockname()[1]}", file=sys.stderr, flush=True)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        app.state.close()
        engine.stop()


def _size(text: str) -> int:
    """Bytes from `1073741824`, `512M`, `1G`, `64K` (powers of 1024)."""
    units = {"k": 2**10, "m": 2**20, "g": 2**30}
    text = text.strip().lower().removesuffix("b").removesuffix("i")
    scale = units.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in units else text
    try:
        value = float(number) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1073741824, 512M, 1G)") from None
    if value < 0:
        raise argparse.ArgumentTypeError("a size cannot be negative")
    return int(value)


def _at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least `low`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}" if low else f"must be 0 or more, got {value}")
        return value

    return parse


_positive, _count = _at_least(1), _at_least(0)


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value < 65536:
        raise argparse.ArgumentTypeError(f"a port is between 1 and 65535 (0: any free port), got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m nesso_mlx.server`: parse the command line and `serve`."""
    from .registry import DEFAULT_CHAT_MODEL

    prog = "nesso-mlx serve" if os.path.basename(sys.argv[0]) == "nesso-mlx" else "python -m nesso_mlx.server"
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve OpenAI's chat completions, completions and Responses APIs and Anthropic's Messages API "
        "(tools, JSON schemas, streaming) for one model.",
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_CHAT_MODEL,
        help=f"a Nesso alias, Hugging Face repo id or local folder (default {DEFAULT_CHAT_MODEL})",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument(
        "--port", type=_port, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any free port, printed on start)"
    )
    parser.add_argument(
        "--api-key", default=os.environ.get(API_KEY_ENV), help=f"require Authorization: Bearer KEY (default ${API_KEY_ENV})"
    )
    parser.add_argument("--max-concurrency", type=_positive, default=DEFAULT_MAX_CONCURRENCY, help="requests generating at once")
    parser.add_argument(
        "--prompt-cache-bytes", type=_size, default=DEFAULT_PROMPT_CACHE_BYTES, help="KV cache kept across requests (0: off)"
    )
    parser.add_argument("--cors", action="append", metavar="ORIGIN", help="allow this browser origin (repeatable; default: none)")
    parser.add_argument("--max-body-bytes", type=_size, default=DEFAULT_MAX_BODY_BYTES, help="largest request body (413 past it)")
    parser.add_argument(
        "--max-tokens", type=_positive, help="cap for chat replies whose request sets no max_tokens (default: the context window)"
    )
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="compute precision (default: as stored)")
    parser.add_argument(
        "--prompt-lookup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="prompt-lookup decoding while a request decodes alone (greedy output unchanged up to kernel numerics; default: on)",
    )
    parser.add_argument(
        "--max-queue",
        type=_count,
        help="requests that may wait for a slot; past it a request gets 429 with Retry-After (default: no bound)",
    )
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    args = parser.parse_args(argv)
    if args.max_body_bytes < 1:
        parser.error("--max-body-bytes must be at least 1")
    try:
        serve(
            args.model,
            host=args.host,
            port=args.port,
            api_key=args.api_key or None,
            max_concurrency=args.max_concurrency,
            prompt_cache_bytes=args.prompt_cache_bytes,
            cors=args.cors,
            max_body_bytes=args.max_body_bytes,
            default_max_tokens=args.max_tokens,
            dtype=args.dtype,
            log_level=args.log_level,
            prompt_lookup=args.prompt_lookup,
            max_queue=args.max_queue,
        )
    except NessoError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
