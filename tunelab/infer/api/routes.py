"""`tunelab serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) in front of the generation core.

This module owns the HTTP side only: `GET /v1/models`, `POST /v1/chat/completions` (whole or streamed as
server-sent events in OpenAI's chunk format, ending with `data: [DONE]`), request checking, and OpenAI-style
error bodies (`{"error": {"message", "type", "param", "code"}}`). Answers come from `generate_many` (whole
answers, queued in arrival order and batched when they ask for the same greedy generation: `Batcher`) and
`generate_stream` (streamed ones, one at a time under the model's lock). Generation runs in worker threads, so
the event loop keeps accepting, streaming and rejecting requests meanwhile.

`build_api` returns the app (tests use it); `serve_api` binds it. `ensure_port_free` is shared with the web page.
"""

from __future__ import annotations

import asyncio
import errno
import json
import socket
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from tunelab.data.encode import encode_for_generation
from tunelab.errors import TunelabError
from tunelab.model.generate import ChatModel, Generated, GenerationOptions, PromptTooLong, StreamStats, \
    conversation, generate_many, generate_stream

MAX_BODY_BYTES = 4 * 1024 * 1024  # far above any prompt that fits a context; stops memory abuse early
MAX_STOP_WORDS = 4  # OpenAI's own limit
MAX_STOP_CHARS = 256


class RequestError(Exception):
    """A request the client must fix; becomes an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type_


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# ---------------------------------------------------------------------------------------------- ports


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or a TunelabError that says why not."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise TunelabError(f"cannot listen on {host}:{port}: unknown address ({e.strerror})") from None
    sock = socket.socket(family, kind, proto)
    # SO_REUSEADDR lets a port in TIME_WAIT be reused; a port some program listens on still fails.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise TunelabError(f"port {port} on {host} is already in use; stop the program using it or pass "
                               "--port with another number") from None
        raise TunelabError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def ensure_port_free(host: str, port: int) -> None:
    """Raise TunelabError (one clear line) if host:port cannot be bound."""
    _bind(host, port).close()


# ---------------------------------------------------------------------------------------------- requests


def _number(body: dict, key: str, lo: float, hi: float, integer: bool = False) -> Any:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise RequestError(f"'{key}' must be {'an integer' if integer else 'a number'} (got {json.dumps(v)})",
                           param=key, code="invalid_type")
    if not lo <= v <= hi:
        raise RequestError(f"'{key}' must be between {lo:g} and {hi:g} (got {v})", param=key,
                           code="invalid_value")
    return v


def _check_encodable(value: Any, where: str = "body") -> None:
    """JSON allows lone surrogates (\\ud800) that no tokenizer can encode: refuse them up front."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise RequestError(f"{where} holds text that is not valid Unicode (a lone surrogate)",
                               code="invalid_value") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_encodable(k, where)
            _check_encodable(v, f"{where}.{k}" if where != "body" else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_encodable(v, f"{where}[{i}]")


def _text(content: Any, i: int) -> str:
    """A message's content: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise RequestError(f"messages[{i}].content: only text parts are supported",
                                   param=f"messages[{i}].content", code="invalid_type")
            parts.append(part["text"])
        return "".join(parts)
    raise RequestError(f"messages[{i}].content must be a string or a list of text parts",
                       param=f"messages[{i}].content", code="invalid_type")


def parse_messages(messages: Any, default_system: str | None):
    """OpenAI messages -> the core's conversation; system first, then user/assistant turns ending with user."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {role, content} objects", param="messages",
                           code="invalid_value" if isinstance(messages, list) else "invalid_type")
    system = default_system
    turns: list[tuple[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise RequestError(f"messages[{i}] must be an object with 'role' and 'content'",
                               param=f"messages[{i}]", code="invalid_type")
        role = m["role"]
        if role not in ("system", "developer", "user", "assistant"):
            raise RequestError(f"messages[{i}].role: unknown role {json.dumps(role)} (expected system, user or "
                               "assistant)", param=f"messages[{i}].role", code="invalid_value")
        text = _text(m.get("content"), i)
        if role in ("system", "developer"):
            if turns:
                raise RequestError(f"messages[{i}]: a system message is only allowed first",
                                   param=f"messages[{i}].role", code="invalid_value")
            system = text
            continue
        expected = "user" if not turns or turns[-1][0] == "assistant" else "assistant"
        if role != expected:
            raise RequestError(f"messages[{i}]: expected a {expected} message (turns alternate user, assistant)",
                               param=f"messages[{i}].role", code="invalid_value")
        turns.append((role, text))
    if not turns or turns[-1][0] != "user":
        raise RequestError("the last message must be the user's", param="messages", code="invalid_value")
    history = [(turns[k][1], turns[k + 1][1]) for k in range(0, len(turns) - 1, 2)]
    return conversation(history, turns[-1][1], system or None)


def parse_request(body: Any, chat: ChatModel, defaults: GenerationOptions, system: str | None):
    """(conversation, options, stream, include_usage, prompt length) for a chat completion request."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object", code="invalid_type")
    if "messages" not in body:
        raise RequestError("missing required parameter: 'messages'", param="messages",
                           code="missing_required_parameter")
    conv = parse_messages(body["messages"], system)
    n = _number(body, "n", 1, 128, integer=True)
    if n not in (None, 1):
        raise RequestError("only n=1 is supported", param="n", code="invalid_value")
    temperature = _number(body, "temperature", 0, 2)
    top_p = _number(body, "top_p", 0, 1)
    if top_p == 0:
        raise RequestError("'top_p' must be greater than 0", param="top_p", code="invalid_value")
    seed = _number(body, "seed", -(2 ** 63), 2 ** 64 - 1, integer=True)
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, key, 1, 10 ** 7, integer=True)
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= MAX_STOP_WORDS:
        stops = list(stop)
    else:
        raise RequestError(f"'stop' must be a string or a list of up to {MAX_STOP_WORDS} strings", param="stop",
                           code="invalid_value")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        # matching cost grows fast with a stop string's length (and it would hold the model for everyone)
        raise RequestError(f"each 'stop' string may be at most {MAX_STOP_CHARS} characters", param="stop",
                           code="invalid_value")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be true or false", param="stream", code="invalid_type")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise RequestError("'stream_options' must be an object", param="stream_options", code="invalid_type")
    include_usage = stream_options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise RequestError("'stream_options.include_usage' must be true or false",
                           param="stream_options.include_usage", code="invalid_type")

    try:
        n_prompt = len(encode_for_generation(conv, chat.renderer, chat.tokenizer))
    except TunelabError as e:  # e.g. a chat template that cannot render this conversation
        raise RequestError(str(e), param="messages", code="invalid_value") from None
    room = chat.context_length - n_prompt
    if room < 1:
        raise RequestError(f"the prompt is {n_prompt} tokens, which leaves no room in the model's context of "
                           f"{chat.context_length} tokens", param="messages", code="context_length_exceeded")
    if max_tokens is None:
        # Like OpenAI: without max_tokens the answer may use whatever room the context leaves.
        max_new = min(defaults.max_new_tokens, room)
    elif max_tokens > room:
        raise RequestError(f"the prompt is {n_prompt} tokens; with {key}={max_tokens} it exceeds the model's "
                           f"context of {chat.context_length} tokens", param=key,
                           code="context_length_exceeded")
    else:
        max_new = max_tokens
    opts = replace(defaults, max_new_tokens=int(max_new),
                   temperature=defaults.temperature if temperature is None else float(temperature),
                   top_p=defaults.top_p if top_p is None else float(top_p),
                   seed=defaults.seed if seed is None else int(seed),
                   stop_words=[*defaults.stop_words, *(s for s in stops if s)])
    return conv, opts, stream, include_usage, n_prompt


# ---------------------------------------------------------------------------------------------- batching


@dataclass
class _Job:
    conv: Any
    opts: GenerationOptions
    future: Future = field(default_factory=Future)
    # A streamed request waits in the same line; at its turn the worker hands it the model (`turn`) and waits
    # until its stream ends (`done`).
    stream: bool = False
    turn: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)


class Batcher:
    """Serves whole (non-streamed) completions in arrival order on one worker thread. When the model frees up,
    the request at the head of the queue runs together with the queued requests behind it that ask for the same
    greedy generation (the simple case: one set of options, no sampling); a CPU answers eight such requests in
    one batch much faster than one after another."""

    def __init__(self, chat: ChatModel, max_batch: int = 8):
        self.chat = chat
        self.max_batch = max_batch
        self.pending: deque[_Job] = deque()
        self.cond = threading.Condition()
        threading.Thread(target=self._serve, name="tunelab-batcher", daemon=True).start()

    def submit(self, conv: Any, opts: GenerationOptions) -> Future:
        return self._enqueue(_Job(conv, opts)).future

    def reserve_stream(self) -> _Job:
        """A place in line for a streamed request: wait for `turn`, stream, then set `done`."""
        return self._enqueue(_Job(None, GenerationOptions(), stream=True))

    def _enqueue(self, job: _Job) -> _Job:
        with self.cond:
            self.pending.append(job)
            self.cond.notify()
        return job

    def _take(self) -> list[_Job]:
        with self.cond:
            while not self.pending:
                self.cond.wait()
            head = self.pending.popleft()
            batch, skipped = [head], []
            if head.opts.temperature == 0 and not head.stream:
                while self.pending and len(batch) < self.max_batch:
                    job = self.pending.popleft()
                    (batch if job.opts == head.opts and not job.stream else skipped).append(job)
                self.pending.extendleft(reversed(skipped))  # the others keep their place in line
            return batch

    def _serve(self) -> None:
        while True:
            taken = self._take()
            if taken[0].stream:
                taken[0].turn.set()
                taken[0].done.wait()
                continue
            # a request whose caller gave up is dropped; the others can no longer be cancelled
            batch = [j for j in taken if j.future.set_running_or_notify_cancel()]
            if not batch:
                continue
            try:
                results = generate_many(self.chat, [j.conv for j in batch], batch[0].opts, batch_size=len(batch))
            except BaseException as e:  # handed to every request of the batch
                for j in batch:
                    j.future.set_exception(e)
                continue
            for j, r in zip(batch, results):
                j.future.set_result(r)


# ---------------------------------------------------------------------------------------------- app


def build_api(chat: ChatModel, system: str | None = None, defaults: GenerationOptions | None = None,
              model_name: str | None = None, max_batch: int = 8) -> Any:
    """The FastAPI app (unbound)."""
    defaults = defaults or GenerationOptions()
    model_id = model_name or chat.name
    created = int(time.time())
    app = FastAPI(title=f"tunelab serve: {model_id}", docs_url=None, redoc_url=None, openapi_url=None)
    batcher = Batcher(chat, max(1, max_batch))

    def fail(e: RequestError) -> JSONResponse:
        return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind, None, None), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(f"invalid request: {exc.errors()[:1]}"), status_code=400)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}"[:500], "server_error"),
                            status_code=500)

    def model_card() -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "tunelab"}

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        if name != model_id:
            return fail(RequestError(f"the model '{name}' does not exist; this server serves '{model_id}'",
                                     param="model", code="model_not_found", status=404, type_="not_found_error"))
        return model_card()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_id}

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise RequestError(f"the request body is {int(declared)} bytes; the limit is {MAX_BODY_BYTES}",
                               code="request_too_large", status=413)
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_BODY_BYTES:
                raise RequestError(f"the request body exceeds the limit of {MAX_BODY_BYTES} bytes",
                                   code="request_too_large", status=413)
        return bytes(data)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            raw = await read_body(request)
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise RequestError(f"the request body is not valid JSON ({e})", code="invalid_json") from None
            except (RecursionError, ValueError) as e:  # nested too deeply; a number too long to convert
                raise RequestError(f"the request body cannot be read ({type(e).__name__})",
                                   code="invalid_json") from None
            _check_encodable(body)
            # Tokenising a long prompt takes a while: off the event loop too.
            conv, opts, stream, include_usage, n_prompt = await run_in_threadpool(
                parse_request, body, chat, defaults, system)
        except RequestError as e:
            return fail(e)
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        now = int(time.time())
        if not stream:
            try:
                g: Generated = await asyncio.wrap_future(batcher.submit(conv, opts))
            except PromptTooLong as e:
                return fail(RequestError(str(e), param="messages", code="context_length_exceeded"))
            return {
                "id": cid, "object": "chat.completion", "created": now, "model": model_id,
                "system_fingerprint": None,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": g.text, "refusal": None},
                             "logprobs": None, "finish_reason": g.finish_reason}],
                "usage": {"prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens,
                          "total_tokens": g.prompt_tokens + g.completion_tokens},
            }
        return StreamingResponse(_sse(chat, conv, opts, cid, now, model_id, include_usage, n_prompt, batcher),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


async def _pieces(chat: ChatModel, conv, opts: GenerationOptions, stats: StreamStats, batcher: Batcher
                  ) -> AsyncIterator[str]:
    """generate_stream's pieces, produced in one worker thread that owns the generator (so its lock is taken and
    released in that thread), handed to the event loop through a queue. If the client goes away, the worker
    closes the generator, which stops the model at its next token."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    gone = threading.Event()

    def put(item: tuple[str, Any]) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop closed (server shutting down)
            gone.set()

    def produce() -> None:
        place.turn.wait()  # requests are answered in arrival order, streamed or not
        if gone.is_set():  # the client left while waiting
            place.done.set()
            return
        pieces = generate_stream(chat, conv, opts, stats)
        try:
            for piece in pieces:
                if gone.is_set():
                    break
                put(("piece", piece))
            put(("end", None))
        except BaseException as e:  # handed to the async side
            put(("error", e))
        finally:
            pieces.close()
            place.done.set()

    # Reserved here, with the thread that always releases it, so a response that is never sent holds nothing.
    place = batcher.reserve_stream()
    threading.Thread(target=produce, name="tunelab-stream", daemon=True).start()
    try:
        while True:
            kind, value = await queue.get()
            if kind == "piece":
                yield value
            elif kind == "end":
                return
            else:
                raise value
    finally:
        gone.set()


async def _sse(chat: ChatModel, conv, opts: GenerationOptions, cid: str, created: int, model_id: str,
               include_usage: bool, n_prompt: int, batcher: Batcher) -> AsyncIterator[str]:
    def chunk(delta: dict, finish: str | None, **extra: Any) -> str:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_id,
                "system_fingerprint": None,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if include_usage:
            body["usage"] = None
        body.update(extra)
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    yield chunk({"role": "assistant", "content": ""}, None)
    stats = StreamStats()
    try:
        async for piece in _pieces(chat, conv, opts, stats, batcher):
            yield chunk({"content": piece}, None)
    except PromptTooLong as e:
        # The status line is already sent; OpenAI's streams report late errors as an error event.
        yield f"data: {json.dumps(error_body(str(e), param='messages', code='context_length_exceeded'))}\n\n"
        yield "data: [DONE]\n\n"
        return
    except Exception as e:  # the client must still see the stream end
        yield f"data: {json.dumps(error_body(f'{type(e).__name__}: {e}'[:500], 'server_error'))}\n\n"
        yield "data: [DONE]\n\n"
        return
    n_out = stats.completion_tokens
    yield chunk({}, stats.finish_reason)
    if include_usage:
        usage = {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_id,
                "system_fingerprint": None, "choices": [], "usage": usage}
        yield f"data: {json.dumps(body)}\n\n"
    yield "data: [DONE]\n\n"


def serve_api(chat: ChatModel, host: str, port: int, system: str | None, defaults: GenerationOptions,
              model_name: str | None = None, max_batch: int = 8) -> int:
    """Serve the API on host:port until Ctrl-C."""
    import uvicorn

    sock = _bind(host, port)  # bound here, so "port in use" is our one-line error, not uvicorn's exit
    app = build_api(chat, system, defaults, model_name, max_batch)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5,
                            h11_max_incomplete_event_size=64 * 1024)
    server = uvicorn.Server(config)
    shown = f"[{host}]" if ":" in host else host
    print(f"tunelab serve: {model_name or chat.name} at http://{shown}:{port}/v1 (Ctrl-C to stop)", flush=True)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a server is stopped; uvicorn re-raises it once it has shut down
    finally:
        sock.close()
    return 0
