"""Load a model and its tokenizer: device, dtype, quantization and the attention backend, each chosen here.

`trust_remote_code` is only ever what the caller passes (off by default everywhere in tunelab).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tunelab import ui
from tunelab.config.load import HUB_ID
from tunelab.errors import ModelError
from tunelab.model.zoo import ensure_default_model, is_default_alias

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_QUANTIZATION_WARNING = (
    "{quantization} weights on a CPU are de-quantised again for every matrix multiplication, so training and "
    "generation run several times slower than with plain weights (one step of the QLoRA tutorial config took 4x "
    "a LoRA step); on a CPU, train with the LoRA config instead (the same name with _lora_ for _qlora_, or "
    "model.quantization=none) and chat without --bits")


def resolve_model_path(path: str) -> str:
    """A local folder (checked), the default alias (converted on first use) or a hub id."""
    if is_default_alias(path):
        return str(ensure_default_model())
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            raise ModelError(f"model path is a file, not a folder: {p}")
        if not (p / "config.json").exists():
            raise ModelError(f"{p} is not a model folder: it has no config.json")
        check_weights(str(p))
        return str(p)
    if HUB_ID.match(path) and not path.startswith((".", "/")):
        return path
    raise ModelError(f"model folder not found: {path}")


def check_weights(path: str) -> None:
    p = Path(path)
    if p.is_dir() and not any((p / f).exists() for f in WEIGHT_FILES) and not list(p.glob("*.safetensors")):
        raise ModelError(f"{p} has a config.json but no weights (*.safetensors)")


def choose_device(requested: str = "auto") -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelError("device 'cuda' was asked for, but no CUDA GPU is available")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def choose_dtype(requested: str, device: torch.device) -> torch.dtype:
    """"auto": bf16 where the hardware computes it natively (recent GPUs, CPUs with AVX512-BF16/AMX), else fp32."""
    if requested != "auto":
        return DTYPES[requested]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if _cpu_has_bf16() else torch.float32


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def load_tokenizer(path: str, trust_remote_code: bool = False, revision: str | None = None) -> Any:
    from transformers import AutoTokenizer

    local = Path(path)
    if local.is_dir() and not any((local / f).exists() for f in TOKENIZER_FILES):
        raise ModelError(f"{local} has no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    except Exception as e:
        raise ModelError(_explain_load_error(path, e, "tokenizer", trust_remote_code)) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str, *, dtype: torch.dtype, device: torch.device, quantization: str = "none",
               attn_implementation: str = "sdpa", trust_remote_code: bool = False,
               revision: str | None = None, quant_storage: torch.dtype = torch.uint8) -> Any:
    """`quant_storage`: the dtype NF4 weights are packed into. Sharded training (FSDP) needs the compute dtype
    here, so the packed weights shard and gather like every other parameter (the FSDP-QLoRA recipe)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    check_weights(path)
    if quantization != "none" and device.type == "cpu":
        ui.warn("quantized_on_cpu", CPU_QUANTIZATION_WARNING.format(quantization=quantization))
    kwargs: dict[str, Any] = dict(dtype=dtype, trust_remote_code=trust_remote_code, revision=revision,
                                  attn_implementation=attn_implementation)
    if quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=quant_storage)
        kwargs["device_map"] = {"": device}
    elif quantization == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": device}
    elif device.type == "cuda":  # straight from the files to the GPU: no full copy in host memory first
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as e:
        raise ModelError(_explain_load_error(path, e, "model", trust_remote_code)) from None
    if quantization == "none":
        model.to(device)
    model.config.use_cache = False
    return model


def empty_model(path: str, *, dtype: torch.dtype, attn_implementation: str = "sdpa",
                trust_remote_code: bool = False, revision: str | None = None) -> Any:
    """The model's structure on the meta device: no memory, no weights read. Sharded training builds this on
    every process but one and fills each process's shards from the one that loaded the weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    check_weights(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation,
                                                     trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ModelError(_explain_load_error(path, e, "model", trust_remote_code)) from None
    if (Path(path) / "generation_config.json").exists():  # as from_pretrained would: same answers on every rank
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path)
    model.config.use_cache = False
    return model


def _explain_load_error(path: str, e: Exception, what: str, trust_remote_code: bool) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    cfg = Path(path) / "config.json"
    if cfg.exists():
        try:
            meta = json.loads(cfg.read_text())
        except (OSError, json.JSONDecodeError):
            return f"{cfg} is not valid JSON"
        if "auto_map" in meta and not trust_remote_code:
            return (f"{path} ships its own model code; pass --trust-remote-code (model.trust_remote_code: true) "
                    "only if you trust it")
        model_type = meta.get("model_type")
        if model_type and ("does not recognize" in text or "Unrecognized" in text or "model_type" in text):
            import transformers

            return f"{cfg}: model type '{model_type}' is not known to transformers {transformers.__version__}"
    if "offline" in text.lower() or "connect" in text.lower() or "resolve" in text.lower():
        return f"cannot load {what} '{path}': not a local folder and the hub cannot be reached ({text[:160]})"
    return f"cannot load {what} from {path}: {text[:300]}"


def describe(model: Any) -> str:
    from tunelab.model.adapters import count_parameters

    n = count_parameters(model)[1]
    return f"{type(model).__name__} {n / 1e6:.1f}M params"


def warn_if_remote(path: str, trust_remote_code: bool) -> None:
    if trust_remote_code:
        ui.warn("remote_code", f"trust_remote_code is on: {path} may run its own Python code")
