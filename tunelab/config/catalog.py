"""Built-in configs, generated from one table: model x method x dataset.

Names follow XTuner's pattern, `<model>_<method>_<dataset>_e<epochs>`, e.g. `internlm2_chat_1_8b_qlora_alpaca_e3`.
`copy-cfg` writes one as commented YAML that a beginner can edit.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tunelab.config.schema import Config
from tunelab.errors import ConfigError, TunelabError


@dataclass(frozen=True)
class ModelEntry:
    path: str
    template: str
    max_length: int = 2048
    # Remote-code models: the config says so, but trust_remote_code stays off until the user turns it on.
    needs_remote_code: bool = False
    lora_lr: float | None = None  # replaces the method's lr for LoRA/QLoRA
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-section overrides


@dataclass(frozen=True)
class MethodEntry:
    model: dict[str, Any]
    lr: float


@dataclass(frozen=True)
class DatasetEntry:
    data: dict[str, Any]
    epochs: int
    evaluation_inputs: tuple[str, ...]
    methods: tuple[str, ...] = ("qlora", "lora", "full")


MODELS: dict[str, ModelEntry] = {
    # Small enough for a laptop CPU: shorter rows, no activation checkpointing, a higher LoRA lr.
    "smollm2_135m_instruct": ModelEntry(
        "smollm2-135m-instruct", "hf", max_length=512, lora_lr=1e-3,
        extra={"model": {"gradient_checkpointing": False}, "train": {"accumulative_counts": 4}}),
    "internlm2_chat_1_8b": ModelEntry("internlm/internlm2-chat-1_8b", "internlm2_chat", needs_remote_code=True),
    "internlm2_chat_7b": ModelEntry("internlm/internlm2-chat-7b", "internlm2_chat", needs_remote_code=True),
    "qwen2_5_0_5b_instruct": ModelEntry("Qwen/Qwen2.5-0.5B-Instruct", "qwen_chat"),
    "qwen2_5_1_5b_instruct": ModelEntry("Qwen/Qwen2.5-1.5B-Instruct", "qwen_chat"),
    "qwen2_5_7b_instruct": ModelEntry("Qwen/Qwen2.5-7B-Instruct", "qwen_chat"),
    "llama3_8b_instruct": ModelEntry("meta-llama/Meta-Llama-3-8B-Instruct", "llama3_chat"),
}

_LORA = {"r": 64, "alpha": 16, "dropout": 0.1, "target_modules": "all-linear"}
METHODS: dict[str, MethodEntry] = {
    "qlora": MethodEntry({"quantization": "nf4", "lora": _LORA}, lr=2e-4),
    "lora": MethodEntry({"quantization": "none", "lora": _LORA}, lr=2e-4),
    "full": MethodEntry({"quantization": "none", "lora": None}, lr=2e-5),
}

_SHANGHAI = ("请给我介绍五个上海的景点", "Please tell me five scenic spots in Shanghai")
DATASETS: dict[str, DatasetEntry] = {
    "alpaca": DatasetEntry({"path": "tatsu-lab/alpaca", "format": "alpaca"}, 3, _SHANGHAI),
    "oasst1": DatasetEntry({"path": "timdettmers/openassistant-guanaco", "format": "oasst1"}, 3, _SHANGHAI),
    "openai_json": DatasetEntry({"path": "data/custom.jsonl", "format": "openai"}, 3, _SHANGHAI),
    "self_cognition": DatasetEntry({"path": "data/self_cognition.jsonl", "format": "openai"}, 3,
                                   ("请介绍一下你自己", "Please introduce yourself")),
    "custom_pretrain": DatasetEntry({"path": "data/pretrain.txt", "format": "pretrain"}, 1,
                                    ("上海是", "Shanghai is")),
}


def config_name(model: str, method: str, dataset: str) -> str:
    return f"{model}_{method}_{dataset}_e{DATASETS[dataset].epochs}"


def _table() -> dict[str, tuple[str, str, str]]:
    out = {}
    for m in MODELS:
        for d, entry in DATASETS.items():
            for meth in METHODS:
                if meth in entry.methods:
                    out[config_name(m, meth, d)] = (m, meth, d)
    return out


CATALOG = _table()


def list_configs(pattern: str | None = None) -> list[str]:
    names = sorted(CATALOG)
    if pattern:
        pat = pattern if any(c in pattern for c in "*?[") else f"*{pattern}*"
        names = [n for n in names if fnmatch.fnmatch(n, pat)]
    return names


def near_models(pattern: str) -> list[str]:
    """The models whose config names hold every word of a pattern that matched none, in any order, e.g.
    'internlm2_1_8b' (the XTuner tutorial's spelling) -> ['internlm2_chat_1_8b']."""
    words = [w for w in re.split(r"[_\W]+", pattern.lower()) if w]
    return sorted({CATALOG[n][0] for n in CATALOG if words and all(w in n.split("_") for w in words)})


def build_config(name: str) -> dict[str, Any]:
    """The raw (unvalidated) config dict of a built-in config."""
    model_key, method_key, data_key = CATALOG[name]
    m, meth, d = MODELS[model_key], METHODS[method_key], DATASETS[data_key]
    pretrain = data_key == "custom_pretrain"
    raw: dict[str, Any] = {
        "model": {"path": m.path, "trust_remote_code": False, **meth.model, "gradient_checkpointing": "auto"},
        "data": {**d.data, "prompt_template": m.template, "system": None,
                 "max_length": m.max_length, "pack_to_max_length": True},
        "train": {"batch_size": 1, "accumulative_counts": 16, "max_epochs": d.epochs,
                  "lr": meth.lr, "betas": [0.9, 0.999],
                  "weight_decay": 0.0, "max_norm": 1.0, "warmup_ratio": 0.03, "dtype": "auto", "strategy": "ddp"},
        "runtime": {"log_interval": 10, "save_steps": 500, "save_total_limit": 2,
                    "evaluation_freq": 500, "evaluation_inputs": list(d.evaluation_inputs)},
    }
    if m.lora_lr and meth.model["lora"] is not None:
        raw["train"]["lr"] = m.lora_lr
    for section, values in m.extra.items():
        raw[section].update(values)
    if pretrain:
        raw["data"]["prompt_template"] = "hf"  # unused for plain text, kept for chat evaluation
    Config.model_validate(raw)  # every built-in config must validate
    return raw


_COMMENTS = {
    "model": "PART 1/4 model: what to fine-tune and how (XTuner parts 1-2)",
    "model.path": "local folder, hub id, or smollm2-135m-instruct (the embedded default, offline)",
    "model.trust_remote_code": "run the model repo's own Python code; only for repos you trust",
    "model.quantization": "none | nf4 (QLoRA) | int8",
    "model.lora": "LoRA adapter; null = full fine-tuning",
    "model.gradient_checkpointing": "auto | true | false | offload: recompute activations in backward (less memory, "
                                    "~30% slower); auto = where memory needs it",
    "data": "PART 2/4 data (XTuner part 3)",
    "data.path": "file, list of files, folder, hub dataset id or save_to_disk folder",
    "data.format": "auto | openai | conversation | alpaca | sharegpt | oasst1 | pretrain",
    "data.prompt_template": "XTuner template name (internlm2_chat, qwen_chat, llama3_chat, ...) or hf",
    "data.system": "system prompt added to every sample that has none",
    "data.max_length": "longer samples are truncated (and counted)",
    "data.pack_to_max_length": "pack samples into max_length rows; samples never attend to each other",
    "train": "PART 3/4 optimizer and schedule (XTuner part 4)",
    "train.batch_size": "rows per micro-batch (per GPU)",
    "train.accumulative_counts": "micro-batches per optimizer step",
    "train.max_epochs": "passes over the data",
    "train.lr": "peak learning rate (linear warmup, then cosine)",
    "train.warmup_ratio": "share of all steps spent warming up (at least one step)",
    "train.dtype": "auto | float32 | bfloat16 | float16",
    "train.strategy": "several GPUs: ddp | zero1 | zero2 | zero2_offload | zero3 | zero3_offload (= --deepspeed)",
    "runtime": "PART 4/4 logging, checkpoints, evaluation (XTuner part 5)",
    "runtime.save_steps": "save a checkpoint every N optimizer steps (and at the end)",
    "runtime.save_total_limit": "checkpoints to keep (-1 = all)",
    "runtime.evaluation_freq": "chat with the model every N steps (and at the end)",
    "runtime.evaluation_inputs": "questions asked at each evaluation",
}


def render_yaml(raw: dict[str, Any], header: str = "") -> str:
    """Commented YAML for a raw config dict: one key per line, sections in the documented order."""
    out = [f"# {line}" if line else "#" for line in header.splitlines()] if header else []
    for section in ("model", "data", "train", "runtime"):
        if section not in raw:
            continue
        out.append("")
        out.append(f"# {_COMMENTS[section]}")
        out.append(f"{section}:")
        for key, value in raw[section].items():
            text = _scalar(value)
            comment = _COMMENTS.get(f"{section}.{key}")
            if isinstance(value, dict):
                out.append(f"  {key}:" + (f"  # {comment}" if comment else ""))
                for k2, v2 in value.items():
                    out.append(f"    {k2}: {_scalar(v2)}")
            else:
                out.append(f"  {key}: {text}" + (f"  # {comment}" if comment else ""))
    return "\n".join(out).lstrip("\n") + "\n"


def _scalar(v: Any) -> str:
    return yaml.safe_dump(v, default_flow_style=True, allow_unicode=True, width=1000).strip().removesuffix(
        "\n...").removesuffix("...").strip()


def copy_header(name: str) -> str:
    model_key = CATALOG[name][0]
    lines = [f"tunelab config {name}", "Edit, then: tunelab train THIS_FILE   (override any key: data.max_length=512)"]
    if MODELS[model_key].needs_remote_code:
        lines.append(f"{MODELS[model_key].path} ships its own modelling code: set model.trust_remote_code: true "
                     "only if you trust that repository.")
    return "\n".join(lines)


def copy_config(name: str, out_dir: Path, overwrite: bool = False) -> Path:
    """Write the built-in config `name` as commented YAML to out_dir/NAME_copy.yaml; returns the file."""
    if name not in CATALOG:
        close = difflib.get_close_matches(name, list(CATALOG), n=1)
        raise ConfigError(f"no built-in config '{name}'" + (f"; did you mean '{close[0]}'?" if close else ""))
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{name}_copy.yaml"
    if out.exists() and not overwrite:
        raise TunelabError(f"{out} already exists; pass --overwrite to replace it")
    out.write_text(render_yaml(build_config(name), copy_header(name)), encoding="utf-8")
    return out
