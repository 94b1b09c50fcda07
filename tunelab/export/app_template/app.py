"""A chat page for a fine-tuned model, exported by `tunelab export-app`. It needs only the packages in
requirements.txt (transformers + gradio), not tunelab. Settings are in app_config.json beside this file: where
the model is, the chat template it was trained with, the system prompt and the stop words.

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
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

HERE = Path(__file__).resolve().parent
# Decoding shows one of these for a character whose bytes the token limit cut in two: an answer never ends in it.
BROKEN = "\ufffd"
# Attention kernels for decoding: not cuDNN's, which builds a plan for every new key length, i.e. for every token
# of a first answer on a GPU (tunelab's BENCHMARKS.md: 2 x 128 tokens of a 1.8B model, 9.1 s with it, 3.0 s without).
DECODING_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class ChatApp:
    """The model, its tokenizer and the folder's settings; one answer at a time."""

    def __init__(self, folder=HERE):
        self.config = json.loads((Path(folder) / "app_config.json").read_text(encoding="utf-8"))
        source = self.config.get("hub_id") or str(Path(folder) / "model")
        adapter = Path(folder) / "adapter" if self.config.get("adapter") else None
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        tok_source = str(adapter) if adapter and (adapter / "tokenizer_config.json").exists() else source
        self.tokenizer = AutoTokenizer.from_pretrained(tok_source)
        if self.config.get("chat_template"):  # the template the model was trained with, as tunelab renders it
            self.tokenizer.chat_template = self.config["chat_template"]
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(self.device)
        if adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter))
        self.model = model.eval()
        self.context = int(getattr(model.config, "max_position_embeddings", 0) or 4096)
        self.stops = [s for s in self.config.get("stop_words", []) if s]
        self.end_ids, self.stop_strings = self._split_stops()
        self.lock = threading.Lock()

    def _split_stops(self):
        """(token ids that end an answer, stop words of several tokens): generation stops at either, the first
        by id, the second by matching the generated text."""
        ids, strings = {self.tokenizer.eos_token_id}, []
        for w in self.stops:
            tid = self.tokenizer.convert_tokens_to_ids(w)
            if isinstance(tid, int) and self.tokenizer.convert_ids_to_tokens(tid) == w:
                ids.add(tid)
            else:
                strings.append(w)
        return sorted(i for i in ids if i is not None), strings

    def prompt_ids(self, system, history, question):
        msgs = [{"role": "system", "content": system}] if system else []
        for q, a in history:
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        msgs.append({"role": "user", "content": question})
        text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate_kwargs(self, temperature, top_p, top_k, max_new_tokens):
        kw = {"max_new_tokens": int(max_new_tokens), "eos_token_id": self.end_ids,
              "pad_token_id": self.tokenizer.pad_token_id}
        if self.stop_strings:  # the model stops at the token that completes one, not after max_new_tokens
            kw.update(stop_strings=self.stop_strings, tokenizer=self.tokenizer)
        if temperature > 0:
            kw.update(do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=int(top_k) or None)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kw

    def cut_at_stop(self, text):
        cut = min([text.find(s) for s in self.stops if s in text] or [len(text)])
        return text[:cut], cut < len(text)

    def answer(self, question, history, system, temperature, top_p, top_k, max_new_tokens):
        """Yield the growing answer; stop words are never shown, even partly."""
        ids = self.prompt_ids(system, history, question)
        if len(ids) + int(max_new_tokens) > self.context:
            raise gr.Error(f"the prompt is {len(ids)} tokens; with {int(max_new_tokens)} new tokens it exceeds the "
                           f"model's context of {self.context} tokens. Clear the chat or lower 'max new tokens'.")
        kw = self.generate_kwargs(temperature, top_p, top_k, max_new_tokens)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        inp = torch.tensor([ids], device=self.device)

        def run():
            try:
                with torch.inference_mode(), sdpa_kernel(DECODING_ATTENTION):
                    self.model.generate(input_ids=inp, attention_mask=torch.ones_like(inp), streamer=streamer, **kw)
            finally:
                streamer.end()

        with self.lock:
            worker = threading.Thread(target=run, daemon=True)
            worker.start()
            text = ""
            for piece in streamer:
                text += piece
                shown, stopped = self.cut_at_stop(text)
                if not stopped:  # hold back a tail that may be the start of a stop word
                    hold = max((k for s in self.stops for k in range(1, len(s)) if shown.endswith(s[:k])), default=0)
                    shown = shown[:len(shown) - hold]
                yield shown.removesuffix(BROKEN)
            worker.join()  # the model is free before the next answer takes the lock
        yield self.cut_at_stop(text)[0].removesuffix(BROKEN).strip()


def to_messages(history, question=None, partial=""):
    out = []
    for q, a in history:
        out += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    if question is not None:
        out += [{"role": "user", "content": question}, {"role": "assistant", "content": partial}]
    return out


def build_page(app):
    """The Gradio page around `app` (not launched)."""
    config = app.config

    def respond(question, history, system, temperature, top_p, top_k, max_new_tokens):
        question = (question or "").strip()
        history = list(history or [])
        if not question:
            yield "", to_messages(history), history
            return
        text = ""
        for text in app.answer(question, history, (system or "").strip(), temperature, top_p, top_k,
                               max_new_tokens):
            yield "", to_messages(history, question, text), history
        history.append((question, text))
        yield "", to_messages(history), history

    with gr.Blocks(title=config["title"], analytics_enabled=False, fill_height=True) as page:
        gr.Markdown(f"### {config['title']}")
        state = gr.State([])
        chatbot = gr.Chatbot(label=config["title"], elem_id="chatbot", height=460, feedback_options=None)
        with gr.Row():
            box = gr.Textbox(placeholder="Ask something and press Enter", show_label=False, lines=1, scale=8,
                             elem_id="question", autofocus=True)
            send = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="send")
            clear = gr.Button("Clear", scale=1, min_width=80, elem_id="clear")
        with gr.Accordion("System prompt and sampling", open=False):
            system_box = gr.Textbox(value=config.get("system") or "", label="System prompt", lines=2)
            temperature = gr.Slider(0.0, 2.0, value=config.get("temperature", 0.0), step=0.05,
                                    label="Temperature (0 = greedy)")
            top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
            top_k = gr.Slider(0, 200, value=0, step=1, label="Top-k (0 = off)")
            max_new = gr.Slider(1, 4096, value=config.get("max_new_tokens", 512), step=1, label="Max new tokens")
        inputs = [box, state, system_box, temperature, top_p, top_k, max_new]
        box.submit(respond, inputs, [box, chatbot, state], api_name="chat")
        send.click(respond, inputs, [box, chatbot, state], api_visibility="private")
        clear.click(lambda: ("", [], []), None, [box, chatbot, state], api_name="clear")
        chatbot.clear(list, None, state, api_visibility="private")  # its own trash icon
    return page


def main():
    page = build_page(ChatApp())
    page.queue(default_concurrency_limit=1)
    page.launch(server_name=os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1",
                server_port=int(os.environ.get("GRADIO_SERVER_PORT") or os.environ.get("PORT") or 7860),
                ssr_mode=False)


if __name__ == "__main__":
    main()
