"""Every record format becomes the same Conversation; malformed records raise RecordError with the reason."""

import pytest

from tunelab.data.convert import to_conversation_record, to_openai_record
from tunelab.data.formats import Conversation, Document, RecordError, detect_format, to_sample


def roles(conv: Conversation) -> list[str]:
    return [m.role for m in conv.messages]


def test_openai_multi_turn_with_system_and_loss_flags():
    rec = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "q1"},
                        {"role": "assistant", "content": "a1", "loss": False},
                        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2", "loss": "True"}]}
    conv = to_sample(rec, "openai")
    assert roles(conv) == ["system", "user", "assistant", "user", "assistant"]
    assert [m.loss for m in conv.messages if m.role == "assistant"] == [False, True]
    assert conv.system == "S"


def test_xtuner_conversation_format():
    rec = {"conversation": [{"system": "S", "input": "q1", "output": "a1"}, {"input": "q2", "output": "a2"}]}
    conv = to_sample(rec, "conversation")
    assert [m.content for m in conv.messages] == ["S", "q1", "a1", "q2", "a2"]


def test_alpaca_joins_instruction_and_input_and_drops_nooutput():
    conv = to_sample({"instruction": "Translate", "input": "hello", "output": "bonjour"}, "alpaca")
    assert conv.messages[0].content == "Translate\nhello"
    assert to_sample({"instruction": "Translate", "input": "", "output": "x"}, "alpaca").messages[0].content == \
        "Translate"
    assert to_sample({"instruction": "x", "input": "", "output": "<nooutput>"}, "alpaca") is None


def test_sharegpt_and_oasst1():
    conv = to_sample({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
                     "sharegpt")
    assert roles(conv) == ["user", "assistant"]
    conv = to_sample({"text": "### Human: What? ### Assistant: This. ### Human: And? ### Assistant: That."}, "oasst1")
    assert [m.content for m in conv.messages] == ["What?", "This.", "And?", "That."]


def test_pretrain_text_is_a_document():
    assert to_sample({"text": "plain text"}, "pretrain") == Document("plain text")


@pytest.mark.parametrize("record, fmt", [
    ({"messages": []}, "openai"), ({"conversation": []}, "conversation"),
    ({"conversations": []}, "sharegpt"), ({"instruction": "a", "output": "b"}, "alpaca"),
    ({"text": "### Human: a ### Assistant: b"}, "oasst1"), ({"text": "abc"}, "pretrain"), ({"x": 1}, None),
])
def test_format_detection(record, fmt):
    assert detect_format(record) == fmt


@pytest.mark.parametrize("record, reason", [
    ({"messages": []}, "empty conversation"),
    ({"msgs": []}, "missing 'messages'"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "unknown role 'bot'"),
    ({"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]},
     "assistant turn before any user turn"),
    ({"messages": [{"role": "user", "content": "q"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]}, "must be a string"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "loss": "maybe"}]},
     "'loss' must be true or false"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"},
                   {"role": "assistant", "content": "a"}]}, "two user turns in a row"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                   {"role": "system", "content": "s"}]}, "only allowed first"),
    (["not", "an", "object"], "expected a JSON object"),
])
def test_bad_records_name_the_reason(record, reason):
    with pytest.raises(RecordError, match=reason):
        to_sample(record, "openai")


def test_trailing_user_turn_is_dropped_not_fatal():
    conv = to_sample({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                                   {"role": "user", "content": "unanswered"}]}, "openai")
    assert roles(conv) == ["user", "assistant"]


def test_records_round_trip_between_openai_and_conversation():
    rec = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "q"},
                        {"role": "assistant", "content": "a", "loss": False}]}
    conv = to_sample(rec, "openai")
    assert to_openai_record(conv) == rec
    xt = to_conversation_record(conv)
    assert xt == {"conversation": [{"system": "S", "input": "q", "output": "a", "output_with_loss": False}]}
    assert to_sample(xt, "conversation") == conv


def test_a_loss_flag_of_none_means_unset():
    """Arrow-backed data (parquet, save_to_disk, hub) fills a key missing from some messages with None."""
    conv = to_sample({"messages": [{"role": "user", "content": "q", "loss": None},
                                   {"role": "assistant", "content": "a", "loss": None}]}, "openai")
    assert conv.messages[1].loss is True
    conv = to_sample({"conversation": [{"system": None, "input": "q", "output": "a", "output_with_loss": None}]},
                     "conversation")
    assert [(m.role, m.loss) for m in conv.messages] == [("user", True), ("assistant", True)]
