"""A streamed answer as server-sent events in OpenAI's chunk format, ending with `data: [DONE]`.

The pieces come from `stream_from_ids`, run in one worker thread that owns the generator (so the model's lock is
taken and released in that thread) once the batcher gives the request its turn, and are handed to the event
loop through a queue. If the client goes away, the worker closes the generator, which stops the model at its
next token.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from typing import Any

from tunelab.infer.api.batcher import Batcher
from tunelab.infer.api.requests import ChatRequest, error_body
from tunelab.model.generate import ChatModel, PromptTooLong, StreamStats, stream_from_ids


async def pieces(chat: ChatModel, req: ChatRequest, stats: StreamStats, batcher: Batcher) -> AsyncIterator[str]:
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
            place.cancel.set()
            place.done.set()
            return
        generator = stream_from_ids(chat, req.prompt, req.opts, stats)
        try:
            for piece in generator:
                if gone.is_set():
                    break
                put(("piece", piece))
            put(("end", None))
        except BaseException as e:  # handed to the async side
            put(("error", e))
        finally:
            generator.close()
            if gone.is_set():
                place.cancel.set()
            place.tokens = stats.completion_tokens
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


async def server_sent_events(chat: ChatModel, req: ChatRequest, cid: str, created: int, model_id: str,
                             batcher: Batcher) -> AsyncIterator[str]:
    def chunk(delta: dict, finish: str | None) -> str:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_id,
                "system_fingerprint": None,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if req.include_usage:
            body["usage"] = None
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    yield chunk({"role": "assistant", "content": ""}, None)
    stats = StreamStats()
    try:
        async for piece in pieces(chat, req, stats, batcher):
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
    yield chunk({}, stats.finish_reason)
    if req.include_usage:
        n_prompt, n_out = len(req.prompt), stats.completion_tokens
        usage = {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_id,
                "system_fingerprint": None, "choices": [], "usage": usage}
        yield f"data: {json.dumps(body)}\n\n"
    yield "data: [DONE]\n\n"
