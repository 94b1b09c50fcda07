"""tunelab.json and generation_config.json beside an exported model: stop words that are one token become eos
ids, the others stay in the sidecar; a broken sidecar is one clear line naming the file."""

from __future__ import annotations

import json

import pytest

from tunelab.data.sidecar import SIDECAR, TrainedPrompt, read_sidecar, save_prompt_files
from tunelab.data.templates import get_template
from tunelab.errors import DataError


def test_single_token_stop_words_become_eos_ids(tiny_tokenizer, tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "do_sample": False}))
    save_prompt_files(tmp_path, tiny_tokenizer, get_template("qwen_chat", tiny_tokenizer), "base")
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    ids = [tiny_tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    assert gen == {"eos_token_id": ids, "do_sample": False}  # the base's other settings kept
    side = read_sidecar(tmp_path)
    assert side == TrainedPrompt("qwen_chat", None, ("<|im_end|>", "<|endoftext|>"), "base")


def test_multi_token_stop_words_stay_in_the_sidecar_only(tiny_tokenizer, tmp_path):
    save_prompt_files(tmp_path, tiny_tokenizer, get_template("internlm_chat", tiny_tokenizer, "Sys"), None)
    assert len(tiny_tokenizer("<eoa>", add_special_tokens=False)["input_ids"]) > 1  # not a token of this vocab
    assert json.loads((tmp_path / "generation_config.json").read_text()) == {"eos_token_id": 2}
    assert read_sidecar(tmp_path).stop_words == ("<eoa>", "<|im_end|>")


@pytest.mark.parametrize("text,message", [
    ('{"prompt_template": "qwen_chat",\n "system": }', r"tunelab\.json: not valid JSON \(Expecting value, line 2\)"),
    ('["qwen_chat"]', r"tunelab\.json: expected a JSON object"),
    ('{"prompt_template": 3}', r"tunelab\.json: key 'prompt_template' has the wrong type \(int\)"),
    ('{"system": "S"}', r"tunelab\.json: key 'prompt_template' is missing"),
    ('{"prompt_template": "hf", "stop_words": [1]}', r"tunelab\.json: key 'stop_words' must be a list of strings"),
])
def test_a_broken_sidecar_names_the_file(tmp_path, text, message):
    (tmp_path / SIDECAR).write_text(text)
    with pytest.raises(DataError, match=f"^{tmp_path}/{message}"):
        read_sidecar(tmp_path)


def test_no_sidecar_means_none(tmp_path):
    assert read_sidecar(tmp_path) is None
