"""tunelab/model/load.py: where a model path is resolved, and where device, dtype, attention and quantization
are chosen. Tiny random models built here; the real default model only where quantised weights matter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tunelab.errors import ModelError
from tunelab.model.load import choose_device, choose_dtype, load_model, load_tokenizer, resolve_model_path


def test_resolve_model_path_accepts_a_model_folder_and_a_hub_id(tiny_model_dir: Path) -> None:
    assert resolve_model_path(str(tiny_model_dir)) == str(tiny_model_dir)
    assert resolve_model_path("internlm/internlm2-chat-1_8b") == "internlm/internlm2-chat-1_8b"


def test_resolve_model_path_names_what_is_wrong(tmp_path: Path, tiny_model_dir: Path) -> None:
    with pytest.raises(ModelError, match=r"model folder not found: \./no/such/model"):
        resolve_model_path("./no/such/model")
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"x")
    with pytest.raises(ModelError, match=f"model path is a file, not a folder: {a_file}"):
        resolve_model_path(str(a_file))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="it has no config.json"):
        resolve_model_path(str(empty))
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(tiny_model_dir / "config.json", no_weights / "config.json")
    with pytest.raises(ModelError, match=r"has a config.json but no weights"):
        resolve_model_path(str(no_weights))


def test_choose_dtype_by_name_and_auto_follows_the_cpu() -> None:
    cpu = torch.device("cpu")
    assert choose_dtype("float32", cpu) is torch.float32
    assert choose_dtype("bfloat16", cpu) is torch.bfloat16
    assert choose_dtype("float16", cpu) is torch.float16
    flags = Path("/proc/cpuinfo").read_text()
    native_bf16 = "avx512_bf16" in flags or "amx_bf16" in flags
    assert choose_dtype("auto", cpu) is (torch.bfloat16 if native_bf16 else torch.float32)


def test_choose_device_cuda_only_when_there_is_one() -> None:
    assert choose_device("cpu") == torch.device("cpu")
    assert choose_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        assert choose_device("cuda").type == "cuda"
    else:
        with pytest.raises(ModelError, match="no CUDA GPU is available"):
            choose_device("cuda")


def test_load_tokenizer_sets_a_pad_token_and_needs_tokenizer_files(tmp_path: Path, tiny_model_dir: Path) -> None:
    folder = tmp_path / "tok"
    shutil.copytree(tiny_model_dir, folder)
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("pad_token", None)
    cfg_path.write_text(json.dumps(cfg))
    tok = load_tokenizer(str(folder))
    assert tok.pad_token == tok.eos_token == "<|im_end|>"

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (folder / name).unlink(missing_ok=True)
    with pytest.raises(ModelError, match="has no tokenizer files"):
        load_tokenizer(str(folder))


def test_load_model_sets_dtype_attention_and_turns_the_cache_off(tiny_model_dir: Path) -> None:
    model = load_model(str(tiny_model_dir), dtype=torch.bfloat16, device=torch.device("cpu"),
                       attn_implementation="eager")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config._attn_implementation == "eager"
    assert model.config.use_cache is False  # training never uses the KV cache


@pytest.mark.parametrize("quantization,layer_class", [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_quantized_loading_on_cpu_keeps_the_model_answering(default_model_dir: Path, quantization: str,
                                                             layer_class: str) -> None:
    from tunelab.model.generate import GenerationOptions, conversation, generate, load_chat_model

    bits = {"nf4": 4, "int8": 8}[quantization]
    chat = load_chat_model(str(default_model_dir), bits=bits, device="cpu")
    classes = {type(m).__name__ for m in chat.model.modules()}
    assert layer_class in classes
    if quantization == "nf4":
        q_proj = chat.model.model.layers[0].self_attn.q_proj
        assert q_proj.weight.quant_type == "nf4" and q_proj.weight.quant_state.nested  # double quantisation
    answer = generate(chat, conversation([], "What is the capital of France?", None),
                      GenerationOptions(max_new_tokens=12))[0]
    assert "Paris" in answer


def test_quantized_weights_on_a_cpu_warn_once_and_point_to_lora(tiny_model_dir: Path) -> None:
    from tunelab import ui

    seen: list[str] = []

    def sink(key: str, msg: str) -> None:
        seen.append(msg)

    ui.warning_counts.pop("quantized_on_cpu", None)
    ui.add_warning_sink(sink)
    try:
        for _ in range(2):
            load_model(str(tiny_model_dir), dtype=torch.float32, device=torch.device("cpu"), quantization="nf4")
        load_model(str(tiny_model_dir), dtype=torch.float32, device=torch.device("cpu"))
    finally:
        ui.remove_warning_sink(sink)
    assert len(seen) == 1 and ui.warning_counts["quantized_on_cpu"] == 2
    assert seen[0].startswith("nf4 weights on a CPU are de-quantised again for every matrix multiplication")
    assert "train with the LoRA config instead (the same name with _lora_ for _qlora_, or model.quantization=none) " \
        "and chat without --bits" in seen[0]
