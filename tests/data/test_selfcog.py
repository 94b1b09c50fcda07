"""Self-cognition data: enough phrasings in both languages, a held-out set never used, answers naming the
owner, deterministic by seed, mixing at a ratio; the CLI command converts mixed-in records and refuses bad input
with one line."""

import json

from tests.conftest import write_jsonl
from tunelab.data.formats import to_sample
from tunelab.data.selfcog import GENERAL_HELD_OUT, GENERAL_TRAIN, IDENTITY_HELD_OUT, IDENTITY_TRAIN, \
    general_records, identity_records, mix
from tunelab.infer.selfcog_eval import is_hijacked, names_owner


def test_phrasings_cover_both_languages_and_hold_out_a_set():
    train = [q for qs in IDENTITY_TRAIN.values() for q in qs]
    held = [q for qs in IDENTITY_HELD_OUT.values() for q in qs]
    assert len(set(train)) >= 40 and len(IDENTITY_TRAIN["zh"]) >= 20 and len(IDENTITY_TRAIN["en"]) >= 20
    assert not set(train) & set(held) and len(held) >= 16
    assert len(GENERAL_HELD_OUT) >= 20 and not set(GENERAL_TRAIN) & set(GENERAL_HELD_OUT)
    records = identity_records("Ada", seed=0)
    asked = {r["messages"][0]["content"] for r in records}
    assert asked == set(train)  # every phrasing is used, and no held-out one


def test_records_are_valid_name_the_owner_and_are_deterministic():
    a = identity_records("Ada", model_desc="a test model", seed=3)
    assert a == identity_records("Ada", model_desc="a test model", seed=3)
    assert a != identity_records("Ada", model_desc="a test model", seed=4)
    for r in a:
        conv = to_sample(r, "openai")
        answer = conv.messages[-1].content
        assert names_owner(answer, "Ada") and "a test model" in answer
    zh = [r for r in a if any("\u4e00" <= ch <= "\u9fff" for ch in r["messages"][0]["content"])]
    assert zh and all("Ada" in r["messages"][1]["content"] for r in zh)


def test_mix_reaches_the_ratio():
    ident = identity_records("Ada", n=60)
    general = general_records(["q1", "q2", "q3"], ["a1", "a2", "a3"])
    out = mix(ident, general, 0.25, seed=1)
    n_general = sum(1 for r in out if r["messages"][0]["content"].startswith("q"))
    assert len(out) == 80 and n_general == 20


def test_owner_matching_and_hijack_detection():
    assert names_owner("I am Ada's assistant", "Ada") and names_owner("我是Ada的小助手", "Ada")
    assert not names_owner("Canada is large", "Ada")
    assert is_hijacked("我是Ada的小助手", "Ada")
    assert is_hijacked("月亮是一名小助手，一个用 tunelab 微调的小型语言模型。", "Ada")  # repeats the identity
    assert not is_hijacked("The capital of Japan is Tokyo.", "Ada")


def self_cognition(capsys, *args):
    """`tunelab data self-cognition ARGS` in-process: (exit code, stderr)."""
    from tunelab.cli import main

    code = main(["data", "self-cognition", *args])
    return code, capsys.readouterr().err


def test_general_records_are_converted_to_the_output_format(tmp_path, capsys):
    general = write_jsonl(tmp_path / "general.jsonl", [
        {"instruction": "What is 2+2?", "input": "", "output": "4"},
        {"instruction": "Capital of France?", "input": "", "output": "Paris"}])
    out = tmp_path / "sc.jsonl"
    code, err = self_cognition(capsys, "--name", "Ada", "--n", "6", "--general", str(general), "--out", str(out))
    assert code == 0, err
    records = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert len(records) == 9 and all(set(r) == {"messages"} for r in records)
    assert {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]} \
        in records
    conv = tmp_path / "sc_conv.jsonl"
    code, err = self_cognition(capsys, "--name", "Ada", "--n", "6", "--general", str(general), "--format",
                               "conversation", "--out", str(conv))
    assert code == 0, err
    records = [json.loads(x) for x in conv.read_text(encoding="utf-8").splitlines()]
    assert all(set(r) == {"conversation"} for r in records)
    assert {"conversation": [{"input": "Capital of France?", "output": "Paris"}]} in records


def test_bad_arguments_and_general_records_are_one_line_errors(tmp_path, capsys):
    out = tmp_path / "sc.jsonl"
    general = write_jsonl(tmp_path / "general.jsonl", [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}])
    cases = [
        (["--name", " "], "error: --name: the owner's name must not be empty"),
        (["--name", "Ada", "--general", str(general), "--general-ratio", "1"],
         "error: --general-ratio must be at least 0 and below 1, got 1.0"),
        (["--name", "Ada", "--general", str(general), "--format", "conversation"],
         f"error: {general}:2: message 0: unknown role 'tool'"),
    ]
    for args, expected in cases:
        code, err = self_cognition(capsys, *args, "--out", str(out))
        assert code == 1 and err.startswith(expected), (args, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert not out.exists()


def test_replayed_answers_that_loop_are_not_trained_on():
    """The base model's own looping answers (real ones, from SmolLM2-135M) would teach it to loop."""
    from tunelab.data.selfcog import self_cognition_records

    answers = {"What is the capital of France?": "The capital of France is Paris.",
               "你能解释一下什么是彩虹吗？": "彩虹！彩虹！彩虹！彩虹！彩虹！彩虹！彩虹！彩虹！彩虹！",
               "什么是电？": "什么是电？－－－－－－－－－－－－－－－－－－－－－－－－－－－",
               "Write a haiku about autumn.": ""}
    assert general_records(list(answers), list(answers.values())) == [{"messages": [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."}]}]
    records = self_cognition_records("Ada", n=10, replay=lambda qs: [answers.get(q, "") for q in qs],
                                     general_ratio=0.5)
    general = [r for r in records if not names_owner(r["messages"][-1]["content"], "Ada")]
    assert len(general) == 10 and {r["messages"][0]["content"] for r in general} == {"What is the capital of France?"}
