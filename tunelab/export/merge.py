"""Merge a PEFT adapter into its base model and save a plain Hugging Face model folder (sharded safetensors,
tokenizer, chat template), loadable without peft."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tunelab import ui
from tunelab.export.output import staged_output
from tunelab.infer.generate import attach_adapter
from tunelab.model.load import choose_device, load_model, load_tokenizer, resolve_model_path


def merge_adapter(base: str, adapter: str | Path, out: str | Path, max_shard_size: str = "2GB",
                  device: str = "cpu", trust_remote_code: bool = False, overwrite: bool = False) -> Path:
    out = Path(out)
    base_path = resolve_model_path(base)
    dev = choose_device(device)
    with staged_output(out, overwrite) as tmp:
        cfg_file = Path(base_path) / "config.json"
        saved_dtype = None
        if cfg_file.exists():
            meta = json.loads(cfg_file.read_text())
            saved_dtype = meta.get("dtype") or meta.get("torch_dtype")
        # Load and save in the base model's own dtype (peft computes each LoRA delta in fp32 before adding it).
        dtype = getattr(torch, saved_dtype) if isinstance(saved_dtype, str) and hasattr(torch, saved_dtype) \
            else torch.float32
        model = load_model(base_path, dtype=dtype, device=dev, trust_remote_code=trust_remote_code)
        ui.info(f"merging {adapter} into {base_path}")
        model = attach_adapter(model, str(adapter), base_path).merge_and_unload()
        model.config.use_cache = True
        model.save_pretrained(str(tmp), safe_serialization=True, max_shard_size=max_shard_size)
        tok_src = str(adapter) if (Path(adapter) / "tokenizer_config.json").exists() else base_path
        load_tokenizer(tok_src, trust_remote_code).save_pretrained(str(tmp))
    ui.info(f"wrote merged model to {out}")
    return out
