"""tunelab/model/adapters.py: which weights train (LoRA/DoRA through peft, or all of them), and activation
checkpointing, on a tiny random Llama built in conftest."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import build_tiny_model
from tunelab.config.schema import ALL_LINEAR, LoraSettings
from tunelab.errors import ConfigError
from tunelab.model.adapters import (
    add_lora,
    count_parameters,
    enable_checkpointing,
    linear_module_names,
    make_full_trainable,
    trainable_state,
)

LLAMA_LINEAR = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def tiny(tmp_path: Path, layers: int = 2, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    build_tiny_model(tmp_path, vocab_size=64, layers=layers)
    return AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=dtype)


def test_linear_module_names_are_the_decoder_layers_without_the_output_head(tmp_path: Path) -> None:
    assert linear_module_names(tiny(tmp_path)) == LLAMA_LINEAR


def test_all_linear_lora_on_a_bf16_model_trains_only_fp32_adapters(tmp_path: Path) -> None:
    model = add_lora(tiny(tmp_path, dtype=torch.bfloat16), LoraSettings(r=4, alpha=8, target_modules=ALL_LINEAR))
    state = trainable_state(model)
    # 2 layers x 7 linear layers x (A, B)
    assert len(state) == 28 and all(".lora_A." in n or ".lora_B." in n for n in state)
    assert {t.dtype for t in state.values()} == {torch.float32}  # adapters and their AdamW state stay fp32
    assert {p.dtype for n, p in model.named_parameters() if "lora_" not in n} == {torch.bfloat16}
    trainable, total = count_parameters(model)
    assert trainable == sum(t.numel() for t in state.values()) and 0 < trainable < total


def test_layers_to_transform_puts_adapters_on_the_top_layers_only(tmp_path: Path) -> None:
    model = add_lora(tiny(tmp_path, layers=4), LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"],
                                                           layers_to_transform=2))
    layers = sorted({int(n.split(".layers.")[1].split(".")[0]) for n in trainable_state(model)})
    assert layers == [2, 3]
    assert len(trainable_state(model)) == 2 * 2 * 2


def test_dora_adds_a_trainable_magnitude_vector(tmp_path: Path) -> None:
    model = add_lora(tiny(tmp_path), LoraSettings(r=4, alpha=8, target_modules=["q_proj"], use_dora=True))
    names = list(trainable_state(model))
    assert sum("lora_magnitude_vector" in n for n in names) == 2


def test_unknown_target_module_names_the_key_and_lists_the_real_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        add_lora(tiny(tmp_path), LoraSettings(r=4, alpha=8, target_modules=["q_proj", "query_key_value"]))
    msg = str(err.value)
    assert "model.lora.target_modules: ['query_key_value'] not in this model" in msg
    assert "q_proj" in msg and "down_proj" in msg


def test_full_fine_tuning_trains_every_weight(tmp_path: Path) -> None:
    model = tiny(tmp_path)
    for p in model.parameters():
        p.requires_grad_(False)
    model = make_full_trainable(model)
    trainable, total = count_parameters(model)
    assert trainable == total and len(trainable_state(model)) == len(list(model.parameters()))


def test_checkpointing_gives_the_same_gradients(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (2, 16))

    def lora_grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = add_lora(tiny(tmp_path), LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=ALL_LINEAR))
        with torch.no_grad():  # B starts at zero; give it values so A's gradient is not trivially zero
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.linspace(-0.1, 0.1, p.numel()).view_as(p))
        if checkpointing:
            enable_checkpointing(model)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, ckpt = lora_grads(False), lora_grads(True)
    assert plain.keys() == ckpt.keys()
    assert any(g.abs().sum() > 0 for n, g in plain.items() if "lora_A" in n)
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-7)
