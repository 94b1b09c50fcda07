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


def _trained_lora(tmp_path: Path, **lora):
    """LoRA on every linear layer with a non-zero B (as after training), so the adapters change the answers."""
    model = add_lora(tiny(tmp_path, layers=2), LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=ALL_LINEAR,
                                                            **lora))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    return model.eval()


def test_merged_for_generation_answers_as_the_adapter_layers_and_leaves_them_as_they_were(tmp_path: Path) -> None:
    from tunelab.model.adapters import merged_for_generation

    model = _trained_lora(tmp_path)
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with model.disable_adapter():
            base_only = model(input_ids=ids).logits
        with merged_for_generation(model) as n:
            patched = sum("forward" in m.__dict__ for m in model.modules())
            merged = model(input_ids=ids).logits
            greedy = model.generate(input_ids=ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
            saved_b = {k: p.clone() for k, p in model.named_parameters() if "lora_B" in k}
            for k, p in model.named_parameters():
                if "lora_B" in k:
                    p.zero_()  # the merged copies answer now, not the adapter layers
            unchanged = model(input_ids=ids).logits
            for k, p in model.named_parameters():
                if "lora_B" in k:
                    p.copy_(saved_b[k])
        again = model.generate(input_ids=ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert n == patched == 14  # 7 linear layers x 2 decoder layers
    assert (plain - base_only).abs().max() > 1e-2  # the adapters matter here...
    torch.testing.assert_close(merged, plain, rtol=1e-5, atol=1e-5)  # ... and merging keeps their answers
    assert torch.equal(unchanged, merged)
    assert greedy.tolist() == again.tolist()
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert all(torch.equal(p, before[k]) for k, p in model.named_parameters())
    model.train()  # and training goes on through the adapters: they still get gradients
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


@pytest.mark.parametrize("why", ["dora", "no room", "out of memory while merging"])
def test_merged_for_generation_leaves_layers_it_cannot_merge(tmp_path: Path, why: str, monkeypatch) -> None:
    from tunelab.model import adapters

    model = _trained_lora(tmp_path, use_dora=why == "dora")
    if why == "no room":
        monkeypatch.setattr(adapters, "_room_for", lambda nbytes, largest, device: False)
    if why.startswith("out of memory"):  # the third layer's copy does not fit after all
        real, done = adapters._merged_weight, []
        monkeypatch.setattr(adapters, "_merged_weight", lambda m: (done.append(m), real(m))[1] if len(done) < 2
                            else (_ for _ in ()).throw(torch.OutOfMemoryError("CUDA out of memory")))
    ids = torch.randint(3, 64, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with adapters.merged_for_generation(model) as n:
            patched = sum("forward" in m.__dict__ for m in model.modules())
            same = model(input_ids=ids).logits
    assert n == patched == 0
    assert torch.equal(same, plain)
    assert sum(type(m).__name__ == "Linear" and hasattr(m, "lora_A") for m in model.modules()) == 14


def test_qlora_layers_answer_through_dequantized_merged_copies(tiny_model_dir: Path, monkeypatch) -> None:
    from tunelab.model import adapters
    from tunelab.model.adapters import merged_for_generation
    from tunelab.model.load import load_model

    base = load_model(str(tiny_model_dir), dtype=torch.float32, device=torch.device("cpu"), quantization="nf4")
    model = add_lora(base, LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=ALL_LINEAR)).train()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    packed = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # train mode: bitsandbytes repacks 4-bit weights for CPU inference in eval mode
        plain = model(input_ids=ids).logits
        with model.disable_adapter():
            base_only = model(input_ids=ids).logits
        with merged_for_generation(model) as n:
            merged = model(input_ids=ids).logits
            for k, p in model.named_parameters():
                if "lora_B" in k:
                    p.zero_()  # the merged copies answer, not the adapter layers
            unchanged = model(input_ids=ids).logits
    assert n == sum(type(m).__name__ == "Linear4bit" and hasattr(m, "lora_A") for m in model.modules()) > 0
    assert (plain - base_only).abs().max() > 1e-2
    torch.testing.assert_close(merged, plain, rtol=1e-4, atol=1e-4)  # dequantize + add = the 4-bit and LoRA paths
    assert torch.equal(unchanged, merged)
    assert all(torch.equal(p, packed[k]) for k, p in model.named_parameters() if "lora_B" not in k)
    assert not any("forward" in m.__dict__ for m in model.modules())
    monkeypatch.setattr(adapters, "_room_for", lambda nbytes, largest, device: False)  # 16-bit copies do not fit
    with torch.no_grad(), merged_for_generation(model) as n:
        assert n == 0 and not any("forward" in m.__dict__ for m in model.modules())


def test_generation_in_a_training_run_goes_through_the_merged_layers(tmp_path: Path) -> None:
    from tunelab.model.kernels import generation_mode

    model = _trained_lora(tmp_path)
    calls = []
    hooks = [a.register_forward_pre_hook(lambda *_: calls.append(1)) for n, a in model.named_modules()
             if n.endswith("lora_A.default")]
    ids = torch.randint(3, 64, (1, 5), generator=torch.Generator().manual_seed(0))
    with generation_mode(model), torch.no_grad():
        assert sum("forward" in m.__dict__ for m in model.modules()) == 14
        model(input_ids=ids)
    assert len(hooks) == 14 and calls == []  # no adapter layer ran: the merged copies answered
    assert not any("forward" in m.__dict__ for m in model.modules())
    with torch.no_grad():
        model(input_ids=ids)
    assert len(calls) == 14
