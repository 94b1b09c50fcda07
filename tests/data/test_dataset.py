"""Assembling a config's data: bad records with file and line, skipping, truncation, pre-training text, the
weighted mix, and `tunelab data prepare`."""

import json

import numpy as np
import pytest

from tests.conftest import chat_records, write_jsonl
from tests.data.support import settings
from tunelab.config.schema import DataSettings
from tunelab.data.dataset import prepare_data
from tunelab.errors import DataError


@pytest.mark.parametrize("line, reason", [
    ('{"messages": [', "malformed JSON"),
    ('{"msgs": []}', "missing 'messages'"),
    ('{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}', "unknown role"),
    ('{"messages": [{"role": "assistant", "content": "y"}]}', "assistant turn before any user turn"),
    ('{"messages": []}', "empty conversation"),
])
def test_bad_record_stops_with_file_line_and_reason(tmp_path, tiny_tokenizer, line, reason):
    p = write_jsonl(tmp_path / "d.jsonl", [*chat_records(2), line, *chat_records(1)])
    with pytest.raises(DataError) as e:
        prepare_data(settings(p, format="openai", cache=False), tiny_tokenizer)
    assert f"{p}:3: " in str(e.value) and reason in str(e.value)
    assert "skip_bad_records" in str(e.value)


def test_skip_bad_records_counts_them(tmp_path, tiny_tokenizer):
    p = write_jsonl(tmp_path / "d.jsonl", [*chat_records(3), '{"messages": [', '{"x": 1}', *chat_records(2)])
    prepared = prepare_data(settings(p, format="openai", cache=False, skip_bad_records=True), tiny_tokenizer)
    assert prepared.stats.samples == 5
    assert prepared.stats.bad == 2
    assert [b.where for b in prepared.stats.bad_records] == [f"{p}:4", f"{p}:5"]


def test_missing_file_empty_dataset_and_unknown_format(tmp_path, tiny_tokenizer):
    with pytest.raises(DataError, match="data file not found"):
        prepare_data(settings(tmp_path / "nope.jsonl", cache=False), tiny_tokenizer)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no training samples"):
        prepare_data(settings(empty, cache=False), tiny_tokenizer)
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "reply": "a"}])
    with pytest.raises(DataError, match=r"odd\.jsonl:1: cannot tell the data format.*keys: question, reply"):
        prepare_data(settings(odd, cache=False), tiny_tokenizer)


def test_long_samples_are_truncated_and_counted(tmp_path, tiny_tokenizer):
    long = {"messages": [{"role": "user", "content": "hello " * 5},
                         {"role": "assistant", "content": "world " * 80}]}
    p = write_jsonl(tmp_path / "d.jsonl", [long, *chat_records(2)])
    prepared = prepare_data(settings(p, cache=False, max_length=32), tiny_tokenizer)
    assert prepared.stats.truncated == 1
    assert max(prepared.rows.seq_lens) <= 32


def test_pretraining_text_is_joined_with_eos_and_fully_trained(tmp_path, tiny_tokenizer):
    (tmp_path / "book.txt").write_text("The quick brown fox.\n\nHello world.\n")
    prepared = prepare_data(settings(tmp_path / "book.txt", cache=False, text_documents="paragraph"),
                            tiny_tokenizer)
    assert prepared.stats.samples == 2
    ids = prepared.rows.input_ids.tolist()
    assert ids.count(tiny_tokenizer.eos_token_id) == 2
    # every token but the last of each document is a target (nothing is masked in pre-training)
    assert prepared.stats.loss_tokens == prepared.stats.tokens - 2


def test_weighted_mix_follows_the_weights(tmp_path, tiny_tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", chat_records(10))
    b = write_jsonl(tmp_path / "b.jsonl", [{"messages": [{"role": "user", "content": "1"},
                                                          {"role": "assistant", "content": "2"}]}] * 10)
    data = DataSettings(datasets=[{"path": str(a), "weight": 3.0}, {"path": str(b), "weight": 1.0}],
                        mix="weighted", cache=False, max_length=64, pack_to_max_length=False)
    prepared = prepare_data(data, tiny_tokenizer, seed=1)
    assert prepared.stats.rows == 20
    one = tiny_tokenizer.encode("1", add_special_tokens=False)[0]
    from_b = sum(1 for i in range(len(prepared.rows)) if one in prepared.rows.row(i)[0].tolist())
    assert from_b == 5  # 1/4 of 20


def test_data_prepare_command_reports_rows_tokens_and_speed(tmp_path, tiny_model_dir):
    from tests.conftest import run_cli, tiny_config

    data = write_jsonl(tmp_path / "d.jsonl", chat_records(30))
    cfg = tiny_config(tmp_path, tiny_model_dir, data, data={"cache": True})
    env = {"TUNELAB_CACHE": str(tmp_path / "cache")}
    first = run_cli("data", "prepare", str(cfg), env=env)
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout.strip().splitlines()[-1])
    assert report["samples"] == 30 and report["tokens"] > 0 and report["rows"] > 0
    assert report["seconds"] > 0 and report["tokens_per_s"] > 0 and report["from_cache"] is False
    second = json.loads(run_cli("data", "prepare", str(cfg), env=env).stdout.strip().splitlines()[-1])
    assert second["from_cache"] is True and second["rows"] == report["rows"]


def test_a_chat_template_error_is_a_bad_record_with_its_line(tmp_path, tiny_tokenizer):
    tiny_tokenizer.chat_template = ("{% if messages[0]['role'] == 'system' %}"
                                    "{{ raise_exception('System role not supported') }}{% endif %}"
                                    + tiny_tokenizer.chat_template)
    system = {"messages": [{"role": "system", "content": "S"}, *chat_records(1)[0]["messages"]]}
    p = write_jsonl(tmp_path / "d.jsonl", [*chat_records(1), system, *chat_records(1)])
    with pytest.raises(DataError, match=r"d\.jsonl:2: chat template: System role not supported \(set data\."):
        prepare_data(settings(p, cache=False), tiny_tokenizer)
    prepared = prepare_data(settings(p, cache=False, skip_bad_records=True), tiny_tokenizer)
    assert prepared.stats.samples == 2 and prepared.stats.bad == 1
    assert prepared.stats.bad_records[0].where == f"{p}:2"


def test_pretraining_text_needs_no_chat_template(tmp_path, tiny_tokenizer):
    tiny_tokenizer.chat_template = None  # a base model's tokenizer
    (tmp_path / "book.txt").write_text("The quick brown fox.\n\nHello world.\n")
    prepared = prepare_data(settings(tmp_path / "book.txt", cache=False, text_documents="paragraph"),
                            tiny_tokenizer)
    assert prepared.stats.samples == 2
    # chat data still needs one, and says so
    p = write_jsonl(tmp_path / "d.jsonl", chat_records(1))
    with pytest.raises(DataError, match="needs a tokenizer with a chat template"):
        prepare_data(settings(p, cache=False), tiny_tokenizer)


def test_unreadable_files_are_bad_records_when_skipping(tmp_path, tiny_tokenizer):
    good = json.dumps(chat_records(1)[0])
    (tmp_path / "a.json").write_bytes(f"[\n{good},\n".encode() + b'{"text": "\xff"}\n]')
    (tmp_path / "b.json").write_text(f"[\n{good},\n" + '{"messages": [}\n]')
    (tmp_path / "c.txt").write_bytes(b"fine\n\n\xff bad\n")
    write_jsonl(tmp_path / "d.jsonl", chat_records(2))
    with pytest.raises(DataError, match=r"a\.json:3: not UTF-8 \(byte 0xff\)"):
        prepare_data(settings(tmp_path, cache=False), tiny_tokenizer)
    prepared = prepare_data(settings(tmp_path, cache=False, skip_bad_records=True), tiny_tokenizer)
    s = prepared.stats
    # b.json's first record was read before the break; a.json and c.txt fail at decoding, before any record
    assert s.samples == 3 and s.bad == 3
    assert [(b.where, b.reason.split(" (")[0]) for b in s.bad_records] == [
        (f"{tmp_path / 'a.json'}:3", "not UTF-8"), (f"{tmp_path / 'b.json'}:3", "malformed JSON"),
        (f"{tmp_path / 'c.txt'}:3", "not UTF-8")]


def test_a_document_one_token_over_max_length_trains_every_token(tmp_path, tiny_tokenizer):
    words = ("one two three four five six seven eight nine ten " * 10).split()
    text = next(t for t in (" ".join(words[:k]) for k in range(1, 100))
                if len(tiny_tokenizer(t)["input_ids"]) + 1 == 17)  # + EOS: max_length + 1 tokens
    (tmp_path / "doc.txt").write_text(text)
    prepared = prepare_data(settings(tmp_path / "doc.txt", cache=False, max_length=16), tiny_tokenizer)
    s = prepared.stats
    assert s.samples == 2 and s.dropped == 0
    assert s.loss_tokens == 16  # every token after the first, EOS included, is a target exactly once
    labels = prepared.rows.labels
    assert labels.tolist().count(tiny_tokenizer.eos_token_id) == 1


def test_split_document_overlaps_by_one_token():
    from tunelab.data.encode import Encoded, split_document

    ids = np.arange(10, dtype=np.int32)
    pieces = split_document(Encoded(ids, np.ones(10, dtype=bool)), 4)
    assert [p.input_ids.tolist() for p in pieces] == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    assert [p.input_ids.tolist() for p in split_document(Encoded(ids[:5], np.ones(5, dtype=bool)), 4)] == \
        [[0, 1, 2, 3], [3, 4]]
    assert len(split_document(Encoded(ids[:4], np.ones(4, dtype=bool)), 4)) == 1


def test_the_truncation_warning_names_the_first_locations(tmp_path, tiny_tokenizer, monkeypatch, data_cache):
    from collections import Counter

    from tunelab import ui

    long = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world " * 80}]}
    p = write_jsonl(tmp_path / "d.jsonl", [*chat_records(1), long, long, *chat_records(1), long, long])
    warned = []
    monkeypatch.setattr(ui, "warning_counts", Counter())
    monkeypatch.setattr(ui, "_warning_sinks", [lambda key, msg: warned.append((key, msg))])
    prepared = prepare_data(settings(p, max_length=32), tiny_tokenizer)
    assert prepared.stats.truncated == 4
    assert ("truncated", f"4 samples were longer than max_length=32 and were truncated (first: {p}:2, {p}:3, "
                         f"{p}:5, ...)") in warned
    cached = prepare_data(settings(p, max_length=32), tiny_tokenizer)  # the locations survive the cache
    assert cached.from_cache and cached.stats.truncated_at == [f"{p}:2", f"{p}:3", f"{p}:5"]
