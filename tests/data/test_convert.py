"""`tunelab data convert`: alpaca/sharegpt/openai files to openai, conversation or pre-training text, through the
real CLI; the outputs load as training data; an existing output is never overwritten by accident; a bad input
line stops the conversion naming file:line. Also the continued pre-training flow (medical Q&A -> plain text)."""

import json

import pytest

from tests.conftest import run_cli, write_jsonl
from tunelab.config.schema import DataSettings
from tunelab.data.dataset import prepare_data

ALPACA = [
    {"instruction": "Translate to French", "input": "hello", "output": "bonjour"},
    {"instruction": "Who are you?", "input": "", "output": "I am a helpful assistant."},
    {"instruction": "Say nothing", "input": "", "output": "<nooutput>"},  # dropped: nothing to learn
    {"instruction": "What is the capital of France?", "output": "Paris is the capital."},
]
SHAREGPT = [
    {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Who are you?"},
                       {"from": "gpt", "value": "I am a helpful assistant."}, {"from": "human", "value": "Hi"},
                       {"from": "gpt", "value": "Hello."}]},
    {"system": "Answer in one word.", "conversations": [{"from": "user", "value": "Capital of France?"},
                                                        {"from": "assistant", "value": "Paris"}]},
]
OPENAI = [
    {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Who are you?"},
                  {"role": "assistant", "content": "I am a helpful assistant."}]},
    {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1", "loss": False},
                  {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]},
]


def msgs(*pairs, system=None):
    out = [{"role": "system", "content": system}] if system else []
    for i, text in enumerate(pairs):
        out.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return {"messages": out}


CASES = {
    "alpaca-openai": (ALPACA, "alpaca", "openai", [
        msgs("Translate to French\nhello", "bonjour"), msgs("Who are you?", "I am a helpful assistant."),
        msgs("What is the capital of France?", "Paris is the capital.")]),
    "alpaca-conversation": (ALPACA, "alpaca", "conversation", [
        {"conversation": [{"input": "Translate to French\nhello", "output": "bonjour"}]},
        {"conversation": [{"input": "Who are you?", "output": "I am a helpful assistant."}]},
        {"conversation": [{"input": "What is the capital of France?", "output": "Paris is the capital."}]}]),
    "sharegpt-openai": (SHAREGPT, "sharegpt", "openai", [
        msgs("Who are you?", "I am a helpful assistant.", "Hi", "Hello.", system="Be brief."),
        msgs("Capital of France?", "Paris", system="Answer in one word.")]),
    "openai-pretrain": (OPENAI, "auto", "pretrain", [
        {"text": "Who are you?\nI am a helpful assistant."}, {"text": "q1\na1\nq2\na2"}]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_convert_writes_the_target_format_and_the_result_loads(tmp_path, tiny_tokenizer, case):
    records, src_fmt, dst_fmt, expected = CASES[case]
    src = write_jsonl(tmp_path / "in.jsonl", records)
    dst = tmp_path / "out" / "converted.jsonl"
    res = run_cli("data", "convert", str(src), str(dst), "--from", src_fmt, "--to", dst_fmt)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"converted {len(expected)} records to {dst}" in res.stdout
    lines = dst.read_text(encoding="utf-8").splitlines()
    assert [json.loads(x) for x in lines] == expected

    # the output trains-loads, its format detected from the records
    prepared = prepare_data(DataSettings(path=str(dst), max_length=128, cache=False), tiny_tokenizer)
    assert prepared.stats.samples == len(expected) and prepared.stats.bad == 0
    assert prepared.stats.formats == {str(dst): dst_fmt}


def test_openai_loss_flags_survive_a_round_trip_through_conversation(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", OPENAI)
    mid, back = tmp_path / "mid.jsonl", tmp_path / "back.jsonl"
    assert run_cli("data", "convert", str(src), str(mid), "--to", "conversation").returncode == 0
    assert json.loads(mid.read_text().splitlines()[1]) == {"conversation": [
        {"input": "q1", "output": "a1", "output_with_loss": False}, {"input": "q2", "output": "a2"}]}
    assert run_cli("data", "convert", str(mid), str(back), "--from", "conversation").returncode == 0
    assert [json.loads(x) for x in back.read_text().splitlines()] == OPENAI


def test_existing_output_is_refused_and_left_untouched(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", ALPACA)
    dst = tmp_path / "out.jsonl"
    dst.write_bytes(b"precious\n")
    before = dst.stat().st_mtime_ns
    res = run_cli("data", "convert", str(src), str(dst), "--from", "alpaca")
    assert res.returncode == 1
    assert f"{dst} already exists; pass --overwrite" in res.stderr
    assert dst.read_bytes() == b"precious\n" and dst.stat().st_mtime_ns == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left behind


@pytest.mark.parametrize("bad, reason", [
    ('{"instruction": "x", "output": ', "malformed JSON"),
    ('{"instruction": "x"}', "missing 'output' (keys present: instruction)"),
])
def test_a_bad_input_line_stops_with_file_and_line(tmp_path, bad, reason):
    src = write_jsonl(tmp_path / "in.jsonl", [ALPACA[0], ALPACA[1], bad, ALPACA[3]])
    dst = tmp_path / "out.jsonl"
    res = run_cli("data", "convert", str(src), str(dst), "--from", "alpaca", "--to", "openai")
    assert res.returncode == 1
    assert f"error: {src}:3: {reason}" in res.stderr
    assert not dst.exists()


MEDICAL = [
    {"instruction": "What is hypertension?", "input": "",
     "output": "Hypertension is blood pressure that stays at or above 130/80 mmHg over repeated measurements."},
    {"instruction": "Name the first-line treatment for an uncomplicated urinary tract infection.", "input": "",
     "output": "Nitrofurantoin for five days is a common first-line choice in otherwise healthy adults."},
    {"instruction": "Explain the symptom.", "input": "Polyuria",
     "output": "Polyuria means passing unusually large volumes of urine, often a sign of uncontrolled diabetes."},
    {"instruction": "What does HbA1c measure?", "input": "",
     "output": "HbA1c reflects the average blood glucose level over the previous two to three months."},
    {"instruction": "When is an ECG ordered for chest pain?", "input": "",
     "output": "An ECG is recorded within ten minutes of arrival to look for signs of myocardial ischaemia."},
    {"instruction": "What is the normal adult resting heart rate?", "input": "",
     "output": "A normal resting heart rate for adults is between 60 and 100 beats per minute."},
    {"instruction": "Define anaemia.", "input": "",
     "output": "Anaemia is a haemoglobin concentration below the normal range for age and sex."},
]


def test_medical_qa_becomes_continued_pretraining_text(tmp_path, tiny_tokenizer):
    """The continued pre-training tutorial: domain Q&A -> plain text -> trained on every token."""
    src = write_jsonl(tmp_path / "medical_qa.jsonl", MEDICAL)
    dst = tmp_path / "medical_text.jsonl"
    res = run_cli("data", "convert", str(src), str(dst), "--from", "alpaca", "--to", "pretrain")
    assert res.returncode == 0, res.stdout + res.stderr
    texts = [json.loads(x)["text"] for x in dst.read_text(encoding="utf-8").splitlines()]
    assert texts[0] == MEDICAL[0]["instruction"] + "\n" + MEDICAL[0]["output"]
    assert texts[2] == "Explain the symptom.\nPolyuria\n" + MEDICAL[2]["output"]
    assert len(texts) == len(MEDICAL)

    for fmt in ("auto", "pretrain"):
        prepared = prepare_data(DataSettings(path=str(dst), format=fmt, max_length=512, cache=False),
                                tiny_tokenizer)
        s = prepared.stats
        assert s.formats == {str(dst): "pretrain"}
        assert s.samples == len(MEDICAL) and s.bad == 0 and s.truncated == 0
        # plain text: nothing is masked, every token but each document's first is a target
        assert s.loss_tokens == s.tokens - len(MEDICAL)
        eos = tiny_tokenizer.eos_token_id
        assert prepared.rows.input_ids.tolist().count(eos) == len(MEDICAL)  # documents joined with EOS


def test_a_folder_of_files_in_different_formats_is_detected_per_file(tmp_path):
    folder = tmp_path / "in"
    write_jsonl(folder / "a.jsonl", ALPACA[:1])
    write_jsonl(folder / "b.jsonl", SHAREGPT[1:])
    dst = tmp_path / "out.jsonl"
    res = run_cli("data", "convert", str(folder), str(dst))
    assert res.returncode == 0, res.stdout + res.stderr
    assert [json.loads(x) for x in dst.read_text(encoding="utf-8").splitlines()] == [
        msgs("Translate to French\nhello", "bonjour"), msgs("Capital of France?", "Paris", system="Answer in one word.")]
