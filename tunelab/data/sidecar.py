"""What a run learnt about prompting, written beside an exported model so every tool renders what it was
trained on.

`save_prompt_files` writes three things into an adapter or model folder:
- the tokenizer, whose chat template renders the run's template and default system prompt (chat_template.py),
  for transformers' `apply_chat_template`, vLLM and tunelab alike;
- generation_config.json, whose `eos_token_id` lists the template's stop words that are single tokens, so
  `generate` stops at the end of a turn with no flag;
- `tunelab.json`: template name, system prompt, all stop words (multi-token ones too), base model, tunelab
  version.

`choose_template` is how chat, web, serve, export-app and eval pick the template a model folder asks for.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tunelab import __version__, ui
from tunelab.data.chat_template import chat_template_for
from tunelab.data.templates import TEMPLATE_NAMES, Renderer, get_template, stop_token_ids
from tunelab.errors import DataError

SIDECAR = "tunelab.json"


@dataclass(frozen=True)
class TrainedPrompt:
    prompt_template: str
    system: str | None = None
    stop_words: tuple[str, ...] = ()
    base_model: str | None = None
    tunelab_version: str = __version__


def read_sidecar(folder: str | Path) -> TrainedPrompt | None:
    """The folder's tunelab.json, or None when it has none (a model tunelab did not export)."""
    path = Path(folder) / SIDECAR
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a JSON object")
    checks = {"prompt_template": str, "system": (str, type(None)), "stop_words": list,
              "base_model": (str, type(None)), "tunelab_version": str}
    for key, kind in checks.items():
        if key in raw and not isinstance(raw[key], kind):
            raise DataError(f"{path}: key '{key}' has the wrong type ({type(raw[key]).__name__})")
    if "prompt_template" not in raw:
        raise DataError(f"{path}: key 'prompt_template' is missing")
    if not all(isinstance(w, str) for w in raw.get("stop_words", [])):
        raise DataError(f"{path}: key 'stop_words' must be a list of strings")
    return TrainedPrompt(raw["prompt_template"], raw.get("system"), tuple(raw.get("stop_words", ())),
                         raw.get("base_model"), raw.get("tunelab_version", "unknown"))


def save_prompt_files(folder: Path, tokenizer: Any, renderer: Renderer, base_model: str | None) -> TrainedPrompt:
    """Save `tokenizer` with the renderer's chat template, the stop ids and tunelab.json into `folder`."""
    own = tokenizer.chat_template
    tokenizer.chat_template = chat_template_for(renderer)
    try:
        tokenizer.save_pretrained(str(folder))
    finally:
        tokenizer.chat_template = own  # the renderer may still use the tokenizer's own template
    trained = TrainedPrompt(renderer.name, renderer.system, tuple(renderer.stop_words), base_model)
    write_stop_ids(folder, tokenizer, trained.stop_words)
    write_sidecar(folder, trained)
    return trained


def write_sidecar(folder: Path, trained: TrainedPrompt) -> None:
    (folder / SIDECAR).write_text(json.dumps(asdict(trained), indent=2, ensure_ascii=False) + "\n",
                                  encoding="utf-8")


def write_stop_ids(folder: Path, tokenizer: Any, stop_words: tuple[str, ...]) -> None:
    """Add the single-token stop words to generation_config.json's eos_token_id (the file is created if the
    folder has none, e.g. an adapter)."""
    path = folder / "generation_config.json"
    cfg = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    old = cfg.get("eos_token_id")
    ids = [*(old if isinstance(old, list) else [old]), tokenizer.eos_token_id, *stop_token_ids(tokenizer, stop_words)[0]]
    ids = list(dict.fromkeys(i for i in ids if i is not None))
    if ids:
        cfg["eos_token_id"] = ids[0] if len(ids) == 1 else ids
    path.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")


def prompt_folders(model: str, adapter: str | Path | None) -> tuple[str, str]:
    """(where tunelab.json is looked for, where the tokenizer comes from). An adapter folder that carries its
    own tokenizer or tunelab.json was exported with what its run learnt: it wins over the base model."""
    a = Path(adapter) if adapter else None
    if a is None or not any((a / f).exists() for f in ("tokenizer_config.json", SIDECAR)):
        return model, model
    return str(a), str(a) if (a / "tokenizer_config.json").exists() else model


def choose_template(requested: str | None, folder: str, tokenizer: Any) -> Renderer:
    """The template (and default system prompt) a model was trained with, from its tunelab.json; else the
    tokenizer's own chat template; else XTuner's `default`. `requested` (--prompt-template) overrides the
    template, with one warning when it is not the trained one."""
    trained = read_sidecar(folder) if Path(folder).is_dir() else None
    if trained is None:
        return get_template(requested or ("hf" if getattr(tokenizer, "chat_template", None) else "default"),
                            tokenizer)
    where = Path(folder) / SIDECAR
    name = requested or trained.prompt_template
    if requested and requested != trained.prompt_template:
        ui.warn("prompt-template-differs", f"--prompt-template {requested} differs from the template this model "
                f"was trained with ({trained.prompt_template}, in {where})")
    elif name not in TEMPLATE_NAMES:
        raise DataError(f"{where}: prompt_template '{name}' is not known to this tunelab; pass --prompt-template")
    elif ui.is_main_process():  # on stderr: a script reading the answers from stdout sees only those
        note = f"prompt template {name}" + (" and system prompt" if trained.system else "")
        print(f"{note} from {where}", file=sys.stderr)
    renderer = get_template(name, tokenizer, trained.system)
    # the stop words the run recorded end a turn too, also when --prompt-template picks another template
    renderer.stop_words = tuple(dict.fromkeys([*renderer.stop_words, *trained.stop_words]))
    return renderer
