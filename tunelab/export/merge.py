"""Merge a PEFT adapter into its base model and save a plain Hugging Face model folder (sharded safetensors,
tokenizer, chat template), loadable without peft. An adapter exported by tunelab passes on its tokenizer (the
run's chat template) and tunelab.json, and its stop ids go into the merged generation_config.json."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from tunelab import ui
from tunelab.data.sidecar import read_sidecar, write_sidecar, write_stop_ids
from tunelab.errors import ConfigError
from tunelab.export.output import staged_output
from tunelab.model.adapters import attach_adapter, check_adapter
from tunelab.model.load import choose_device, load_model, load_tokenizer, resolve_model_path


def merge_adapter(base: str, adapter: str | Path, out: str | Path, max_shard_size: str = "2GB",
                  device: str = "cpu", trust_remote_code: bool = False, overwrite: bool = False) -> Path:
    out = Path(out)
    max_bytes = shard_bytes(max_shard_size)  # a typo here should not cost a model load
    base_path = resolve_model_path(base)
    dev = choose_device(device)
    check_adapter(adapter, base_path, trust_remote_code)
    trained = read_sidecar(adapter)  # a broken tunelab.json is reported before the model loads
    with staged_output(out, overwrite) as tmp:
        cfg_file = Path(base_path) / "config.json"
        saved_dtype = None
        if cfg_file.exists():
            meta = json.loads(cfg_file.read_text())
            saved_dtype = meta.get("dtype") or meta.get("torch_dtype")
        # Merge in fp32 (peft computes a bf16 delta in bf16 on a GPU, a second rounding), then save in the base
        # model's own dtype: one rounding of W + delta, the least a bf16 file can hold.
        dtype = getattr(torch, saved_dtype) if isinstance(saved_dtype, str) and hasattr(torch, saved_dtype) \
            else torch.float32
        model = load_model(base_path, dtype=torch.float32, device=dev, trust_remote_code=trust_remote_code)
        ui.info(f"merging {adapter} into {base_path}")
        model = attach_adapter(model, str(adapter), base_path).merge_and_unload().to(dtype)
        model.config.use_cache = True
        model.save_pretrained(str(tmp), safe_serialization=True, max_shard_size=max_bytes)
        tok_src = str(adapter) if (Path(adapter) / "tokenizer_config.json").exists() else base_path
        tokenizer = load_tokenizer(tok_src, trust_remote_code)
        tokenizer.save_pretrained(str(tmp))
        if trained is not None:
            write_stop_ids(tmp, tokenizer, trained.stop_words)
            write_sidecar(tmp, trained)
    ui.info(f"wrote merged model to {out}")
    return out


def shard_bytes(size: str) -> int:
    """'2GB', '500MB', '100KB' (or a number of bytes) -> bytes; a clear error for anything else."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(size), flags=re.IGNORECASE)
    if not m:
        raise ConfigError(f"--max-shard-size: cannot read '{size}' (write it like 2GB, 500MB or 100KB)")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = " KMGT".index(unit[0]) if unit[0] in "KMGT" else 0
    return int(float(m.group(1)) * base**power)
