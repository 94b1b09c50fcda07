"""tunelab/model/nf4.py: torchao's NF4 weights, loaded one tensor at a time from the safetensors files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tunelab.errors import ModelError
from tunelab.model.load import load_model
from tunelab.model.nf4 import is_nf4, load_torchao_nf4, quantizable, torchao_unsuitable

CPU = torch.device("cpu")


def test_only_weights_whose_shards_hold_whole_blocks_are_quantizable() -> None:
    assert quantizable((256, 256), 1) and quantizable((256, 256), 4)
    assert not quantizable((256, 256), 8)  # 8,192 weights a shard: half a block of scales
    assert quantizable((272, 1024), 1) and not quantizable((272, 1024), 32)  # 17 rows a shard: not whole rows...
    assert not quantizable((255, 1024), 1)  # ... or not whole blocks of scales
    assert not quantizable((64, 32), 1) and not quantizable((4096,), 1)


def test_decoder_weights_become_nf4_and_the_model_answers_close_to_the_plain_one(nf4_model_dir: Path) -> None:
    plain = load_model(str(nf4_model_dir), dtype=torch.float32, device=CPU)
    model = load_torchao_nf4(str(nf4_model_dir), dtype=torch.float32, device=CPU, shards=2)
    linear = {n: m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    head = model.get_output_embeddings().weight
    assert sum(is_nf4(w) for w in linear.values()) == len(linear) - 1 == 14 and not is_nf4(head)
    assert not any(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())
    # every plain tensor is the file's; the NF4 ones are within 4-bit rounding of it
    files = load_file(str(nf4_model_dir / "model.safetensors"))
    assert torch.equal(model.model.embed_tokens.weight, files["model.embed_tokens.weight"])
    q = model.model.layers[0].self_attn.q_proj.weight
    ref = files["model.layers.0.self_attn.q_proj.weight"]
    err = (q.get_original_weight() - ref).abs().max() / ref.abs().max()
    assert 0 < err < 0.15
    # the same 4-bit format as bitsandbytes' (NF4 codes, blocks of 64, double-quantized scales): both models
    # answer alike, and as far from the plain model as each other
    bnb = load_model(str(nf4_model_dir), dtype=torch.float32, device=CPU, quantization="nf4")
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        ref, got, other = plain(ids).logits.flatten(), model(ids).logits.flatten(), bnb(ids).logits.flatten()
    similar = torch.nn.functional.cosine_similarity
    assert similar(got, other, dim=0) > 0.999
    assert float(similar(got, ref, dim=0)) == pytest.approx(float(similar(other, ref, dim=0)), abs=1e-3)
    assert model.generation_config.eos_token_id == plain.generation_config.eos_token_id


def test_a_tiny_layer_stays_plain(tiny_model_dir: Path) -> None:
    """Hidden size 32: no weight holds a whole block of scales, so none is quantized; the model still loads."""
    model = load_torchao_nf4(str(tiny_model_dir), dtype=torch.float32, device=CPU, shards=1)
    assert not any(is_nf4(p) for p in model.parameters())


def test_weights_under_other_names_are_refused_with_one_line(tmp_path: Path, nf4_model_dir: Path) -> None:
    folder = tmp_path / "renamed"
    shutil.copytree(nf4_model_dir, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["transformer.wte.weight"] = tensors.pop("model.embed_tokens.weight")
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"renamed: its weight names do not match LlamaForCausalLM \(1 unknown, "
                                         r"e\.g\. \['transformer\.wte\.weight'\]; 1 missing, e\.g\. "
                                         r"\['model\.embed_tokens\.weight'\]\).*set model\.nf4_format: bitsandbytes"):
        load_torchao_nf4(str(folder), dtype=torch.float32, device=CPU, shards=1)
    assert torchao_unsuitable(str(folder), 1) == "its weight names differ from the model's (transformers renames " \
                                                 "them on load)"


def test_auto_takes_torchao_only_where_every_linear_weight_becomes_nf4(tmp_path: Path, nf4_model_dir: Path,
                                                                       tiny_model_dir: Path) -> None:
    """What "auto" asks before it chooses torchao, from the config and the files' headers alone."""
    assert torchao_unsuitable(str(nf4_model_dir), 2) is None and torchao_unsuitable(str(nf4_model_dir), 4) is None
    assert torchao_unsuitable(str(nf4_model_dir), 8) == ("only 6 of its 14 linear weights split into whole 64 x 256 "
                                                         "blocks over 8 processes")
    assert torchao_unsuitable(str(tiny_model_dir), 2).startswith("only 0 of its 14 linear weights")
    assert "local folder" in torchao_unsuitable("HuggingFaceTB/SmolLM2-135M-Instruct", 2)
    bin_only = tmp_path / "bin_only"
    bin_only.mkdir()
    shutil.copy(nf4_model_dir / "config.json", bin_only / "config.json")
    assert "*.safetensors" in torchao_unsuitable(str(bin_only), 2)


def test_only_the_files_transformers_reads_are_read(tmp_path: Path, nf4_model_dir: Path) -> None:
    """A repo may ship another layout beside the model's own (Mistral's consolidated.safetensors)."""
    folder = tmp_path / "two_layouts"
    shutil.copytree(nf4_model_dir, folder)
    save_file({"layers.0.attention.wq.weight": torch.zeros(4, 4)}, str(folder / "consolidated.safetensors"))
    model = load_torchao_nf4(str(folder), dtype=torch.float32, device=CPU, shards=1)
    assert sum(is_nf4(p) for p in model.parameters()) == 14


def test_a_plan_made_for_auto_is_used_by_the_loader_without_reading_the_headers_again(nf4_model_dir: Path,
                                                                                    monkeypatch) -> None:
    """train/setup.py plans once: "auto" decides from the plan, the loader builds from it (a 70B model's structure
    and headers take seconds)."""
    from tunelab.model import nf4

    plan, why = nf4.auto_plan(str(nf4_model_dir), 2, dtype=torch.float32)
    assert why is None and nf4.unsuitable_plan(plan, 8).startswith("only 6 of its 14")
    assert nf4.auto_plan(str(nf4_model_dir), 8, dtype=torch.float32)[0] is None
    calls = []
    monkeypatch.setattr(nf4, "plan_load", lambda *a, **k: calls.append(a) or pytest.fail("planned twice"))
    model = load_torchao_nf4(str(nf4_model_dir), dtype=torch.float32, device=CPU, shards=2, plan=plan)
    assert model is plan.model and calls == []
    assert sum(is_nf4(p) for p in model.parameters()) == 14
