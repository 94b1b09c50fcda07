"""The HTTP side of `tunelab serve` (FastAPI): `GET /v1/models`, `POST /v1/chat/completions` (whole, or streamed as
server-sent events), `GET /health` with the batcher's counters, and OpenAI-style error bodies for everything
that goes wrong. Reading and tokenising a request and generating run off the event loop, so it keeps accepting,
streaming and rejecting requests meanwhile.

`build_api` returns the app unbound (tests use it); server.py binds it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import asdict
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from tunelab.infer.api.batcher import Batcher, Job
from tunelab.infer.api.requests import RequestError, error_body, parse_request, read_json
from tunelab.infer.api.stream import server_sent_events
from tunelab.model.generate import ChatModel, Generated, GenerationOptions, PromptTooLong

MAX_BODY_BYTES = 4 * 1024 * 1024  # far above any prompt that fits a context; stops memory abuse early


def fail(e: RequestError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status)


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


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body is read, so the next message is the end)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def answer_or_gone(request: Request, job: Job) -> Generated | None:
    """The job's answer, or None when the client went away first: then its generation stops at the next token
    (or never starts, if it was still waiting)."""
    answer = asyncio.wrap_future(job.future)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if answer.done():
        return answer.result()
    job.cancel.set()
    answer.cancel()  # a job still waiting is dropped
    return None


def _completion(g: Generated, cid: str, model_id: str) -> dict:
    return {
        "id": cid, "object": "chat.completion", "created": int(time.time()), "model": model_id,
        "system_fingerprint": None,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": g.text, "refusal": None},
                     "logprobs": None, "finish_reason": g.finish_reason}],
        "usage": {"prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens,
                  "total_tokens": g.prompt_tokens + g.completion_tokens},
    }


def _error_handlers(app: FastAPI) -> None:
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


def build_api(chat: ChatModel, system: str | None = None, defaults: GenerationOptions | None = None,
              model_name: str | None = None, max_batch: int = 8) -> Any:
    """The FastAPI app (unbound); its batcher is `app.state.batcher`."""
    defaults = defaults or GenerationOptions()
    model_id = model_name or chat.name
    created = int(time.time())
    app = FastAPI(title=f"tunelab serve: {model_id}", docs_url=None, redoc_url=None, openapi_url=None)
    batcher = app.state.batcher = Batcher(chat, max(1, max_batch))
    _error_handlers(app)
    card = {"id": model_id, "object": "model", "created": created, "owned_by": "tunelab"}

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        if name != model_id:
            return fail(RequestError(f"the model '{name}' does not exist; this server serves '{model_id}'",
                                     param="model", code="model_not_found", status=404, type_="not_found_error"))
        return card

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_id, **asdict(batcher.counters)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = read_json(await read_body(request))
            # Tokenising a long prompt takes a while: off the event loop too.
            req = await run_in_threadpool(parse_request, body, chat, defaults, system)
        except RequestError as e:
            return fail(e)
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        if req.stream:
            return StreamingResponse(server_sent_events(chat, req, cid, int(time.time()), model_id, batcher),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            g = await answer_or_gone(request, batcher.submit(req.prompt, req.opts))
        except PromptTooLong as e:
            return fail(RequestError(str(e), param="messages", code="context_length_exceeded"))
        if g is None:
            return Response(status_code=499)  # nginx's "client closed request": nobody reads it
        return _completion(g, cid, model_id)

    return app
