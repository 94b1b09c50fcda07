"""What a run learnt travels with the model: train the tiny model with llama2_chat and a system prompt, convert it
to an adapter, merge it, and the merged folder alone prompts the model as it was trained, for transformers and for
`tunelab chat` with no flag; a different --prompt-template still works, with one warning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import chat_records, run_cli, tiny_config, write_jsonl
from tunelab.data.formats import Conversation, Message

SYSTEM = "You answer like a pirate."
QUESTIONS = ["Who are you?", "What is the capital of France?"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("trained_template")
    data = write_jsonl(tmp / "data.jsonl", chat_records(8))
    # the template and system prompt are given as overrides, so only the checkpoint's config.yaml knows them;
    # llama2_chat's system text is long: rows must hold it and a reply
    config = tiny_config(tmp, tiny_model_dir, data, data={"max_length": 384}, train={"max_steps": 3, "lr": 5e-2})
    steps = [("train", str(config), "data.prompt_template=llama2_chat", f"data.system={SYSTEM}",
              "--work-dir", str(tmp / "work")),
             ("convert", "to-hf", str(config), str(tmp / "work"), str(tmp / "adapter")),
             ("convert", "merge", str(tiny_model_dir), str(tmp / "adapter"), str(tmp / "merged"))]
    for args in steps:
        r = run_cli(*args, timeout=600)
        assert r.returncode == 0, (args, r.stdout[-2000:], r.stderr[-2000:])
        if args[:2] == ("convert", "to-hf"):  # the given config says "hf"; the run said llama2_chat
            warned = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
            assert len(warned) == 1 and "trained with prompt template llama2_chat" in warned[0], r.stderr
    return {"adapter": tmp / "adapter", "merged": tmp / "merged", "base": tiny_model_dir}


def test_the_merged_tokenizer_renders_what_tunelab_trained_on(run):
    from transformers import AutoTokenizer

    from tunelab.data.encode import encode_for_generation
    from tunelab.data.templates import get_template

    tok = AutoTokenizer.from_pretrained(str(run["merged"]))
    renderer = get_template("llama2_chat", tok, SYSTEM)
    msgs = [Message("user", "q1"), Message("assistant", "a1"), Message("user", "q2")]
    for conv in (Conversation(msgs), Conversation([Message("system", "Be brief."), *msgs])):
        want = "".join(s for s, _ in renderer.render(conv, add_generation_prompt=True))
        dicts = [{"role": m.role, "content": m.content} for m in conv.messages]
        assert tok.apply_chat_template(dicts, tokenize=False, add_generation_prompt=True) == want
        assert tok.apply_chat_template(dicts, add_generation_prompt=True)["input_ids"] == \
            encode_for_generation(conv, renderer, tok)
    assert want.startswith("<s>[INST] <<SYS>>\n You are a helpful") and "\nBe brief.\n<</SYS>>" in want


def test_sidecar_and_stop_ids_travel_to_adapter_and_merged_model(run):
    for folder in (run["adapter"], run["merged"]):
        side = json.loads((folder / "tunelab.json").read_text())
        assert side["prompt_template"] == "llama2_chat" and side["system"] == SYSTEM, folder
        assert side["stop_words"] == ["<|im_end|>"] and side["base_model"] == str(run["base"])
        assert side["tunelab_version"]
        assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == 2  # <|im_end|>
        assert (folder / "chat_template.jinja").exists()
    readme = (run["adapter"] / "README.md").read_text()
    assert "prompt template: `llama2_chat`" in readme and "--prompt-template" not in readme


def chat(*args: str):
    stdin = "".join(q + "\n" for q in QUESTIONS)
    r = run_cli("chat", *args, "--json", "--max-new-tokens", "8", "--device", "cpu", input=stdin, timeout=300)
    assert r.returncode == 0, r.stderr
    return [json.loads(line)["answer"] for line in r.stdout.splitlines()], r.stderr


def test_chat_uses_the_trained_template_with_no_flag(run):
    """`tunelab chat MERGED` answers exactly as transformers does with the folder's own chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    answers, err = chat(str(run["merged"]))
    assert all(a.strip() for a in answers), answers  # real answers, not two empty matches
    assert f"prompt template llama2_chat and system prompt from {run['merged'] / 'tunelab.json'}" in err
    assert "warning" not in err
    tok = AutoTokenizer.from_pretrained(str(run["merged"]))
    model = AutoModelForCausalLM.from_pretrained(str(run["merged"]), dtype=torch.float32)
    for question, answer in zip(QUESTIONS, answers):  # piped lines are answered each on its own
        ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                      return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        assert tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip() == answer


def test_adapter_folder_template_wins_over_the_base(run):
    _, err = chat(str(run["base"]), "--adapter", str(run["adapter"]))
    assert f"prompt template llama2_chat and system prompt from {run['adapter'] / 'tunelab.json'}" in err


def test_another_template_is_used_with_one_warning(run):
    _, err = chat(str(run["merged"]), "--prompt-template", "default")
    warned = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(warned) == 1, err
    assert "--prompt-template default differs from the template this model was trained with (llama2_chat" in \
        warned[0]


def test_export_app_carries_the_trained_template(run, tmp_path):
    from transformers import AutoTokenizer

    r = run_cli("export-app", str(run["merged"]), str(tmp_path / "space"), timeout=180)
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "space" / "app_config.json").read_text())
    assert cfg["template_name"] == "llama2_chat" and cfg["system"] == SYSTEM
    assert cfg["chat_template"] == AutoTokenizer.from_pretrained(str(run["merged"])).chat_template
