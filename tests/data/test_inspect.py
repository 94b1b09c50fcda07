"""check-dataset and log-dataset: bad records reported with file:line and reason, counts, the length histogram,
exit codes, and samples printed with their no-loss spans marked and their packed rows shown."""

import io
import json
import re

import numpy as np
import pytest

from tests.conftest import chat_records, run_cli, tiny_config, write_jsonl
from tunelab import ui
from tunelab.config.load import load_config
from tunelab.data.dataset import DataStats, prepare_data
from tunelab.data.inspect import NO_LOSS_CLOSE, NO_LOSS_OPEN, check_dataset, log_dataset

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LONG = {"messages": [{"role": "user", "content": "hello " * 5}, {"role": "assistant", "content": "world " * 80}]}
BAD_LINES = {  # line in the file -> (the line, the start of the reason check-dataset must print)
    3: ('{"messages": [', "malformed JSON (Expecting value"),
    4: ('{"msgs": []}', "missing 'messages' (keys present: msgs)"),
    5: ('{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}',
        "message 0: unknown role 'robot' (expected system, user or assistant)"),
    6: ('{"messages": [{"role": "assistant", "content": "y"}, {"role": "user", "content": "q"}]}',
        "message 0: assistant turn before any user turn"),
    7: ('{"messages": []}', "empty conversation"),
    8: (None, "not UTF-8 (byte 0xff at column 15)"),  # written as raw bytes below
}


def mixed_file(path):
    """2 good records, the 6 bad lines above (lines 3-8), then a too-long record and 3 more good ones."""
    write_jsonl(path, [*chat_records(2), *(BAD_LINES[n][0] for n in range(3, 8))])
    with open(path, "ab") as f:
        f.write(b'{"messages": "\xff\xfe"}\n')
        for rec in [LONG, *chat_records(3)]:
            f.write((json.dumps(rec, ensure_ascii=False) + "\n").encode())
    return path


def good_sample_lengths(tokenizer, path, max_length=64):
    """Lengths and stats of the good samples, through the training loader (skipping the bad ones)."""
    prepared = prepare_data(load_config(path).data.model_copy(update={"skip_bad_records": True,
                                                                     "pack_to_max_length": False}), tokenizer)
    return prepared.rows.seq_lens, prepared.stats


def test_check_dataset_reports_every_bad_record_and_the_counts(tmp_path, tiny_model_dir, tiny_tokenizer):
    data = mixed_file(tmp_path / "d.jsonl")
    cfg = tiny_config(tmp_path, tiny_model_dir, data)
    png = tmp_path / "plots" / "lengths.png"
    res = run_cli("check-dataset", str(cfg), "--hist", str(png), cwd=tmp_path)
    out = res.stdout
    assert res.returncode == 1, res.stdout + res.stderr
    for n, (_, reason) in BAD_LINES.items():
        assert f"  {data}:{n}: {reason}" in out
    reported = re.findall(rf"^  {re.escape(str(data))}:(\d+): ", out, re.M)
    assert reported == ["3", "4", "5", "6", "7", "8"]  # once each, in file order, good lines not listed

    lengths, stats = good_sample_lengths(tiny_tokenizer, cfg)
    assert "records: 12\n" in out
    assert "samples: 6\n" in out
    assert "bad records: 6\n" in out
    assert "dropped: 0 " in out
    assert "truncated: 1 (longer than max_length=64)\n" in out
    assert f"tokens: {stats.tokens:,} ({stats.loss_share:.1%} in the loss, {stats.loss_tokens:,} tokens)" in out
    assert (f"sample length: min {lengths.min()}, median {np.median(lengths):g}, "
            f"p95 {np.percentile(lengths, 95):g}, max 64\n") in out
    assert "FAILED: 6 bad records" in out

    blob = png.read_bytes()
    assert blob.startswith(PNG_SIGNATURE) and len(blob) > 1000
    from matplotlib.image import imread

    assert imread(str(png)).shape[:2] == (450, 800)  # 8 x 4.5 inches at 100 dpi


def test_all_good_file_passes_under_the_alias_and_saves_the_default_plot(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", chat_records(8))
    cfg = tiny_config(tmp_path, tiny_model_dir, data)
    res = run_cli("check-custom-dataset", str(cfg), cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "records: 8\nsamples: 8\nbad records: 0\n" in res.stdout
    assert "OK: every record is usable" in res.stdout
    assert "bad records (" not in res.stdout
    assert (tmp_path / "tiny_lengths.png").read_bytes().startswith(PNG_SIGNATURE)


def test_log_dataset_marks_the_prompt_not_the_answer_and_shows_rows(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", chat_records(3))
    cfg = tiny_config(tmp_path, tiny_model_dir, data, data={"max_length": 64})
    res = run_cli("log-dataset", str(cfg), "-n", "3", cwd=tmp_path)
    out = res.stdout
    assert res.returncode == 0, res.stdout + res.stderr
    # stdout is a pipe here: the explicit textual marker, not colours
    assert "\x1b[" not in out
    expected = (f"{NO_LOSS_OPEN}<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n{NO_LOSS_CLOSE}"
                f"I am a helpful assistant.<|im_end|>{NO_LOSS_OPEN}\n{NO_LOSS_CLOSE}")
    assert expected in out
    assert f"{NO_LOSS_OPEN}Paris" not in out and "Paris is the capital.<|im_end|>" in out
    assert out.count("--- sample ") == 3
    assert f"--- sample 2: {data}:2, " in out

    # rows: which samples share a row, their lengths, positions restarting at 0 for each sample
    rows = re.findall(r"^row (\d+): (\d+) sample\(s\), (\d+)/64 tokens, lengths ([\d + ]+)$", out, re.M)
    members = re.findall(r"^  tokens (\d+)-(\d+): sample (\d) \(.*?:(\d)\), (\d+) tokens, positions (\d+)\.\.(\d+), "
                         r"last label (-?\d+) \| ", out, re.M)
    assert rows and sum(int(r[1]) for r in rows) == 3
    assert sorted(m[2] for m in members) == ["1", "2", "3"]
    assert any(int(r[1]) > 1 for r in rows)  # 3 short samples into rows of 64: at least two share one
    i = 0
    for _, count, total, lens in rows:
        start = 0
        for m in members[i:i + int(count)]:
            first, last, _, _, length, p0, p1, last_label = m
            assert (int(first), int(last)) == (start, start + int(length) - 1)
            assert (int(p0), int(p1)) == (0, int(length) - 1)
            assert last_label == "-100"  # no sample is trained to predict the next one's first token
            start += int(length)
        assert start == int(total) == sum(int(x) for x in lens.split(" + "))
        i += int(count)


def test_log_dataset_on_a_terminal_dims_the_prompt(tmp_path, tiny_model_dir, tiny_tokenizer, monkeypatch):
    from rich.console import Console

    buf = io.StringIO()
    monkeypatch.setattr(ui, "console", Console(file=buf, force_terminal=True, color_system="standard",
                                               highlight=False, soft_wrap=True))
    cfg = load_config(tiny_config(tmp_path, tiny_model_dir, write_jsonl(tmp_path / "d.jsonl", chat_records(1))))
    assert log_dataset(cfg, tiny_tokenizer, 1) == 0
    out = buf.getvalue()
    assert NO_LOSS_OPEN not in out
    # rich re-opens the style after each newline, so each line of a span starts with its code
    assert "\x1b[2m<|im_start|>user\x1b[0m\n\x1b[2mWho are you?" in out  # the prompt is dim
    assert "\x1b[1mI am a helpful assistant.<|im_end|>\x1b[0m" in out  # the answer is bold


def test_more_than_fifty_bad_records_lists_fifty_and_the_count(tmp_path, tiny_model_dir, tiny_tokenizer, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [*chat_records(2), *(['{"messages": []}'] * 60)])
    cfg = load_config(tiny_config(tmp_path, tiny_model_dir, data))
    assert check_dataset(cfg, tiny_tokenizer, tmp_path / "h.png") == 1
    out = capsys.readouterr().out
    listed = re.findall(rf"^  {re.escape(str(data))}:(\d+): empty conversation$", out, re.M)
    assert listed == [str(n) for n in range(3, 53)]
    assert "  ... and 10 more (60 bad records in all)\n" in out
    assert "bad records: 60\n" in out


def test_every_dataset_of_the_config_is_checked(tmp_path, tiny_model_dir, tiny_tokenizer, capsys):
    a = write_jsonl(tmp_path / "a.jsonl", chat_records(3))
    b = write_jsonl(tmp_path / "b.jsonl", [{"instruction": "Say hi", "output": "hi"},
                                           {"instruction": "Say hi"}, {"instruction": "x", "output": "y"}])
    datasets = [{"path": str(a), "max_samples": 1},
                {"path": str(b), "format": "alpaca", "prompt_template": "internlm2_chat"}]
    cfg = load_config(tiny_config(tmp_path, tiny_model_dir, a, data={"path": None, "datasets": datasets}))
    assert check_dataset(cfg, tiny_tokenizer, tmp_path / "h.png") == 1
    out = capsys.readouterr().out
    assert f"  {b}:2: missing 'output' (keys present: instruction)\n" in out
    assert f"dataset: {a} (format openai)" in out and f"dataset: {b} (format alpaca)" in out
    # max_samples limits training, not the check: every record is read
    assert "note: max_samples is ignored" in out
    assert "records: 6\nsamples: 5\nbad records: 1\n" in out


def test_no_samples_at_all_fails(tmp_path, tiny_model_dir, tiny_tokenizer, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "x", "input": "", "output": "<nooutput>"}] * 2)
    cfg = load_config(tiny_config(tmp_path, tiny_model_dir, data))
    assert check_dataset(cfg, tiny_tokenizer, tmp_path / "h.png") == 1
    out = capsys.readouterr().out
    assert "samples: 0\nbad records: 0\ndropped: 2 " in out
    assert "FAILED: the data has no training samples" in out
    assert not (tmp_path / "h.png").exists()


FORMAT_FILES = {
    "openai": ("d.jsonl", chat_records(2), "I am a helpful assistant."),
    "conversation": ("d.jsonl", [{"conversation": [{"system": "Be brief.", "input": "Who are you?",
                                                    "output": "I am a helpful assistant."},
                                                   {"input": "Hello world", "output": "Hello, this is a tiny."}]}],
                     "I am a helpful assistant."),
    "alpaca": ("d.jsonl", [{"instruction": "What is the capital of France?", "input": "",
                            "output": "Paris is the capital."}], "Paris is the capital."),
    "sharegpt": ("d.json", [{"conversations": [{"from": "human", "value": "Who are you?"},
                                               {"from": "gpt", "value": "I am a helpful assistant."}]}],
                 "I am a helpful assistant."),
    "oasst1": ("d.jsonl", [{"text": "### Human: Who are you?### Assistant: I am a helpful assistant."}],
               "I am a helpful assistant."),
    "pretrain": ("book.txt", "The quick brown fox jumps over the lazy dog.\n\nHello world, this is a tiny test.\n",
                 "quick brown fox jumps over the lazy dog."),
}


@pytest.mark.parametrize("fmt", list(FORMAT_FILES))
def test_both_commands_work_with_every_format(tmp_path, tiny_model_dir, tiny_tokenizer, capsys, fmt):
    name, content, trained = FORMAT_FILES[fmt]
    path = tmp_path / name
    if name.endswith(".txt"):
        path.write_text(content)
    elif name.endswith(".json"):
        path.write_text(json.dumps(content))
    else:
        write_jsonl(path, content)
    cfg = load_config(tiny_config(tmp_path, tiny_model_dir, path, data={"text_documents": "paragraph"}))
    assert check_dataset(cfg, tiny_tokenizer, tmp_path / "h.png") == 0
    out = capsys.readouterr().out
    assert f"dataset: {path} (format {fmt})" in out and "bad records: 0\n" in out
    assert (tmp_path / "h.png").read_bytes().startswith(PNG_SIGNATURE)

    assert log_dataset(cfg, tiny_tokenizer, 2) == 0
    out = capsys.readouterr().out
    samples = out.split("--- sample ")[1:]
    assert samples
    # the answer (or, for pre-training text, the text after its first token) is outside every no-loss span
    for chunk in re.findall(re.escape(NO_LOSS_OPEN) + r"(.*?)" + re.escape(NO_LOSS_CLOSE), out, re.S):
        assert trained not in chunk
    assert trained in samples[0]
    assert "--- rows: " in out and "row 1: " in out


def test_check_counts_match_the_training_loader(tmp_path, tiny_model_dir, tiny_tokenizer, capsys):
    """What check-dataset counts is what `prepare_data` (training) gets from the same file."""
    data = mixed_file(tmp_path / "d.jsonl")
    cfg = load_config(tiny_config(tmp_path, tiny_model_dir, data))
    check_dataset(cfg, tiny_tokenizer, tmp_path / "h.png")
    out = capsys.readouterr().out
    prepared = prepare_data(cfg.data.model_copy(update={"skip_bad_records": True}), tiny_tokenizer)
    s: DataStats = prepared.stats
    assert f"samples: {s.samples}\n" in out and f"bad records: {s.bad}\n" in out
    assert f"rows: {s.rows} of <= 64 tokens (packed)\n" in out


def test_a_first_record_of_unknown_shape_is_reported_and_the_rest_still_checked(tmp_path, tiny_model_dir,
                                                                                tiny_tokenizer, capsys):
    """The format is told from the first usable record; a first record that fits no format is one more bad
    record, not the end of the check."""
    data = write_jsonl(tmp_path / "d.jsonl", ['{"question": "q", "reply": "a"}', *chat_records(2), '{"messages": []}'])
    cfg = load_config(tiny_config(tmp_path, tiny_model_dir, data))
    assert check_dataset(cfg, tiny_tokenizer, tmp_path / "h.png") == 1
    out = capsys.readouterr().out
    assert f"  {data}:1: cannot tell the data format from this record (keys: question, reply)" in out
    assert f"  {data}:4: empty conversation\n" in out
    assert "records: 4\nsamples: 2\nbad records: 2\n" in out


def test_an_unreadable_file_does_not_hide_the_other_files_bad_records(tmp_path, tiny_model_dir, tiny_tokenizer,
                                                                      capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.json").write_bytes(b'[\n{"text": "\xff"}\n]')
    b = write_jsonl(folder / "b.jsonl", [*chat_records(2), '{"messages": []}'])
    cfg = load_config(tiny_config(tmp_path, tiny_model_dir, folder))
    assert check_dataset(cfg, tiny_tokenizer, tmp_path / "h.png") == 1
    out = capsys.readouterr().out
    assert f"  {folder / 'a.json'}:2: not UTF-8 (byte 0xff)\n" in out
    assert f"  {b}:3: empty conversation\n" in out
    assert "samples: 2\nbad records: 2\n" in out


def test_pretraining_text_is_checked_and_logged_without_a_chat_template(tmp_path, tiny_model_dir, tiny_tokenizer,
                                                                        capsys):
    tiny_tokenizer.chat_template = None  # a base model's tokenizer
    book = tmp_path / "book.txt"
    book.write_text("The quick brown fox jumps over the lazy dog.\n\nHello world, this is a tiny test.\n")
    cfg = load_config(tiny_config(tmp_path, tiny_model_dir, book, data={"text_documents": "paragraph"}))
    assert check_dataset(cfg, tiny_tokenizer, tmp_path / "h.png") == 0
    assert "samples: 2\nbad records: 0\n" in capsys.readouterr().out
    assert log_dataset(cfg, tiny_tokenizer, 2) == 0
    assert "quick brown fox" in capsys.readouterr().out
