"""Checkpoint -> PEFT adapter that peft loads unchanged; merge -> plain model with the same outputs; wrong
base model and existing output folders are refused without touching anything."""

import json

import pytest
import torch

from tests.conftest import chat_records, tiny_config, write_jsonl
from tunelab.config.load import load_config
from tunelab.errors import ModelError, OutputExistsError
from tunelab.export.merge import merge_adapter
from tunelab.export.to_hf import checkpoint_to_hf
from tunelab.train.loop import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("export")
    data = write_jsonl(tmp / "data.jsonl", chat_records(8))
    cfg = load_config(tiny_config(tmp, tiny_model_dir, data), ["train.max_steps=3", "train.lr=5e-2"])
    res = train(cfg, "tiny", work_dir=tmp / "work")
    return tmp, cfg, res


def test_to_hf_writes_a_peft_adapter_that_peft_loads(trained, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp, cfg, res = trained
    out = checkpoint_to_hf(cfg, str(res.checkpoint) + ".pth", tmp / "adapter")  # XTuner's iter_N.pth name works
    names = sorted(p.name for p in out.iterdir())
    assert "adapter_model.safetensors" in names and "adapter_config.json" in names
    assert "tokenizer.json" in names and "README.md" in names
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)
    assert AutoTokenizer.from_pretrained(str(out)).chat_template  # the chat template travels with it
    side = json.loads((out / "tunelab.json").read_text())
    assert side["prompt_template"] == "hf" and side["system"] is None and side["stop_words"] == ["<|im_end|>"]
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    model = PeftModel.from_pretrained(base, str(out))
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_merged_model_gives_the_same_logits_as_base_plus_adapter(trained, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tmp, cfg, res = trained
    adapter = tmp / "adapter2"
    checkpoint_to_hf(cfg, tmp / "work", adapter)  # the work dir means its last checkpoint
    merged = merge_adapter(str(tiny_model_dir), adapter, tmp / "merged", max_shard_size="100KB")
    shards = sorted(p.name for p in merged.glob("*.safetensors"))
    assert len(shards) > 1 and (merged / "model.safetensors.index.json").exists()  # sharded
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(str(merged))(ids).logits
        ref_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(adapter))
        ref = ref_model(ids).logits
        base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))(ids).logits
    torch.testing.assert_close(plain, ref, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(plain, base, atol=1e-3)  # the adapter changed something


def test_merge_into_another_base_model_is_a_clear_error(trained, tmp_path):
    tmp, cfg, res = trained
    adapter = tmp / "adapter3"
    checkpoint_to_hf(cfg, res.checkpoint, adapter)
    other = tmp_path / "other_base"
    from tests.conftest import build_tiny_tokenizer
    tok = build_tiny_tokenizer(other)
    from transformers import LlamaConfig, LlamaForCausalLM
    LlamaForCausalLM(LlamaConfig(hidden_size=48, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                                 num_hidden_layers=2, vocab_size=len(tok))).save_pretrained(str(other))
    out = tmp_path / "merged"
    with pytest.raises(ModelError, match=r"does not fit base model .*size mismatch"):
        merge_adapter(str(other), adapter, out)
    assert not out.exists() and not list(tmp_path.glob(".merged.tmp*"))  # nothing half-written


def _other_depth_base(folder, layers: int):
    """The same shapes as the tiny model, with another number of layers."""
    from tests.conftest import build_tiny_model, build_tiny_tokenizer

    tok = build_tiny_tokenizer(folder)
    build_tiny_model(folder, len(tok), layers=layers)
    return folder


@pytest.mark.parametrize("layers,problem", [(1, r"the base has no base_model\.model\.model\.layers\.1\."),
                                            (3, r"the adapter has no base_model\.model\.model\.layers\.2\.")])
def test_an_adapter_of_another_depth_is_refused_before_loading(trained, tmp_path, layers, problem):
    """peft would silently drop (or leave untrained) the layers that do not match; tunelab refuses."""
    tmp, cfg, res = trained
    adapter = tmp / f"adapter_depth{layers}"
    if not adapter.exists():
        checkpoint_to_hf(cfg, res.checkpoint, adapter)
    other = _other_depth_base(tmp_path / "base", layers)
    with pytest.raises(ModelError, match=f"does not fit base model {other}: {problem}"):
        merge_adapter(str(other), adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    other_cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": str(other)})})
    with pytest.raises(ModelError, match=f"does not fit base model {other}: {problem}"):
        checkpoint_to_hf(other_cfg, res.checkpoint, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_a_bad_max_shard_size_is_refused_before_the_model_loads(trained, tmp_path, tiny_model_dir):
    from tunelab.errors import ConfigError
    from tunelab.export.merge import shard_bytes

    tmp, cfg, res = trained
    with pytest.raises(ConfigError, match="--max-shard-size: cannot read 'bogus'"):
        merge_adapter(str(tiny_model_dir), tmp / "no_adapter_needed", tmp_path / "m", max_shard_size="bogus")
    assert (shard_bytes("2GB"), shard_bytes("500MB"), shard_bytes("1GiB"), shard_bytes("100kb")) == \
        (2 * 10**9, 500 * 10**6, 2**30, 100_000)


def test_existing_non_empty_output_is_refused_and_kept(trained):
    tmp, cfg, res = trained
    out = tmp / "taken"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="already exists and is not empty"):
        checkpoint_to_hf(cfg, res.checkpoint, out)
    assert (out / "precious.txt").read_text() == "keep me"


def test_to_hf_exports_the_template_the_checkpoint_was_trained_with(trained, tmp_path):
    """The config given to convert may say something else than the run did: the checkpoint's config.yaml wins."""
    from tunelab import ui

    _, cfg, res = trained
    edited = cfg.model_copy(update={"data": cfg.data.model_copy(update={"prompt_template": "qwen_chat",
                                                                        "system": "Edited."})})
    seen: list[str] = []

    def sink(key: str, msg: str) -> None:
        seen.append(msg)

    ui.add_warning_sink(sink)
    try:
        out = checkpoint_to_hf(edited, res.checkpoint, tmp_path / "adapter")
    finally:
        ui.remove_warning_sink(sink)
    side = json.loads((out / "tunelab.json").read_text())
    assert (side["prompt_template"], side["system"]) == ("hf", None)
    assert seen == [("the checkpoint was trained with prompt template hf (its config.yaml), the config given says "
                     "qwen_chat; exporting hf")]


def test_a_base_without_chat_template_exports_without_prompt_files(trained, tmp_path, tiny_model_dir):
    """Pre-training text needs no chat template; the export then has nothing to carry and says nothing."""
    import shutil

    _, cfg, res = trained
    base = tmp_path / "plain_base"
    shutil.copytree(tiny_model_dir, base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    tok_cfg = json.loads((base / "tokenizer_config.json").read_text())
    tok_cfg.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    plain = cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": str(base)})})
    out = checkpoint_to_hf(plain, res.checkpoint, tmp_path / "adapter")
    assert (out / "adapter_model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert not (out / "tunelab.json").exists() and not (out / "chat_template.jinja").exists()


def test_a_full_model_export_carries_template_and_stop_ids(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    data = write_jsonl(tmp_path / "data.jsonl", chat_records(4))
    cfg = load_config(tiny_config(tmp_path, tiny_model_dir, data, model={"lora": None}),
                      ["train.max_steps=1", "data.prompt_template=qwen_chat", "data.system=Be brief."])
    res = train(cfg, "tiny_full", work_dir=tmp_path / "work")
    out = checkpoint_to_hf(cfg, res.checkpoint, tmp_path / "full")
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    gen = GenerationConfig.from_pretrained(str(out))
    assert gen.eos_token_id == ids and gen.bos_token_id == 3  # the stop ids added, the model's own kept
    assert json.loads((out / "tunelab.json").read_text())["system"] == "Be brief."
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True) \
        == "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    AutoModelForCausalLM.from_pretrained(str(out))


def test_a_bf16_base_is_merged_in_fp32_and_saved_in_bf16_within_its_tolerance(trained, tmp_path, tiny_model_dir):
    """The merged bf16 model gives base + adapter's logits (computed in fp32) within bf16's tolerance: one
    rounding of W + delta, not a bf16 delta added in bf16."""
    import shutil

    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    tmp, cfg, res = trained
    base = tmp_path / "bf16_base"
    shutil.copytree(tiny_model_dir, base)
    AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16).save_pretrained(str(base))
    adapter = tmp / "adapter_for_bf16"
    if not adapter.exists():
        checkpoint_to_hf(cfg, res.checkpoint, adapter)
    merged = merge_adapter(str(base), adapter, tmp_path / "merged")
    with safe_open(str(merged / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (safe_open is no dict) == {"BF16"}
    assert json.loads((merged / "config.json").read_text())["dtype"] == "bfloat16"
    ids = torch.tensor([[5, 17, 42, 99, 7, 8, 9, 10]])
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32)(ids).logits
        ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
                                        str(adapter))(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)(ids).logits
    bf16_rtol = 1.6e-2  # torch.testing's tolerance for bfloat16
    torch.testing.assert_close(got, ref, rtol=bf16_rtol, atol=bf16_rtol * float(ref.abs().max()))
    assert (ref - plain).abs().max() > 10 * (got - ref).abs().max()  # the adapter's effect survives the rounding


@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_output_folders_follow_the_process_umask(trained, tmp_path, tiny_model_dir, umask, file_mode, dir_mode):
    """Not mkdtemp's 0700 nor a writer's 0600: a server or container running as another user reads them."""
    import os
    import stat

    from tunelab.export.app import export_app

    _, cfg, res = trained
    old = os.umask(umask)
    try:
        outs = [checkpoint_to_hf(cfg, res.checkpoint, tmp_path / "adapter")]
        outs.append(merge_adapter(str(tiny_model_dir), outs[0], tmp_path / "merged"))
        outs.append(export_app(str(outs[1]), tmp_path / "space"))
    finally:
        os.umask(old)
    for out in outs:
        for p in [out, *out.rglob("*")]:
            mode = stat.S_IMODE(p.stat().st_mode)
            assert mode == (dir_mode if p.is_dir() else file_mode), (p, oct(mode))
