"""Records of each supported format -> `Conversation` (chat data) or `Document` (plain text for pre-training).

A record that cannot be converted raises `RecordError` with the reason; the loader adds the file and line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

FORMATS = ("openai", "conversation", "alpaca", "sharegpt", "oasst1", "pretrain")
ROLES = ("system", "user", "assistant")


class RecordError(ValueError):
    """A record is malformed; the message is the reason, without location. `param` names the offending key of an
    OpenAI messages list (messages[2].role) and `kind` says whether its type or its value is wrong: the API's
    error bodies carry both."""

    def __init__(self, message: str, param: str | None = None, kind: str = "value"):
        super().__init__(message)
        self.param, self.kind = param, kind


@dataclass
class Message:
    role: str
    content: str
    loss: bool = True  # only meaningful for assistant messages


@dataclass
class Conversation:
    messages: list[Message] = field(default_factory=list)

    @property
    def system(self) -> str | None:
        return self.messages[0].content if self.messages and self.messages[0].role == "system" else None


@dataclass
class Document:
    text: str


Sample = Conversation | Document


def source_format(source: str, first: Any, hint: str) -> str:
    """A source's format, told from its first record (.txt files are always pre-training text)."""
    if source.lower().endswith(".txt"):
        return "pretrain"
    fmt = detect_format(first)
    if fmt is None:
        keys = ", ".join(map(str, first)) if isinstance(first, dict) else type(first).__name__
        raise RecordError(f"cannot tell the data format from this record (keys: {keys}); {hint}")
    return fmt


def detect_format(record: Any) -> str | None:
    """Guess the format from one record's keys; None if nothing fits."""
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "openai"
    if "conversation" in record:
        return "conversation"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "text" in record:
        text = record["text"]
        if isinstance(text, str) and "### Human:" in text and "### Assistant:" in text:
            return "oasst1"
        return "pretrain"
    return None


FORMAT_NAMES = {"openai": "OpenAI 'messages'", "conversation": "XTuner 'conversation'",
                "alpaca": "alpaca 'instruction'/'output'", "sharegpt": "sharegpt 'conversations'",
                "oasst1": "oasst1 '### Human:' text", "pretrain": "plain 'text'"}


def format_mismatch(record: Any, fmt: str, key: str) -> str | None:
    """When a record that failed as `fmt` looks like another format: what it looks like and the config key to
    change (a built-in config pins its format; the user's file may hold another)."""
    found = detect_format(record)
    if found is None or found == fmt:
        return None
    return f"the record looks like {FORMAT_NAMES[found]} data, not {fmt}: set {key}: {found} (or auto)"


def to_sample(record: Any, fmt: str) -> Sample | None:
    """Convert one record; None means "nothing to learn here, drop it quietly" (e.g. alpaca's <nooutput>)."""
    sample = _to_sample(record, fmt)
    if sample is not None:
        _check_unicode(sample)
    return sample


def _check_unicode(sample: Sample) -> None:
    """A JSON escape like \\ud800 decodes to a lone surrogate, which no tokenizer (or UTF-8 file) accepts."""
    texts = [sample.text] if isinstance(sample, Document) else [m.content for m in sample.messages]
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise RecordError(f"text holds a lone surrogate \\u{ord(text[e.start]):04x} (a broken \\u escape), "
                              "which is not valid Unicode") from None


def _to_sample(record: Any, fmt: str) -> Sample | None:
    if not isinstance(record, dict):
        raise RecordError(f"expected a JSON object, got {type(record).__name__}")
    if fmt == "openai":
        return _openai(record)
    if fmt == "conversation":
        return _xtuner_conversation(record)
    if fmt == "alpaca":
        return _alpaca(record)
    if fmt == "sharegpt":
        return _sharegpt(record)
    if fmt == "oasst1":
        return _oasst1(record)
    if fmt == "pretrain":
        text = _field(record, "text", str)
        if not text.strip():
            raise RecordError("empty 'text'")
        return Document(text)
    raise RecordError(f"unknown format '{fmt}' (known: {', '.join(FORMATS)})")


def parse_loss_flag(value: Any) -> bool:
    """`loss` on a message: a bool, or the strings "true"/"false" (any case)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise RecordError(f"'loss' must be true or false, got {value!r}")


def check_conversation(messages: list[Message]) -> Conversation:
    """Enforce: optional leading system message, then user/assistant turns starting with user, ending with
    an assistant reply; no empty assistant reply."""
    start = _check_turns(messages, replies=True)
    if messages[-1].role != "assistant":
        # A trailing question without an answer teaches nothing; drop it rather than fail.
        messages = messages[:-1]
        if len(messages) == start:
            raise RecordError("conversation has no assistant turn")
    return Conversation(messages)


def prompt_conversation(messages: list[Message]) -> Conversation:
    """A conversation to answer (a chat request): the same order as a record's, ending with the user's turn."""
    _check_turns(messages, replies=False)
    if messages[-1].role != "user":
        raise RecordError("the last message must be the user's", "messages")
    return Conversation(messages)


def _check_turns(messages: list[Message], replies: bool) -> int:
    """An optional system message first, then user and assistant turns in turn, the user's first (and, with
    `replies`, no empty assistant reply); returns where the turns start."""
    if not messages:
        raise RecordError("empty conversation", "messages")
    start = 1 if messages[0].role == "system" else 0
    if len(messages) == start:
        raise RecordError("conversation has only a system message", "messages")
    expected = "user"
    for i, m in enumerate(messages[start:], start=start):
        role = f"messages[{i}].role"
        if m.role == "system":
            raise RecordError(f"message {i}: a system message is only allowed first", role)
        if replies and m.role == "assistant" and not m.content.strip():
            raise RecordError(f"message {i}: empty assistant reply", f"messages[{i}].content")
        if m.role != expected:
            if m.role == "assistant":
                raise RecordError(f"message {i}: assistant turn before any user turn" if i == start
                                  else f"message {i}: two assistant turns in a row", role)
            raise RecordError(f"message {i}: two user turns in a row", role)
        expected = "assistant" if expected == "user" else "user"
    return start


def _openai(record: dict) -> Conversation:
    return check_conversation(openai_messages(_field(record, "messages", list)))


def openai_messages(msgs: list, request: bool = False) -> list[Message]:
    """OpenAI message objects -> Messages. A chat request (`request`) may also send the 'developer' role (a
    system message) and content as a list of text parts; a training record's messages may carry `loss`."""
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise RecordError(f"message {i} is not an object", f"messages[{i}]", "type")
        role = "system" if request and m.get("role") == "developer" else m.get("role")
        if role not in ROLES:
            raise RecordError(f"message {i}: unknown role {role!r} (expected system, user or assistant)",
                              f"messages[{i}].role")
        content = _content(m.get("content"), i, request)
        # Arrow-backed data (parquet, save_to_disk, hub) gives every message every key, None where unset.
        loss = parse_loss_flag(m["loss"]) if not request and m.get("loss") is not None else True
        out.append(Message(role, content, loss))
    return out


def _content(content: Any, i: int, parts: bool) -> str:
    """A message's text: a string, or (with `parts`) a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if parts and isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                                   and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    what = "a string or a list of text parts" if parts else "a string"
    raise RecordError(f"message {i}: 'content' must be {what}, got {type(content).__name__}",
                      f"messages[{i}].content", "type")


def _xtuner_conversation(record: dict) -> Conversation:
    turns = _field(record, "conversation", list)
    out: list[Message] = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise RecordError(f"conversation turn {i} is not an object")
        system = t.get("system")
        if system:
            if i > 0:
                raise RecordError(f"conversation turn {i}: 'system' is only allowed in the first turn")
            out.append(Message("system", _str(system, f"turn {i} system")))
        out.append(Message("user", _str(t.get("input") or "", f"turn {i} input")))
        if "output" not in t:
            raise RecordError(f"conversation turn {i} has no 'output'")
        loss = parse_loss_flag(t["output_with_loss"]) if t.get("output_with_loss") is not None else True
        out.append(Message("assistant", _str(t["output"], f"turn {i} output"), loss))
    return check_conversation(out)


def _alpaca(record: dict) -> Conversation | None:
    instruction = _field(record, "instruction", str)
    output = _field(record, "output", str)
    if output.strip() == "<nooutput>":
        return None
    extra = record.get("input") or ""
    if not isinstance(extra, str):
        raise RecordError(f"'input' must be a string, got {type(extra).__name__}")
    user = f"{instruction}\n{extra}" if extra else instruction
    return check_conversation([Message("user", user), Message("assistant", output)])


_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                   "assistant": "assistant", "chatgpt": "assistant", "model": "assistant", "bard": "assistant"}


def _sharegpt(record: dict) -> Conversation:
    turns = _field(record, "conversations", list)
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise RecordError(f"conversations[{i}] is not an object")
        who = t.get("from")
        if not isinstance(who, str) or who not in _SHAREGPT_ROLES:
            raise RecordError(f"conversations[{i}]: unknown speaker {who!r} (expected human, gpt or system)")
        out.append(Message(_SHAREGPT_ROLES[who], _str(t.get("value"), f"conversations[{i}].value")))
    if "system" in record and record["system"] and (not out or out[0].role != "system"):
        out.insert(0, Message("system", _str(record["system"], "system")))
    return check_conversation(out)


_OASST_SPLIT = re.compile(r"###\s*(Human|Assistant):")


def _oasst1(record: dict) -> Conversation:
    text = _field(record, "text", str)
    parts = _OASST_SPLIT.split(text)
    out = []
    for speaker, body in zip(parts[1::2], parts[2::2]):
        out.append(Message("user" if speaker == "Human" else "assistant", body.strip()))
    if not out:
        raise RecordError("no '### Human:' / '### Assistant:' turns in 'text'")
    return check_conversation(out)


def _field(record: dict, key: str, kind: type) -> Any:
    if key not in record:
        raise RecordError(f"missing '{key}' (keys present: {', '.join(map(str, record)) or 'none'})")
    value = record[key]
    if not isinstance(value, kind):
        raise RecordError(f"'{key}' must be a {kind.__name__}, got {type(value).__name__}")
    return value


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise RecordError(f"{what} must be a string, got {type(value).__name__}")
    return value
