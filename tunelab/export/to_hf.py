"""A training checkpoint -> a Hugging Face folder: a PEFT adapter (LoRA/QLoRA runs) or a full model.

Checkpoints already store their weights in the Hugging Face format, so this copies them, points the adapter at
its base model, and adds a README and what the run learnt about prompting (data/sidecar.py): the tokenizer with
the run's template and system prompt as its chat template, the stop ids in generation_config.json, and
tunelab.json. `peft`, `transformers` and vLLM load the result unchanged and prompt it as it was trained.
(XTuner calls this step `pth_to_hf`.)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from tunelab import ui
from tunelab.config.schema import Config
from tunelab.data.sidecar import save_prompt_files
from tunelab.data.templates import get_template
from tunelab.errors import CheckpointError
from tunelab.export.output import staged_output
from tunelab.model.adapters import check_adapter_fits
from tunelab.model.load import load_tokenizer, resolve_model_path
from tunelab.train.checkpoint import resolve_checkpoint

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


def checkpoint_to_hf(cfg: Config, checkpoint: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    ckpt = resolve_checkpoint(checkpoint)
    out = Path(out)
    base = resolve_model_path(cfg.model.path)
    template, system = run_prompt(cfg, ckpt)
    tokenizer = load_tokenizer(base, cfg.model.trust_remote_code)
    # an unknown name fails before anything is written; a pre-training run on a base without a chat template
    # has no prompt format to carry
    plain_text = template == "hf" and not getattr(tokenizer, "chat_template", None)
    renderer = None if plain_text else get_template(template, tokenizer, system)
    with staged_output(out, overwrite) as tmp:
        if (ckpt / "adapter_config.json").exists():
            check_adapter_fits(ckpt, base, cfg.model.trust_remote_code)
            for name in ADAPTER_FILES:
                shutil.copy2(ckpt / name, tmp / name)
            adapter_cfg = json.loads((tmp / "adapter_config.json").read_text())
            adapter_cfg["base_model_name_or_path"] = base  # a local folder, or the hub id
            (tmp / "adapter_config.json").write_text(json.dumps(adapter_cfg, indent=2) + "\n")
            base_generation = Path(base) / "generation_config.json"
            if base_generation.is_file():  # the base's settings, with the run's stop ids added below
                shutil.copy2(base_generation, tmp / base_generation.name)
            kind = "PEFT adapter"
        else:
            shards = sorted(ckpt.glob("model*.safetensors")) + sorted(ckpt.glob("model.safetensors.index.json"))
            if not shards:
                raise CheckpointError(f"{ckpt} holds neither an adapter nor model weights")
            for f in [*shards, ckpt / "config.json", ckpt / "generation_config.json"]:
                if f.exists():
                    shutil.copy2(f, tmp / f.name)
            kind = "full model"
        if renderer is None:
            tokenizer.save_pretrained(str(tmp))
        else:
            save_prompt_files(tmp, tokenizer, renderer, cfg.model.path)
        (tmp / "README.md").write_text(_readme(kind, cfg, ckpt, template))
    ui.info(f"wrote {kind} to {out}")
    return out


def run_prompt(cfg: Config, ckpt: Path) -> tuple[str, str | None]:
    """The template and system prompt the checkpoint was trained with. Its own config.yaml says (overrides
    given to `train` included); the config given to `convert` is used where that copy is missing."""
    data: Any = None
    saved = ckpt / "config.yaml"
    if saved.is_file():
        try:
            data = (yaml.safe_load(saved.read_text(encoding="utf-8")) or {}).get("data")
        except (yaml.YAMLError, OSError, UnicodeDecodeError, AttributeError):
            data = None
    if not isinstance(data, dict) or not isinstance(data.get("prompt_template"), str):
        return cfg.data.prompt_template, cfg.data.system
    template, system = data["prompt_template"], data.get("system")
    if template != cfg.data.prompt_template:
        ui.warn("export-template-from-checkpoint", f"the checkpoint was trained with prompt template {template} "
                f"(its config.yaml), the config given says {cfg.data.prompt_template}; exporting {template}")
    datasets = [d for d in data.get("datasets") or [] if isinstance(d, dict)]
    used = {(d.get("prompt_template") or template, d["system"] if d.get("system") is not None else system)
            for d in datasets}
    if len(used) == 1:  # every dataset names the same one
        return used.pop()
    if used:
        ui.warn("export-several-templates", f"{saved}: the datasets used several templates or system prompts; "
                f"the export carries data.prompt_template ({template}) and data.system")
    return template, system


def _readme(kind: str, cfg: Config, ckpt: Path, template: str) -> str:
    use = (f"tunelab chat {cfg.model.path} --adapter THIS_FOLDER" if kind == "PEFT adapter"
           else "tunelab chat THIS_FOLDER")
    return (f"---\nlibrary_name: {'peft' if kind == 'PEFT adapter' else 'transformers'}\n"
            f"base_model: {cfg.model.path}\ntags: [tunelab]\n---\n\n"
            f"# {kind} trained with tunelab\n\n- base model: `{cfg.model.path}`\n"
            f"- prompt template: `{template}` (the tokenizer's chat template renders it; details in "
            f"`tunelab.json`)\n- from checkpoint: `{ckpt.name}`\n\n```\n{use}\n```\n")
