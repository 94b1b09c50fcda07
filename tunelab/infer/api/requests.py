"""A chat completion request -> what the generation core needs: the prompt's token ids (tokenised here, once),
the generation options, and how to answer (streamed or not). Anything wrong is a `RequestError`, which becomes
OpenAI's error body (`{"error": {"message", "type", "param", "code"}}`). The messages are checked by
data/formats, as training records are, except that a request ends with the user's turn."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from tunelab.data.encode import encode_for_generation
from tunelab.data.formats import Conversation, RecordError, openai_messages, prompt_conversation
from tunelab.data.templates import apply_system
from tunelab.errors import TunelabError
from tunelab.model.generate import ChatModel, GenerationOptions

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


@dataclass
class ChatRequest:
    prompt: list[int]  # the conversation rendered with the model's template and tokenised
    opts: GenerationOptions
    stream: bool
    include_usage: bool


def read_json(raw: bytes) -> Any:
    """The request body as JSON, refusing text no tokenizer can encode."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON ({e})", code="invalid_json") from None
    except (RecursionError, ValueError) as e:  # nested too deeply; a number too long to convert
        raise RequestError(f"the request body cannot be read ({type(e).__name__})", code="invalid_json") from None
    _check_encodable(body)
    return body


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


def _flag(value: Any, param: str) -> bool:
    if not isinstance(value, bool):
        raise RequestError(f"'{param}' must be true or false", param=param, code="invalid_type")
    return value


def parse_conversation(messages: Any, default_system: str | None) -> Conversation:
    """OpenAI messages -> the conversation to answer; the server's system prompt unless the request has one."""
    if not isinstance(messages, list):
        raise RequestError("'messages' must be a non-empty list of {role, content} objects", param="messages",
                           code="invalid_type")
    try:
        conv = prompt_conversation(openai_messages(messages, request=True))
    except RecordError as e:
        raise RequestError(str(e), param=e.param or "messages",
                           code="invalid_type" if e.kind == "type" else "invalid_value") from None
    if conv.system == "":  # an empty system message asks for none, not for the server's
        return Conversation(conv.messages[1:])
    return apply_system(conv, default_system)


def _stop_words(stop: Any) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
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
    return [s for s in stops if s]


def _tokenise(conv: Conversation, chat: ChatModel) -> list[int]:
    try:
        ids = encode_for_generation(conv, chat.renderer, chat.tokenizer)
    except TunelabError as e:  # e.g. a chat template that cannot render this conversation
        raise RequestError(str(e), param="messages", code="invalid_value") from None
    if len(ids) >= chat.context_length:
        raise RequestError(f"the prompt is {len(ids)} tokens, which leaves no room in the model's context of "
                           f"{chat.context_length} tokens", param="messages", code="context_length_exceeded")
    return ids


def parse_request(body: Any, chat: ChatModel, defaults: GenerationOptions, system: str | None) -> ChatRequest:
    """A chat completion request's body, checked, with its prompt tokenised (once: generation uses these ids)."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object", code="invalid_type")
    if "messages" not in body:
        raise RequestError("missing required parameter: 'messages'", param="messages",
                           code="missing_required_parameter")
    conv = parse_conversation(body["messages"], system)
    if _number(body, "n", 1, 128, integer=True) not in (None, 1):
        raise RequestError("only n=1 is supported", param="n", code="invalid_value")
    temperature = _number(body, "temperature", 0, 2)
    top_p = _number(body, "top_p", 0, 1)
    if top_p == 0:
        raise RequestError("'top_p' must be greater than 0", param="top_p", code="invalid_value")
    seed = _number(body, "seed", -(2 ** 63), 2 ** 64 - 1, integer=True)
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, key, 1, 10 ** 7, integer=True)
    stops = _stop_words(body.get("stop"))
    stream = _flag(body.get("stream", False), "stream")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise RequestError("'stream_options' must be an object", param="stream_options", code="invalid_type")
    include_usage = _flag(stream_options.get("include_usage", False), "stream_options.include_usage")

    ids = _tokenise(conv, chat)
    room = chat.context_length - len(ids)
    if max_tokens is not None and max_tokens > room:
        raise RequestError(f"the prompt is {len(ids)} tokens; with {key}={max_tokens} it exceeds the model's "
                           f"context of {chat.context_length} tokens", param=key, code="context_length_exceeded")
    # Like OpenAI: without max_tokens the answer may use whatever room the context leaves.
    max_new = min(defaults.max_new_tokens, room) if max_tokens is None else max_tokens
    opts = replace(defaults, max_new_tokens=int(max_new),
                   temperature=defaults.temperature if temperature is None else float(temperature),
                   top_p=defaults.top_p if top_p is None else float(top_p),
                   seed=defaults.seed if seed is None else int(seed),
                   stop_words=[*defaults.stop_words, *stops])
    return ChatRequest(ids, opts, stream, include_usage)
