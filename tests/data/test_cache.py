"""The Arrow cache of prepared rows: a hit loads fast and gives the same rows; any change of data, template,
length or packing misses it."""

import json
import os
import time

from tests.conftest import chat_records, write_jsonl
from tests.data.support import settings
from tunelab.data.dataset import prepare_data


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


def test_a_cache_hit_reports_its_own_load_time(tmp_path, tiny_tokenizer, data_cache):
    p = write_jsonl(tmp_path / "d.jsonl", chat_records(10))
    first = prepare_data(settings(p), tiny_tokenizer)
    stats_file = first.cache_dir / "tunelab_stats.json"
    saved = json.loads(stats_file.read_text())
    stats_file.write_text(json.dumps({**saved, "seconds": 1234.0}))  # as if the first run had been slow
    second = prepare_data(settings(p), tiny_tokenizer)
    assert second.from_cache and 0 < second.stats.seconds < 100


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_second_node_writing_the_same_rows_leaves_the_first_folder_in_place(tmp_path, tiny_tokenizer, data_cache):
    """Several nodes on a shared filesystem each prepare the rows (local rank 0 of every node): the second write
    must not delete files the first node's processes are reading; a folder without stats (a killed write) is
    replaced."""
    from tunelab.data.cache import STATS, save_rows

    p = write_jsonl(tmp_path / "d.jsonl", chat_records(12))
    first = prepare_data(settings(p), tiny_tokenizer)
    folder = first.cache_dir
    before = {f.name: f.stat().st_ino for f in folder.iterdir()}
    save_rows(first.rows, json.loads((folder / STATS).read_text()), folder)  # the other node, moments later
    assert {f.name: f.stat().st_ino for f in folder.iterdir()} == before
    assert not list(folder.parent.glob(folder.name + ".tmp*"))
    (folder / STATS).unlink()  # as a write killed before its stats
    again = prepare_data(settings(p), tiny_tokenizer)
    assert not again.from_cache and (folder / STATS).exists()
    assert not [p.name for p in folder.parent.iterdir() if p != folder]  # nothing left beside it
    assert folder.stat().st_mode & 0o777 == 0o777 & ~_umask()
    assert prepare_data(settings(p), tiny_tokenizer).rows.input_ids.tolist() == first.rows.input_ids.tolist()
