"""`tunelab export-app`: write a folder that runs as a Gradio chat page without tunelab (e.g. a hub Space).

The folder holds `app.py` (plain transformers + gradio: a copy of `app_template/app.py`), `app_config.json` (what
the page needs: where the model is, the chat template, the system prompt, stop words),
`requirements.txt` pinned to the versions installed here, a README.md with the Space front-matter, a
`.gitattributes` that keeps weights in LFS, and the model's files under `model/` (unless a hub id is given) and
the adapter's under `adapter/`. It is written beside its destination and renamed in at the end.

Prompts are rendered as tunelab renders them at chat time: the template is chosen as `tunelab chat` chooses it
(the model's tunelab.json, else the tokenizer's own, unless --prompt-template says otherwise) and goes into
app_config.json as a Jinja chat template, which the app gives to `apply_chat_template`.
"""

from __future__ import annotations

import json
import shutil
from importlib import metadata
from pathlib import Path

from tunelab.data.chat_template import chat_template_for
from tunelab.data.sidecar import choose_template, prompt_folders
from tunelab.errors import ModelError
from tunelab.export.output import check_output, staged_output
from tunelab.model.adapters import check_adapter
from tunelab.model.load import check_weights, load_tokenizer, resolve_model_path

PINNED = ("torch", "transformers", "gradio", "safetensors", "tokenizers")

TEMPLATE = Path(__file__).resolve().parent / "app_template" / "app.py"


def _version(dist: str) -> str:
    try:
        v = metadata.version(dist)
    except metadata.PackageNotFoundError:
        raise ModelError(f"export-app pins the installed {dist}, but it is not installed; "
                         f"install it with: pip install {dist}") from None
    return v.split("+")[0]  # "2.13.0+cpu" -> "2.13.0": a Space installs the hub's build of the same release


def requirements(with_peft: bool) -> str:
    names = [*PINNED, *(["peft"] if with_peft else [])]
    return "".join(f"{n}=={_version(n)}\n" for n in names)


def _copy_files(src: Path, dst: Path) -> int:
    dst.mkdir(parents=True)
    n = 0
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.name.startswith("."):
            shutil.copy2(f, dst / f.name)
            n += 1
    return n


def _readme(title: str, template: str, hub_id: str | None, adapter: bool, gradio_version: str) -> str:
    where = f"the hub model `{hub_id}`" if hub_id else "the files in `model/`"
    with_adapter = " with the LoRA adapter in `adapter/`" if adapter else ""
    template_note = " (the tokenizer's own chat template)" if template == "hf" else ""
    return f"""---
title: {json.dumps(title[:60], ensure_ascii=False)}
emoji: 💬
colorFrom: blue
colorTo: gray
sdk: gradio
sdk_version: {gradio_version}
app_file: app.py
pinned: false
---

# {title}

A chat page for {where}{with_adapter}, exported by `tunelab export-app`. Prompts use the `{template}`
template{template_note}, as in training.

Run it here:

    pip install -r requirements.txt
    python app.py            # http://127.0.0.1:7860 (GRADIO_SERVER_NAME / GRADIO_SERVER_PORT change it)

Publish it as a Space: create a Gradio Space and upload this folder (e.g. `hf upload USER/SPACE . --repo-type
space`); `.gitattributes` keeps the weights in LFS.
"""


def export_app(model: str, out: Path, adapter: str | None = None, template: str | None = None,
               system: str | None = None, hub_id: str | None = None, overwrite: bool = False) -> Path:
    """Write the app folder to `out`; returns it."""
    check_output(out, overwrite)  # before any work; staged_output checks again when writing
    resolved = resolve_model_path(model)
    local = Path(resolved).is_dir()
    if not local and not hub_id:
        hub_id = resolved  # a hub id given as the model: the app loads it from the hub
    if local:
        check_weights(resolved)
    a = Path(adapter) if adapter else None
    if a is not None:
        check_adapter(a, resolved if local else None)  # a hub base is not fetched here

    renderer = None  # None: the hub tokenizer's own chat template, as it is
    if local or (template and template != "hf"):
        prompt_dir, tokenizer_dir = prompt_folders(resolved, a)
        tok = load_tokenizer(tokenizer_dir)
        renderer = choose_template(template, prompt_dir, tok)  # the same checks and errors as chat
    name = renderer.name if renderer else (template or "hf")
    config = {"title": Path(resolved).name + (f" + {a.name}" if a else ""), "hub_id": hub_id, "adapter": bool(a),
              "system": system or (renderer.system if renderer else None), "template_name": name,
              "chat_template": chat_template_for(renderer) if renderer else None,
              "stop_words": list(renderer.stop_words) if renderer else [], "temperature": 0.0,
              "max_new_tokens": 512}

    with staged_output(out, overwrite) as tmp:
        shutil.copyfile(TEMPLATE, tmp / "app.py")
        (tmp / "app_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                             encoding="utf-8")
        (tmp / "requirements.txt").write_text(requirements(bool(a)), encoding="utf-8")
        (tmp / "README.md").write_text(_readme(config["title"], name, hub_id, bool(a), _version("gradio")),
                                       encoding="utf-8")
        (tmp / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
                                            "*.bin filter=lfs diff=lfs merge=lfs -text\n"
                                            "tokenizer.json filter=lfs diff=lfs merge=lfs -text\n")
        if local and not hub_id:
            _copy_files(Path(resolved), tmp / "model")
        if a is not None:
            _copy_files(a, tmp / "adapter")
    print(f"wrote {out}: app.py, requirements.txt, README.md"
          + (", model/" if local and not hub_id else f" (model from the hub: {hub_id})")
          + (", adapter/" if a else ""))
    return out
