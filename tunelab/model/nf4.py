"""4-bit NF4 weights that FSDP2 shards well: torchao's NF4Tensor, loaded straight from the safetensors files.

QLoRA has two NF4 formats (config `model.nf4_format`):
- bitsandbytes (model/load.py): what one process uses. Its packed weights can be stored in bf16 so that FSDP2
  shards them (the FSDP-QLoRA recipe), but its layers then break the compiled graph once per layer and wait for
  the host inside the step: on 2 H200s, QLoRA under zero3 ran 4,282 tok/s per GPU that way.
- torchao's NF4Tensor: a tensor subclass with its own FSDP2 all-gather hooks (the packed data, the scales and the
  quantized scales travel as they are) that compiles without a break: 7,008 tok/s per GPU on the same run
  (bench/qlora_sharding.py, BENCHMARKS.md). In one process it is 8% slower than bitsandbytes (11,564 vs 12,604), so
  "auto" takes it only where several processes shard the weights.

Both quantize blocks of 64 weights with an absmax scale, the scales again in blocks of 256 (double quantization).
A weight whose blocks would straddle two processes' shards stays in the compute dtype (tiny layers only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tunelab.errors import ModelError

BLOCK = 64
SCALER_BLOCK = 256


def quantizable(shape: torch.Size | tuple[int, ...], shards: int) -> bool:
    """Can a weight of this shape be NF4 on each of `shards` processes (FSDP2 splits rows evenly)?"""
    if len(shape) != 2 or shape[0] % shards:
        return False
    return (shape[0] * shape[1] // shards) % (BLOCK * SCALER_BLOCK) == 0


def weight_files(folder: Path) -> list[Path]:
    """The model's safetensors files as transformers reads them: those its index names, else model.safetensors,
    else every *.safetensors (some repos also ship other layouts, e.g. Mistral's consolidated.safetensors)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        import json

        return [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (folder / "model.safetensors").exists():
        return [folder / "model.safetensors"]
    return sorted(folder.glob("*.safetensors"))


def is_nf4(t: torch.Tensor) -> bool:
    local = t.to_local() if hasattr(t, "to_local") else t
    return type(local).__name__ == "NF4Tensor"


def load_torchao_nf4(path: str, *, dtype: torch.dtype, device: torch.device, shards: int,
                     attn_implementation: str = "sdpa", trust_remote_code: bool = False,
                     revision: str | None = None) -> Any:
    """The model with every decoder linear weight as an NF4Tensor on `device`. The structure is built without
    memory, then each tensor goes from the files to the device one at a time and is quantized there: the device
    never holds the whole model in the compute dtype, and host memory holds no copy of it."""
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        from torchao.quantization import to_nf4
    except ImportError:
        raise ModelError("model.nf4_format torchao needs torchao (pip install torchao)") from None
    if device.type == "cpu":
        from tunelab import ui
        from tunelab.model.load import CPU_QUANTIZATION_WARNING

        ui.warn("quantized_on_cpu", CPU_QUANTIZATION_WARNING.format(quantization="nf4"))
    folder = Path(path)
    files = weight_files(folder) if folder.is_dir() else []
    if not files:
        raise ModelError(f"{path}: model.nf4_format torchao loads *.safetensors files from a local folder")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
        with init_empty_weights(include_buffers=False):  # parameters without memory; buffers (rotary tables) real
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation,
                                                     trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001  (any failure of the model's own code: one line)
        raise ModelError(f"cannot build the model of {path}: {str(e).strip().splitlines()[0][:300]}") from None
    for mod in model.modules():
        for name, buf in mod._buffers.items():
            if buf is not None:
                mod._buffers[name] = buf.to(device)
    head = model.get_output_embeddings()
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    buffers = {n for n, _ in model.named_buffers()}  # computed from the config (older files save rotary tables)
    prefix = getattr(model, "base_model_prefix", "")
    unknown: list[str] = []
    for file in files:
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for key in f.keys():
                name = key if key in names else f"{prefix}.{key}" if f"{prefix}.{key}" in names else None
                if name is None and (key in buffers or f"{prefix}.{key}" in buffers):
                    continue
                if name is None:
                    unknown.append(key)
                    continue
                t = f.get_tensor(key)
                t = t.to(dtype) if t.is_floating_point() else t
                if name in linear and quantizable(t.shape, shards):
                    t = to_nf4(t, BLOCK, SCALER_BLOCK)
                owner, _, attr = name.rpartition(".")
                setattr(model.get_submodule(owner), attr, torch.nn.Parameter(t, requires_grad=False))
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if unknown or missing:
        raise ModelError(f"{path}: its weight names do not match {type(model).__name__} "
                         f"({len(unknown)} unknown, e.g. {unknown[:2]}; {len(missing)} missing, e.g. {missing[:2]}); "
                         "model.nf4_format torchao needs a checkpoint in transformers' own layout "
                         "(use model.nf4_format: bitsandbytes)")
    if (folder / "generation_config.json").exists():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path)
    model.config.use_cache = False
    return model
