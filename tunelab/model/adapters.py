"""What is trainable: LoRA/DoRA adapters through peft (LoRA, QLoRA), or every weight (full fine-tuning); and a
saved adapter checked against a base model and attached to it."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from tunelab.config.schema import ALL_LINEAR, LoraSettings
from tunelab.errors import ConfigError, ModelError


def linear_module_names(model: Any) -> list[str]:
    """Names (last component) of the decoder's linear layers, the output head excluded."""
    head = model.get_output_embeddings()
    names = set()
    for name, mod in model.named_modules():
        if mod is head:
            continue
        cls = type(mod).__name__
        if isinstance(mod, torch.nn.Linear) or cls in ("Linear4bit", "Linear8bitLt"):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def add_lora(model: Any, lora: LoraSettings) -> Any:
    from peft import LoraConfig, get_peft_model

    available = linear_module_names(model)
    if lora.target_modules == ALL_LINEAR:
        targets = available
    else:
        missing = [t for t in lora.target_modules if t not in available]
        if missing:
            raise ConfigError(f"model.lora.target_modules: {missing} not in this model "
                              f"(its linear layers: {', '.join(available)})")
        targets = list(lora.target_modules)
    layers = None
    if lora.layers_to_transform:
        n_layers = model.config.num_hidden_layers
        layers = list(range(max(0, n_layers - lora.layers_to_transform), n_layers))
    cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                     use_dora=lora.use_dora, layers_to_transform=layers, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()  # adapter weights and their optimizer state stay in fp32
    return model


def make_full_trainable(model: Any) -> Any:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def enable_checkpointing(model: Any) -> None:
    # Non-reentrant checkpointing needs no input that requires grad, so frozen embeddings are fine.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameters; a 4-bit weight counts as the weight it stands for, not its packed bytes."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(real_numel(p) for p in model.parameters())
    return trainable, total


def real_numel(p: torch.Tensor) -> int:
    """Elements of the weight a parameter stands for (bitsandbytes stores 4-bit weights packed, two per byte)."""
    shape = getattr(getattr(p, "quant_state", None), "shape", None)
    return int(torch.Size(shape).numel()) if shape is not None else p.numel()


def trainable_state(model: Any) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint must hold: trainable parameters only, by their model-side names."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def check_adapter_fits(adapter: Path, base: str, trust_remote_code: bool = False) -> None:
    """Refuse an adapter trained on another base model before any weights are loaded: build the base on the
    meta device (no memory), attach the adapter's config, and compare every tensor's name and shape with the
    adapter file. peft itself would drop unmatched layers silently, or fail deep inside loading."""
    from peft import PeftConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    weights = adapter / "adapter_model.safetensors"
    if not weights.exists():
        raise ModelError(f"{adapter} holds no adapter_model.safetensors")
    try:
        config = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft warns that the config names another base path: we check here
            empty = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
            peft_model = get_peft_model(empty, PeftConfig.from_pretrained(str(adapter)), low_cpu_mem_usage=True)
    except ValueError as e:  # e.g. target modules the base does not have
        raise ModelError(f"adapter {adapter} does not fit base model {base}: {str(e).splitlines()[0][:240]}") \
            from None
    expected = {k: list(v.shape) for k, v in get_peft_model_state_dict(peft_model).items()}
    with safe_open(str(weights), framework="pt") as f:
        found = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    problem = next((f"size mismatch for {k}: the adapter has {found[k]}, the base needs {expected[k]}"
                    for k in sorted(found) if k in expected and found[k] != expected[k]), None)
    problem = problem or next((f"the base has no {k}" for k in sorted(found) if k not in expected), None)
    problem = problem or next((f"the adapter has no {k} (was it trained on a smaller model?)"
                               for k in sorted(expected) if k not in found), None)
    if problem:
        raise ModelError(f"adapter {adapter} does not fit base model {base}: {problem}")


def check_adapter(adapter: str | Path, base: str | None, trust_remote_code: bool = False) -> None:
    """An adapter folder that exists, is peft's, and fits `base` (a clear error line otherwise). `base` None:
    the base is a hub id that is not fetched here, so only the folder is checked."""
    a = Path(adapter)
    if not a.exists():
        raise ModelError(f"adapter folder not found: {a}")
    if not (a / "adapter_config.json").is_file():
        raise ModelError(f"{a} is not a PEFT adapter folder (no adapter_config.json)")
    if base is not None:
        check_adapter_fits(a, base, trust_remote_code)


def attach_adapter(model: Any, adapter: str, base: str) -> Any:
    """peft's own loading; call check_adapter first (it names what does not fit, peft may not)."""
    from peft import PeftModel

    a = Path(adapter)
    try:
        return PeftModel.from_pretrained(model, str(a))
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()
        detail = next((ln.strip() for ln in first if "size mismatch" in ln), first[0] if first else "")
        raise ModelError(f"adapter {a} does not fit base model {base}: {detail[:240]}") from None


def _mergeable(layer: Any) -> bool:
    """A plain LoRA layer over an nn.Linear with an ordinary weight, or over bitsandbytes' 4-bit layer: not DoRA
    or another peft variant, not 8-bit, not a shard."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    four_bit = _is_lora_4bit(layer)
    if not (type(layer) is LoraLinear or four_bit) or layer.merged or layer.disable_adapters:
        return False
    base = layer.get_base_layer()
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    # DoRA's norms, other variants' forward, a bias on lora_B: none of them is in get_delta_weight's delta
    extras = [layer.use_dora, getattr(layer, "lora_bias", {}), getattr(layer, "lora_variant", {})]
    return ((four_bit or type(base) is torch.nn.Linear) and type(base.weight.data) is torch.Tensor and bool(active)
            and not any(d.get(a, False) for d in extras for a in active))


def _is_lora_4bit(layer: Any) -> bool:
    """peft's LoRA layer over bitsandbytes' Linear4bit (QLoRA), its weight not sharded, nor repacked in place for
    bitsandbytes' CPU inference kernels (a layout dequantize_4bit does not read)."""
    if type(layer).__name__ != "Linear4bit" or not hasattr(layer, "lora_A"):
        return False
    weight = layer.get_base_layer().weight
    state = getattr(weight, "quant_state", None)
    return type(weight).__name__ == "Params4bit" and state is not None \
        and not getattr(state, "packing_format_for_cpu", False)


def _base_weight(layer: Any) -> torch.Tensor:
    """The layer's base weight as a new tensor to add into: 4-bit weights dequantized to the dtype the layer
    computes in."""
    weight = layer.get_base_layer().weight
    if _is_lora_4bit(layer):
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, weight.quant_state).to(_merged_dtype(layer))
    return weight.detach().clone()


def _merged_dtype(layer: Any) -> torch.dtype:
    base = layer.get_base_layer()
    if _is_lora_4bit(layer):
        return getattr(base, "compute_dtype", None) or base.weight.quant_state.dtype
    return base.weight.dtype


def _merged_bytes(layer: Any) -> int:
    return real_numel(layer.get_base_layer().weight) * _merged_dtype(layer).itemsize


def _room_for(nbytes: int, largest: int, device: torch.device) -> bool:
    """Room for the merged copies (`nbytes`) and one layer's float32 temporaries while it merges (`largest`
    values), with a tenth of the GPU to spare for generation itself (its KV cache); on a GPU, memory the allocator
    holds but does not use counts as free."""
    need = 1.25 * nbytes + 3 * 4 * largest
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        spare = 0.1 * torch.cuda.get_device_properties(device).total_memory
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device) > need + spare
    import psutil

    return psutil.virtual_memory().available > 2 * need


def _merged_weight(layer: Any) -> torch.Tensor:
    """The base weight with the active adapters added, in its dtype (added in float32, rounded once); 4-bit weights
    in the dtype their layer computes in."""
    merged = _base_weight(layer)
    for a in layer.active_adapters:
        if a in layer.lora_A:
            merged.add_(layer.get_delta_weight(a))
    return merged


@contextmanager
def merged_for_generation(model: Any) -> Iterator[int]:
    """Inside, each plain LoRA layer answers with one matmul against a copy of its base weight with the adapter
    added in, as `tunelab merge` would write it; the trained weights are not touched. Decoding a token through
    peft's LoRA layers is four small kernels and peft's Python per layer: twice the time per token of the merged
    layers on a 24-layer model (bench/generation_probe.py); QLoRA's 4-bit layers also dequantize their weight for
    every token. Needs a copy of the adapted weights in memory (QLoRA's in 16 bits: four times its 4-bit weights):
    where that does not fit (or no layer qualifies: DoRA, 8-bit, sharded weights) the layers stay as they are.
    Yields how many layers were merged."""
    layers = [m for m in model.modules() if _mergeable(m)]
    merged = 0
    try:
        if layers and _room_for(sum(map(_merged_bytes, layers)),
                                max(real_numel(m.get_base_layer().weight) for m in layers),
                                layers[0].get_base_layer().weight.device):
            try:
                with torch.no_grad():
                    for m in layers:
                        weight, bias = _merged_weight(m), m.get_base_layer().bias
                        bias = None if bias is None else bias.detach().to(weight.dtype)
                        m.forward = _plain_linear(weight, bias)  # nn.Module calls it
                        merged += 1
            except torch.OutOfMemoryError:  # the estimate was wrong: generate through the adapters as they are
                for m in layers:
                    m.__dict__.pop("forward", None)
                merged = 0
                torch.cuda.empty_cache()
        yield merged
    finally:
        for m in layers:
            m.__dict__.pop("forward", None)


def _plain_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> Any:
    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:  # in x's dtype, as the layer answers
        return torch.nn.functional.linear(x.to(weight.dtype), weight, bias).to(x.dtype)

    return forward
