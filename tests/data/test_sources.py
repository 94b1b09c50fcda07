"""Reading every kind of source with each record's location: jsonl, json arrays (element by element), csv (first
physical line of a record), parquet, txt, folders (hidden files left out), save_to_disk folders and hub ids."""

import json

import pytest

from tests.conftest import chat_records, write_jsonl
from tests.data.support import read, settings
from tunelab.config.schema import DataSettings
from tunelab.data.dataset import prepare_data
from tunelab.errors import DataError


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
        read(tmp_path / "d.json")


def test_non_utf8_bytes_are_reported_with_line(tmp_path, tiny_tokenizer):
    p = tmp_path / "d.jsonl"
    write_jsonl(p, chat_records(2))
    with open(p, "ab") as f:
        f.write(b'{"messages": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:3: not UTF-8 \(byte 0xff"):
        prepare_data(settings(p, format="openai", cache=False), tiny_tokenizer)


def test_save_to_disk_folder_and_offline_hub_id(tmp_path, tiny_tokenizer):
    import datasets

    datasets.Dataset.from_list(chat_records(5)).save_to_disk(str(tmp_path / "saved"))
    prepared = prepare_data(settings(tmp_path / "saved", cache=False), tiny_tokenizer)
    assert prepared.stats.samples == 5
    with pytest.raises(DataError, match=r"cannot load dataset 'nobody-here/no-such-dataset'.*network"):
        prepare_data(DataSettings(path="nobody-here/no-such-dataset", cache=False), tiny_tokenizer)


def test_a_utf8_bom_before_the_first_jsonl_line_is_not_data(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in chat_records(2)).encode())
    samples, wheres, _ = read(p)
    assert len(samples) == 2 and wheres == [f"{p}:1", f"{p}:2"]


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


def test_hidden_files_and_folders_are_not_data(tmp_path, tiny_tokenizer):
    from tunelab.data.cache import source_fingerprint
    from tunelab.data.sources import list_sources

    write_jsonl(tmp_path / "d.jsonl", chat_records(3))
    write_jsonl(tmp_path / ".ipynb_checkpoints" / "d-checkpoint.jsonl", ['{"messages": ['])
    write_jsonl(tmp_path / ".scratch.jsonl", ['{"messages": ['])
    assert list_sources(str(tmp_path)) == [str(tmp_path / "d.jsonl")]
    assert prepare_data(settings(tmp_path, cache=False), tiny_tokenizer).stats.samples == 3
    before = source_fingerprint(str(tmp_path))
    write_jsonl(tmp_path / ".ipynb_checkpoints" / "d-checkpoint.jsonl", chat_records(1))
    assert source_fingerprint(str(tmp_path)) == before
