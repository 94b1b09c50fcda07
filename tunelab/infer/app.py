"""`tunelab export-app`: write a folder that runs as a Gradio chat page without tunelab (e.g. a hub Space).

The folder holds `app.py` (plain transformers + gradio; the source is `APP_PY` below), `app_config.json` (what
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
from tunelab.model.adapters import check_adapter_fits
from tunelab.model.load import check_weights, load_tokenizer, resolve_model_path

PINNED = ("torch", "transformers", "gradio", "safetensors", "tokenizers")

APP_PY = r'''"""A chat page for a fine-tuned model, exported by `tunelab export-app`. It needs only the packages in
requirements.txt (transformers + gradio), not tunelab. Settings are in app_config.json beside this file.

    pip install -r requirements.txt && python app.py

It listens on 127.0.0.1:7860 unless GRADIO_SERVER_NAME / GRADIO_SERVER_PORT (or PORT) say otherwise, as a
hub Space does.
"""

import json
import os
import threading
from pathlib import Path

import gradio as gr
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

HERE = Path(__file__).resolve().parent
CONFIG = json.loads((HERE / "app_config.json").read_text(encoding="utf-8"))


def load():
    source = CONFIG.get("hub_id") or str(HERE / "model")
    adapter = HERE / "adapter" if CONFIG.get("adapter") else None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok_source = str(adapter) if adapter and (adapter / "tokenizer_config.json").exists() else source
    tokenizer = AutoTokenizer.from_pretrained(tok_source)
    if CONFIG.get("chat_template"):  # the template the model was trained with, as tunelab renders it
        tokenizer.chat_template = CONFIG["chat_template"]
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(device)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    return tokenizer, model, device


TOKENIZER, MODEL, DEVICE = load()
LOCK = threading.Lock()  # one model: one answer at a time
STOPS = [s for s in CONFIG.get("stop_words", []) if s]


def prompt_ids(system, history, question):
    msgs = [{"role": "system", "content": system}] if system else []
    for q, a in history:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    msgs.append({"role": "user", "content": question})
    text = TOKENIZER.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return TOKENIZER(text, add_special_tokens=False)["input_ids"]


def eos_ids():
    ids = {TOKENIZER.eos_token_id}
    for w in STOPS:
        tid = TOKENIZER.convert_tokens_to_ids(w)
        if isinstance(tid, int) and TOKENIZER.convert_ids_to_tokens(tid) == w:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


def cut_at_stop(text):
    cut = min([text.find(s) for s in STOPS if s in text] or [len(text)])
    return text[:cut], cut < len(text)


def answer(question, history, system, temperature, top_p, top_k, max_new_tokens):
    """Yield the growing answer; stop words are never shown, even partly."""
    ids = prompt_ids(system, history, question)
    context = int(getattr(MODEL.config, "max_position_embeddings", 0) or 4096)
    if len(ids) + int(max_new_tokens) > context:
        raise gr.Error(f"the prompt is {len(ids)} tokens; with {int(max_new_tokens)} new tokens it exceeds the "
                       f"model's context of {context} tokens. Clear the chat or lower 'max new tokens'.")
    kw = dict(max_new_tokens=int(max_new_tokens), eos_token_id=eos_ids(), pad_token_id=TOKENIZER.pad_token_id)
    if temperature > 0:
        kw.update(do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=int(top_k) or None)
    else:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    streamer = TextIteratorStreamer(TOKENIZER, skip_prompt=True, skip_special_tokens=True, timeout=600)
    inp = torch.tensor([ids], device=DEVICE)

    def run():
        try:
            with torch.inference_mode():
                MODEL.generate(input_ids=inp, attention_mask=torch.ones_like(inp), streamer=streamer, **kw)
        finally:
            streamer.end()

    with LOCK:
        threading.Thread(target=run, daemon=True).start()
        text = ""
        stopped = False
        for piece in streamer:
            if stopped:  # drain, so the model is free when the lock is
                continue
            text += piece
            shown, stopped = cut_at_stop(text)
            if not stopped:  # hold back a tail that may be the start of a stop word
                hold = max((k for s in STOPS for k in range(1, len(s)) if shown.endswith(s[:k])), default=0)
                shown = shown[:len(shown) - hold]
            yield shown
    yield cut_at_stop(text)[0].strip()


def to_messages(history, question=None, partial=""):
    out = []
    for q, a in history:
        out += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    if question is not None:
        out += [{"role": "user", "content": question}, {"role": "assistant", "content": partial}]
    return out


def respond(question, history, system, temperature, top_p, top_k, max_new_tokens):
    question = (question or "").strip()
    history = list(history or [])
    if not question:
        yield "", to_messages(history), history
        return
    text = ""
    for text in answer(question, history, (system or "").strip(), temperature, top_p, top_k, max_new_tokens):
        yield "", to_messages(history, question, text), history
    history.append((question, text))
    yield "", to_messages(history), history


with gr.Blocks(title=CONFIG["title"], analytics_enabled=False, fill_height=True) as demo:
    gr.Markdown(f"### {CONFIG['title']}")
    state = gr.State([])
    chatbot = gr.Chatbot(label=CONFIG["title"], elem_id="chatbot", height=460, feedback_options=None)
    with gr.Row():
        box = gr.Textbox(placeholder="Ask something and press Enter", show_label=False, lines=1, scale=8,
                         elem_id="question", autofocus=True)
        send = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="send")
        clear = gr.Button("Clear", scale=1, min_width=80, elem_id="clear")
    with gr.Accordion("System prompt and sampling", open=False):
        system_box = gr.Textbox(value=CONFIG.get("system") or "", label="System prompt", lines=2)
        temperature = gr.Slider(0.0, 2.0, value=CONFIG.get("temperature", 0.0), step=0.05,
                                label="Temperature (0 = greedy)")
        top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
        top_k = gr.Slider(0, 200, value=0, step=1, label="Top-k (0 = off)")
        max_new = gr.Slider(1, 4096, value=CONFIG.get("max_new_tokens", 512), step=1, label="Max new tokens")
    inputs = [box, state, system_box, temperature, top_p, top_k, max_new]
    box.submit(respond, inputs, [box, chatbot, state], api_name="chat")
    send.click(respond, inputs, [box, chatbot, state], api_visibility="private")
    clear.click(lambda: ("", [], []), None, [box, chatbot, state], api_name="clear")
    chatbot.clear(lambda: [], None, state, api_visibility="private")  # its own trash icon

if __name__ == "__main__":
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name=os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1",
                server_port=int(os.environ.get("GRADIO_SERVER_PORT") or os.environ.get("PORT") or 7860),
                ssr_mode=False)
'''


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
        if not (a / "adapter_config.json").is_file():
            raise ModelError(f"{a} is not a PEFT adapter folder (no adapter_config.json)")
        if local:
            check_adapter_fits(a, resolved)

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
        (tmp / "app.py").write_text(APP_PY, encoding="utf-8")
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
