"""A training checkpoint -> a Hugging Face folder: a PEFT adapter (LoRA/QLoRA runs) or a full model.

Checkpoints already store their weights in the Hugging Face format, so this copies them, points the adapter at
its base model, and adds the tokenizer (with its chat template) and a README. `peft`, `transformers` and vLLM
load the result unchanged. (XTuner calls this step `pth_to_hf`.)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tunelab import ui
from tunelab.config.schema import Config
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
    with staged_output(out, overwrite) as tmp:
        if (ckpt / "adapter_config.json").exists():
            check_adapter_fits(ckpt, base, cfg.model.trust_remote_code)
            for name in ADAPTER_FILES:
                shutil.copy2(ckpt / name, tmp / name)
            adapter_cfg = json.loads((tmp / "adapter_config.json").read_text())
            adapter_cfg["base_model_name_or_path"] = base  # a local folder, or the hub id
            (tmp / "adapter_config.json").write_text(json.dumps(adapter_cfg, indent=2) + "\n")
            kind = "PEFT adapter"
        else:
            shards = sorted(ckpt.glob("model*.safetensors")) + sorted(ckpt.glob("model.safetensors.index.json"))
            if not shards:
                raise CheckpointError(f"{ckpt} holds neither an adapter nor model weights")
            for f in [*shards, ckpt / "config.json", ckpt / "generation_config.json"]:
                if f.exists():
                    shutil.copy2(f, tmp / f.name)
            kind = "full model"
        tokenizer = load_tokenizer(base, cfg.model.trust_remote_code)
        tokenizer.save_pretrained(str(tmp))
        (tmp / "README.md").write_text(_readme(kind, cfg, ckpt))
    ui.info(f"wrote {kind} to {out}")
    return out


def _readme(kind: str, cfg: Config, ckpt: Path) -> str:
    use = (f"tunelab chat {cfg.model.path} --adapter THIS_FOLDER --prompt-template {cfg.data.prompt_template}"
           if kind == "PEFT adapter" else f"tunelab chat THIS_FOLDER --prompt-template {cfg.data.prompt_template}")
    return (f"---\nlibrary_name: {'peft' if kind == 'PEFT adapter' else 'transformers'}\n"
            f"base_model: {cfg.model.path}\ntags: [tunelab]\n---\n\n"
            f"# {kind} trained with tunelab\n\n- base model: `{cfg.model.path}`\n"
            f"- prompt template: `{cfg.data.prompt_template}`\n- from checkpoint: `{ckpt.name}`\n\n"
            f"```\n{use}\n```\n")
