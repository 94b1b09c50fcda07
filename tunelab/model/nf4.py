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
A weight whose blocks would straddle two processes' shards stays in the compute dtype (attention weights of small
models, e.g. SmolLM2's): "auto" then keeps bitsandbytes, as it does for weights transformers renames on load
(MoE models), checkpoints that are not local safetensors folders, and hub ids (`torchao_unsuitable`).
"""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass
class LoadPlan:
    """Which file holds which parameter, worked out from the files' headers before any tensor is read."""

    model: Any  # the structure, parameters on the meta device
    files: list[Path]
    names: dict[str, str]  # file key -> parameter name
    unknown: list[str]  # keys the model has no parameter for
    missing: list[str]  # parameters no file holds
    linear: set[str]  # the decoder's linear weights (the output head excluded)
    shapes: dict[str, tuple[int, ...]]  # parameter name -> its shape in the files

    def quantizable(self, shards: int) -> tuple[int, int]:
        """(how many decoder linear weights can be NF4 on `shards` processes, how many there are)."""
        ok = sum(quantizable(self.shapes[n], shards) for n in self.linear if n in self.shapes)
        return ok, len(self.linear)


def plan_load(path: str, *, dtype: torch.dtype, attn_implementation: str = "sdpa", trust_remote_code: bool = False,
              revision: str | None = None) -> LoadPlan:
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(path)
    files = weight_files(folder) if folder.is_dir() else []
    if not files:
        raise ModelError(f"{path}: torchao's NF4 weights load from *.safetensors files in a local folder")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
        with init_empty_weights(include_buffers=False):  # parameters without memory; buffers (rotary tables) real
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation,
                                                     trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001  (any failure of the model's own code: one line)
        raise ModelError(f"cannot build the model of {path}: {str(e).strip().splitlines()[0][:300]}") from None
    head = model.get_output_embeddings()
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}
    every = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    buffers = {n for n, _ in model.named_buffers()}  # computed from the config (older files save rotary tables)
    prefix = getattr(model, "base_model_prefix", "")
    names: dict[str, str] = {}
    unknown: list[str] = []
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                name = key if key in every else f"{prefix}.{key}" if f"{prefix}.{key}" in every else None
                if name is None:
                    if key not in buffers and f"{prefix}.{key}" not in buffers:
                        unknown.append(key)
                    continue
                names[key] = name
                shapes[name] = tuple(f.get_slice(key).get_shape())
    held = set(names.values())
    missing = [n for n, _ in model.named_parameters() if n not in held]  # tied weights appear once
    return LoadPlan(model, files, names, unknown, missing, linear, shapes)


def auto_plan(path: str, shards: int, **build: Any) -> tuple[LoadPlan | None, str | None]:
    """nf4_format auto's question, from the config and the files' headers alone: (the plan load_torchao_nf4 then
    loads from, None), or (None, why torchao's NF4 cannot stand in for bitsandbytes' on this model and process
    count: "auto" keeps bitsandbytes)."""
    try:
        plan = plan_load(path, **{"dtype": torch.bfloat16, **build})
    except ModelError as e:
        return None, str(e)
    why = unsuitable_plan(plan, shards)
    return (None, why) if why else (plan, None)


def torchao_unsuitable(path: str, shards: int, **build: Any) -> str | None:
    return auto_plan(path, shards, **build)[1]


def unsuitable_plan(plan: LoadPlan, shards: int) -> str | None:
    if plan.unknown or plan.missing:
        return "its weight names differ from the model's (transformers renames them on load)"
    ok, total = plan.quantizable(shards)
    if ok < total:
        return (f"only {ok} of its {total} linear weights split into whole 64 x 256 blocks over "
                f"{_processes(shards)}")
    return None


def _processes(shards: int) -> str:
    return f"{shards} process{'es' if shards != 1 else ''}"


def load_torchao_nf4(path: str, *, dtype: torch.dtype, device: torch.device, shards: int,
                     attn_implementation: str = "sdpa", trust_remote_code: bool = False,
                     revision: str | None = None, plan: LoadPlan | None = None) -> Any:
    """The model with every decoder linear weight as an NF4Tensor on `device`. The structure is built without
    memory and matched against the files' headers first (or `plan`, made by plan_load with the same settings and
    used up here); then each tensor goes from the files to the device one at a time and is quantized there: the
    device never holds the whole model in the compute dtype, and host memory holds no copy of it."""
    from safetensors import safe_open

    try:
        from torchao.quantization import to_nf4
    except ImportError:
        raise ModelError("model.nf4_format torchao needs torchao (pip install torchao)") from None
    plan = plan or plan_load(path, dtype=dtype, attn_implementation=attn_implementation,
                             trust_remote_code=trust_remote_code, revision=revision)
    model = plan.model
    if plan.unknown or plan.missing:
        raise ModelError(f"{path}: its weight names do not match {type(model).__name__} "
                         f"({len(plan.unknown)} unknown, e.g. {plan.unknown[:2]}; {len(plan.missing)} missing, e.g. "
                         f"{plan.missing[:2]}): transformers renames them on load, which torchao's NF4 loading "
                         "does not; set model.nf4_format: bitsandbytes")
    ok, total = plan.quantizable(shards)
    from tunelab import ui

    if ok < total:
        ui.warn("nf4_partial", f"torchao quantizes {ok} of the {total} linear weights of {path} to NF4 over "
                               f"{_processes(shards)}; the others stay in {str(dtype).removeprefix('torch.')} (a "
                               "process's share of a weight must hold whole blocks of 64 x 256)")
    if device.type == "cpu":
        from tunelab.model.load import CPU_QUANTIZATION_WARNING

        ui.warn("quantized_on_cpu", CPU_QUANTIZATION_WARNING.format(quantization="nf4"))
    for mod in model.modules():
        for name, buf in mod._buffers.items():
            if buf is not None:
                mod._buffers[name] = buf.to(device)
    for file in plan.files:
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for key in f.keys():
                name = plan.names.get(key)
                if name is None:
                    continue
                t = f.get_tensor(key)
                t = t.to(dtype) if t.is_floating_point() else t
                if name in plan.linear and quantizable(t.shape, shards):
                    t = to_nf4(t, BLOCK, SCALER_BLOCK)
                owner, _, attr = name.rpartition(".")
                setattr(model.get_submodule(owner), attr, torch.nn.Parameter(t, requires_grad=False))
    model.tie_weights()
    if (Path(path) / "generation_config.json").exists():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path)
    model.config.use_cache = False
    return model
