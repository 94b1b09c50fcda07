"""The typed config: four sections (model, data, train, runtime) that cover XTuner's five config parts.

Every section forbids unknown keys, so a typo is an error (see load.py for the message and the suggestion).
Defaults are what a user fine-tuning a chat model with LoRA would pick.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DATA_FORMATS = ("auto", "openai", "conversation", "alpaca", "sharegpt", "oasst1", "pretrain")
ALL_LINEAR = "all-linear"
# How a run spreads over the processes torchrun starts (train.strategy, or `--deepspeed NAME`). XTuner's
# DeepSpeed names are accepted with or without their `deepspeed_` prefix; all sharding runs on torch FSDP2.
STRATEGIES = {
    "ddp": "every process holds the whole model and optimizer state; gradients are averaged (one process: plain)",
    "zero1": "runs as zero2 (FSDP2 has no optimizer-only sharding)",
    "zero2": "gradients and optimizer state sharded; parameters gathered once per step and kept for it",
    "zero2_offload": "zero2, with the sharded parameters and optimizer state in CPU memory",
    "zero3": "parameters, gradients and optimizer state sharded; each layer gathered only while it runs",
    "zero3_offload": "zero3, with the sharded parameters and optimizer state in CPU memory",
}


def normalize_strategy(name: str) -> str:
    """A strategy's canonical name from what a user may type (deepspeed_zero2, ZeRO3, zero3_offload)."""
    key = str(name).strip().lower().removeprefix("deepspeed_").replace("-", "_")
    if key not in STRATEGIES:
        raise ValueError(f"unknown strategy '{name}'; valid: {', '.join(STRATEGIES)} "
                         "(XTuner's deepspeed_zero2 etc. are accepted too)")
    return key


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraSettings(Section):
    """LoRA / DoRA adapter settings; `model.lora: null` means full fine-tuning."""

    r: int = Field(64, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    # "all-linear": every linear layer of the decoder except the output head.
    target_modules: list[str] | Literal["all-linear"] = ALL_LINEAR
    use_dora: bool = False
    # Only the top N decoder layers get adapters (null = all); backward then stops early, which is faster.
    layers_to_transform: int | None = Field(None, gt=0)


class ModelSettings(Section):
    # A local folder, a hub id, or "smollm2-135m-instruct" (the embedded default, works offline).
    path: str = "smollm2-135m-instruct"
    trust_remote_code: bool = False
    quantization: Literal["none", "nf4", "int8"] = "none"
    # How nf4 weights are stored: "auto" takes torchao's NF4Tensor where several processes shard the model
    # (FSDP2 gathers it without breaking the compiled graph; 1.6x bitsandbytes' speed on 2 GPUs) and bitsandbytes
    # everywhere else (faster in one process). model/nf4.py has the measurements.
    nf4_format: Literal["auto", "bitsandbytes", "torchao"] = "auto"
    lora: LoraSettings | None = Field(default_factory=LoraSettings)
    # "auto": only where memory needs it (QLoRA, or activations that would not fit); "offload": also move the
    # checkpointed layer inputs to CPU memory (rows of 100k+ tokens). model/kernels.py decides "auto".
    gradient_checkpointing: bool | Literal["auto", "offload"] = "auto"
    # "auto": flex attention on a GPU (packed rows up to 32k tokens), else SDPA.
    # Every backend keeps packed samples apart: position ids restart per sample.
    attn_implementation: Literal["auto", "sdpa", "eager", "flex_attention"] = "auto"
    # Liger fused kernels (GPU only, needs liger-kernel): fused linear cross-entropy, RMSNorm, RoPE, SwiGLU.
    use_liger: bool | Literal["auto"] = "auto"
    # torch.compile of each decoder layer ("auto": on a GPU, with CUDA graphs for LoRA and QLoRA micro-batches of up
    # to 4,096 tokens where the weights are not sharded); "cudagraphs" asks for CUDA graphs everywhere (layers that need
    # checkpointing checkpoint inside their compiled region).
    compile: bool | Literal["auto", "cudagraphs"] = "auto"
    revision: str | None = None

    @model_validator(mode="after")
    def _quantization_needs_lora(self) -> "ModelSettings":
        if self.quantization != "none" and self.lora is None:
            raise ValueError(f"quantization={self.quantization} (QLoRA) needs model.lora; "
                             "full fine-tuning of quantized weights is not possible")
        if self.quantization == "nf4" and self.nf4_format == "torchao" and self.lora is not None and \
                self.lora.use_dora:
            raise ValueError("nf4_format=torchao with lora.use_dora: peft's DoRA cannot de-quantize torchao's NF4 "
                             "weights; use nf4_format auto or bitsandbytes")
        return self


class DatasetSpec(Section):
    """One dataset of a run; any option left null is taken from the `data` section."""

    path: str | list[str]
    format: Literal[DATA_FORMATS] | None = None  # type: ignore[valid-type]
    prompt_template: str | None = None
    system: str | None = None
    weight: float = Field(1.0, gt=0)
    split: str | None = None
    max_samples: int | None = Field(None, gt=0)
    # .txt files: one document per file, or one per blank-line-separated paragraph block.
    text_documents: Literal["file", "paragraph"] | None = None


class DataSettings(Section):
    # A file, a list of files, a folder, a hub dataset id or a `save_to_disk` folder. Use `datasets` for several.
    path: str | list[str] | None = None
    format: Literal[DATA_FORMATS] = "auto"  # type: ignore[valid-type]
    # An XTuner template name (internlm2_chat, qwen_chat, llama3_chat, ...) or "hf": the tokenizer's own.
    prompt_template: str = "hf"
    system: str | None = None
    max_length: int = Field(2048, gt=0)
    pack_to_max_length: bool = True
    shuffle: bool = True
    datasets: list[DatasetSpec] = Field(default_factory=list)
    # concat: every sample once per epoch; weighted: sample each dataset in proportion to its weight.
    mix: Literal["concat", "weighted"] = "concat"
    skip_bad_records: bool = False
    cache: bool = True
    split: str = "train"
    max_samples: int | None = Field(None, gt=0)
    text_documents: Literal["file", "paragraph"] = "file"

    @model_validator(mode="after")
    def _one_source(self) -> "DataSettings":
        if self.path is None and not self.datasets:
            raise ValueError("set data.path (one dataset) or data.datasets (several)")
        if self.path is not None and self.datasets:
            raise ValueError("set data.path or data.datasets, not both")
        return self

    def format_key(self, index: int) -> str:
        """The key that sets the format of dataset `index`: its own entry's, or the section's it inherits."""
        if self.datasets and self.datasets[index].format is not None:
            return f"data.datasets.{index}.format"
        return "data.format"

    def specs(self) -> list[DatasetSpec]:
        """The run's datasets, with section-level options filled in."""
        if self.datasets:
            out = []
            for d in self.datasets:
                out.append(d.model_copy(update={
                    "format": d.format or self.format,
                    "prompt_template": d.prompt_template or self.prompt_template,
                    "system": d.system if d.system is not None else self.system,
                    "split": d.split or self.split,
                    "max_samples": d.max_samples if d.max_samples is not None else self.max_samples,
                    "text_documents": d.text_documents or self.text_documents,
                }))
            return out
        return [DatasetSpec(path=self.path, format=self.format, prompt_template=self.prompt_template,
                            system=self.system, split=self.split, max_samples=self.max_samples,
                            text_documents=self.text_documents)]


class TrainSettings(Section):
    batch_size: int = Field(1, gt=0)
    accumulative_counts: int = Field(16, gt=0)
    max_epochs: int = Field(3, gt=0)
    max_steps: int | None = Field(None, gt=0)
    lr: float = Field(2e-4, gt=0)
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0.0)
    max_norm: float = Field(1.0, gt=0)
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    # float32 | bfloat16 | float16 (with loss scaling). "auto": bfloat16 where supported, else float32.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Stop after this many consecutive updates with a non-finite loss or gradient norm.
    max_bad_steps: int = Field(5, gt=0)
    # Several processes (torchrun): ddp, zero1, zero2, zero2_offload, zero3, zero3_offload (see STRATEGIES).
    strategy: str = "ddp"

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, v: str) -> str:
        return normalize_strategy(v)

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"betas must be in [0, 1), got {list(v)}")
        return v


class RuntimeSettings(Section):
    log_interval: int = Field(10, gt=0)
    save_steps: int = Field(500, gt=0)
    # How many iter_N checkpoints to keep (-1: all). The newest complete one is never deleted.
    save_total_limit: int = Field(2, ge=-1)
    evaluation_freq: int = Field(500, gt=0)
    evaluation_inputs: list[str] = Field(default_factory=list)
    evaluation_max_new_tokens: int = Field(128, gt=0)

    @field_validator("save_total_limit")
    @classmethod
    def _not_zero(cls, v: int) -> int:
        if v == 0:
            raise ValueError("save_total_limit must be -1 (keep all) or at least 1")
        return v


class Config(Section):
    model: ModelSettings = Field(default_factory=ModelSettings)
    data: DataSettings
    train: TrainSettings = Field(default_factory=TrainSettings)
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)

    @model_validator(mode="after")
    def _cudagraphs_need_one_plain_forward(self) -> "Config":
        # A CUDA graph replays into the same output buffers: a recompute started outside the compiled layers
        # overwrites activations the backward still needs (H100, 2026-11-25), so under graphs the layers checkpoint
        # inside their compiled region (model/kernels.py checkpoint_inside); moving their inputs to CPU memory
        # cannot be replayed. Several micro-batches per step work since the gradients stay allocated between them
        # (train/optim.py keep_gradients; H100, 2026-11-26).
        if self.model.compile == "cudagraphs" and self.model.gradient_checkpointing == "offload":
            raise ValueError("model.compile: cudagraphs cannot replay layers checkpointed to CPU memory; set "
                             "model.gradient_checkpointing: true (inside the compiled layers), auto or false, or "
                             "compile: auto")
        return self
