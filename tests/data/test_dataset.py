"""Loading every file kind, bad records with file and line, skipping, truncation, and the Arrow cache."""

import json
import time

import numpy as np
import pytest

from tests.conftest import chat_records, write_jsonl
from tunelab.config.schema import DataSettings
from tunelab.data.dataset import DataStats, prepare_data, read_samples
from tunelab.errors import DataError


def settings(path, **kw) -> DataSettings:
    return DataSettings(path=str(path), max_length=kw.pop("max_length", 64), **kw)


def test_jsonl_json_csv_parquet_and_folder_give_the_same_samples(tmp_path, tiny_tokenizer):
    import datasets

    recs = chat_records(6)
    write_jsonl(tmp_path / "a.jsonl", recs)
    (tmp_path / "b.json").write_text(json.dumps(recs, ensure_ascii=False, indent=2))
    flat = [{"instruction": r["messages"][0]["content"], "input": "", "output": r["messages"][1]["content"]}
            for r in recs]
    datasets.Dataset.from_list(flat).to_parquet(str(tmp_path / "c.parquet"))
    datasets.Dataset.from_list(flat).to_csv(str(tmp_path / "d.csv"), index=False)
    results = {}
    for name in ("a.jsonl", "b.json", "c.parquet", "d.csv"):
        prepared = prepare_data(settings(tmp_path / name, cache=False), tiny_tokenizer)
        results[name] = prepared.rows.input_ids.tolist()
        assert prepared.stats.samples == 6
    assert results["a.jsonl"] == results["b.json"] == results["c.parquet"] == results["d.csv"]
    folder = prepare_data(settings(tmp_path, cache=False), tiny_tokenizer)
    assert folder.stats.samples == 24


def test_json_array_records_keep_their_line_numbers(tmp_path):
    (tmp_path / "d.json").write_text('[\n  {"messages": [{"role": "user", "content": "q"}, '
                                     '{"role": "assistant", "content": "a"}]},\n  {"messages": []}\n]\n')
    with pytest.raises(DataError, match=r"d\.json:3: empty conversation"):
        read_samples(settings(tmp_path / "d.json").specs()[0], DataStats(), skip_bad=False)


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


def test_non_utf8_bytes_are_reported_with_line(tmp_path, tiny_tokenizer):
    p = tmp_path / "d.jsonl"
    write_jsonl(p, chat_records(2))
    with open(p, "ab") as f:
        f.write(b'{"messages": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:3: not UTF-8 \(byte 0xff"):
        prepare_data(settings(p, format="openai", cache=False), tiny_tokenizer)


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


def test_cache_hits_fast_and_misses_on_any_change(tmp_path, tiny_tokenizer, data_cache):
    p = write_jsonl(tmp_path / "d.jsonl", chat_records(40))
    first = prepare_data(settings(p), tiny_tokenizer)
    assert not first.from_cache
    t = time.perf_counter()
    second = prepare_data(settings(p), tiny_tokenizer)
    assert second.from_cache and time.perf_counter() - t < 1.0
    assert second.rows.input_ids.tolist() == first.rows.input_ids.tolist()
    assert second.rows.labels.tolist() == first.rows.labels.tolist()
    assert prepare_data(settings(p, max_length=48), tiny_tokenizer).from_cache is False
    assert prepare_data(settings(p, pack_to_max_length=False), tiny_tokenizer).from_cache is False
    assert prepare_data(settings(p, prompt_template="internlm2_chat"), tiny_tokenizer).from_cache is False
    with open(p, "a") as f:
        f.write(json.dumps(chat_records(1)[0]) + "\n")
    assert prepare_data(settings(p), tiny_tokenizer).from_cache is False


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


def test_save_to_disk_folder_and_offline_hub_id(tmp_path, tiny_tokenizer):
    import datasets

    datasets.Dataset.from_list(chat_records(5)).save_to_disk(str(tmp_path / "saved"))
    prepared = prepare_data(settings(tmp_path / "saved", cache=False), tiny_tokenizer)
    assert prepared.stats.samples == 5
    with pytest.raises(DataError, match=r"cannot load dataset 'nobody-here/no-such-dataset'.*network"):
        prepare_data(DataSettings(path="nobody-here/no-such-dataset", cache=False), tiny_tokenizer)


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


def read(path, **kw):
    """(samples, locations, stats) of one file through the training reader."""
    stats = DataStats()
    samples, wheres = read_samples(settings(path, **kw).specs()[0], stats, kw.get("skip_bad_records", False))
    return samples, wheres, stats


def test_a_utf8_bom_before_the_first_jsonl_line_is_not_data(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in chat_records(2)).encode())
    samples, wheres, _ = read(p)
    assert len(samples) == 2 and wheres == [f"{p}:1", f"{p}:2"]


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


def test_arrow_data_with_unset_loss_flags_trains_those_replies(tmp_path):
    import datasets

    recs = [{"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1", "loss": False},
                          {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]},
            {"conversation": [{"input": "q", "output": "a", "output_with_loss": False}, {"input": "q", "output": "b"}]}]
    # Arrow gives every message the keys of all of them: the unset ones come back as None
    datasets.Dataset.from_list(recs[:1]).to_parquet(str(tmp_path / "m.parquet"))
    datasets.Dataset.from_list(recs[1:]).save_to_disk(str(tmp_path / "saved"))
    samples, _, _ = read(tmp_path / "m.parquet")
    assert [m.loss for m in samples[0].messages if m.role == "assistant"] == [False, True]
    samples, _, _ = read(tmp_path / "saved")
    assert [m.loss for m in samples[0].messages if m.role == "assistant"] == [False, True]


def test_csv_cells_stay_text_and_records_keep_their_first_line(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text('instruction,input,output\n"What is 2+2?\nShow your work.",,4\n\nWhat is 3+3?,,6\n'
                 'Say nothing,,\n"two\nlines",x,"ok\nok"\n{"a": 1},,7\n')
    samples, wheres, stats = read(p, skip_bad_records=True)
    # an all-numbers answer column is text, not int; an empty cell is "", not None
    assert [s.messages[-1].content for s in samples] == ["4", "6", "ok\nok", "7"]
    assert samples[0].messages[0].content == "What is 2+2?\nShow your work."
    assert samples[2].messages[0].content == "two\nlines\nx"
    assert wheres == [f"{p}:2", f"{p}:5", f"{p}:7", f"{p}:10"]
    assert [(b.where, b.reason) for b in stats.bad_records] == [(f"{p}:6", "message 1: empty assistant reply")]


def test_csv_json_columns_and_bad_rows(tmp_path):
    p = tmp_path / "d.csv"
    good = json.dumps(chat_records(1)[0]["messages"]).replace('"', '""')
    p.write_bytes(("\ufeffmessages\n" + f'"{good}"\n' + '"[not json"\n' + f'"{good}",extra\n').encode())
    samples, wheres, stats = read(p, skip_bad_records=True)
    assert wheres == [f"{p}:2"] and samples[0].messages[1].content == "I am a helpful assistant."
    assert [b.where for b in stats.bad_records] == [f"{p}:3", f"{p}:4"]
    assert "column 'messages' is not valid JSON" in stats.bad_records[0].reason
    assert "2 cells, but the header has 1 columns" in stats.bad_records[1].reason
    (tmp_path / "bad.csv").write_bytes(b"instruction,output\nq,\xff\n")
    with pytest.raises(DataError, match=r"bad\.csv:2: not UTF-8 \(byte 0xff\)"):
        read(tmp_path / "bad.csv")


@pytest.mark.parametrize("after", ['\n[{"messages": []}]\n', " garbage here", "\n\n,"])
def test_data_after_a_json_array_is_an_error(tmp_path, after):
    p = tmp_path / "d.json"
    p.write_text(json.dumps(chat_records(1)) + after)
    line = 1 + after[:len(after) - len(after.lstrip())].count("\n")
    with pytest.raises(DataError, match=rf"d\.json:{line}: unexpected data after the JSON array"):
        read(p)
    p.write_text(json.dumps(chat_records(1)) + "\n \n")  # whitespace after it is fine
    assert len(read(p)[0]) == 1


def test_single_json_object_is_located_where_it_starts_and_txt_paragraphs_drop_cr(tmp_path):
    p = tmp_path / "d.json"
    p.write_text("\n\n" + json.dumps({"messages": []}))
    with pytest.raises(DataError, match=r"d\.json:3: empty conversation"):
        read(p)
    (tmp_path / "b.txt").write_bytes(b"para one\r\nline two\r\n\r\npara two\r\n")
    samples, wheres, _ = read(tmp_path / "b.txt", text_documents="paragraph")
    assert [s.text for s in samples] == ["para one\nline two", "para two"]
    assert wheres == [f"{tmp_path / 'b.txt'}:1", f"{tmp_path / 'b.txt'}:4"]


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


def test_a_cache_hit_reports_its_own_load_time(tmp_path, tiny_tokenizer, data_cache):
    p = write_jsonl(tmp_path / "d.jsonl", chat_records(10))
    first = prepare_data(settings(p), tiny_tokenizer)
    stats_file = first.cache_dir / "tunelab_stats.json"
    saved = json.loads(stats_file.read_text())
    stats_file.write_text(json.dumps({**saved, "seconds": 1234.0}))  # as if the first run had been slow
    second = prepare_data(settings(p), tiny_tokenizer)
    assert second.from_cache and 0 < second.stats.seconds < 100


def test_hidden_files_and_folders_are_not_data(tmp_path, tiny_tokenizer):
    from tunelab.data.dataset import list_sources, source_fingerprint

    write_jsonl(tmp_path / "d.jsonl", chat_records(3))
    write_jsonl(tmp_path / ".ipynb_checkpoints" / "d-checkpoint.jsonl", ['{"messages": ['])
    write_jsonl(tmp_path / ".scratch.jsonl", ['{"messages": ['])
    assert list_sources(str(tmp_path)) == [str(tmp_path / "d.jsonl")]
    assert prepare_data(settings(tmp_path, cache=False), tiny_tokenizer).stats.samples == 3
    before = source_fingerprint(str(tmp_path))
    write_jsonl(tmp_path / ".ipynb_checkpoints" / "d-checkpoint.jsonl", chat_records(1))
    assert source_fingerprint(str(tmp_path)) == before


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
