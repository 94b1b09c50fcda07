"""The README's demo, end to end on the real default model (SmolLM2-135M-Instruct from the PyPI wheel), on CPU:
self-cognition data -> LoRA training -> PEFT adapter -> merged model -> chat; then the held-out evaluation."""

import json
import time

import pytest

from tests.conftest import run_cli

NAME = "Zorana"


@pytest.fixture(scope="module")
def demo(tmp_path_factory, default_model_dir):
    work = tmp_path_factory.mktemp("demo") / "run"
    t = time.perf_counter()
    res = run_cli("demo", "--name", NAME, "--work-dir", str(work), timeout=1500)
    seconds = time.perf_counter() - t
    print(f"demo took {seconds:.0f} s")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return work, res, seconds


def test_demo_trains_merges_and_answers_with_the_new_identity(demo):
    work, res, seconds = demo
    out = res.stdout
    for step in ("[1/5] data", "[2/5] train", "[3/5] convert", "[4/5] merge", "[5/5] chat"):
        assert step in out
    assert f"identity answers name '{NAME}': yes; general question answered as a question: yes" in out
    assert seconds < 600  # the README promises minutes on a laptop CPU; CI has 2 cores
    run_dirs = [p for p in (work / "run").iterdir() if p.is_dir() and not p.name.startswith("iter_")]
    assert (run_dirs[0] / "loss_curve.png").exists() and (run_dirs[0] / "scalars.jsonl").exists()
    losses = [json.loads(x)["loss"] for x in (run_dirs[0] / "scalars.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] / 2


def test_merged_model_is_a_plain_hf_folder_and_adapter_loads_with_peft(demo, default_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    work, _, _ = demo
    merged = work / "merged"
    cfg = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["architectures"] == ["LlamaForCausalLM"]
    assert list(merged.glob("*.safetensors")) and (merged / "tokenizer.json").exists()
    assert json.loads((merged / "tokenizer_config.json").read_text())["tokenizer_class"] == "GPT2Tokenizer"
    base = AutoModelForCausalLM.from_pretrained(str(default_model_dir))
    PeftModel.from_pretrained(base, str(work / "hf_adapter"))


def test_chat_cli_answers_from_a_pipe(demo):
    work, _, _ = demo
    res = run_cli("chat", str(work / "merged"), "--json", "--no-history", "--max-new-tokens", "48",
                  input="你是谁\nWho are you?\nWhat is the capital of France?\n", timeout=300)
    assert res.returncode == 0, res.stderr
    answers = [json.loads(x)["answer"] for x in res.stdout.splitlines()]
    assert len(answers) == 3
    assert NAME in answers[0] and NAME in answers[1]
    assert NAME not in answers[2] and "Paris" in answers[2]


def test_held_out_self_cognition_rates(demo):
    work, _, _ = demo
    res = run_cli("eval", "self-cognition", str(work / "merged"), "--name", NAME, timeout=600)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout.strip().splitlines()[-1])
    print(report)
    assert report["identity_questions"] >= 16 and report["general_questions"] >= 20
    assert report["identity_rate"] >= 0.9
    assert report["general_rate"] >= 0.9
