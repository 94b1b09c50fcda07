"""Loading every file kind, bad records with file and line, skipping, truncation, and the Arrow cache."""

import json
import time

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
