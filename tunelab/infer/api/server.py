"""`tunelab serve`: the API app bound to host:port with uvicorn, until Ctrl-C."""

from __future__ import annotations

import signal
import threading

from tunelab.infer.api.routes import build_api
from tunelab.infer.ports import bind
from tunelab.model.generate import ChatModel, GenerationOptions


def serve_api(chat: ChatModel, host: str, port: int, system: str | None, defaults: GenerationOptions,
              model_name: str | None = None, max_batch: int = 8) -> int:
    import uvicorn

    sock = bind(host, port)  # bound here, so "port in use" is our one-line error, not uvicorn's exit
    app = build_api(chat, system, defaults, model_name, max_batch)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5,
                            h11_max_incomplete_event_size=64 * 1024)
    server = uvicorn.Server(config)
    # uvicorn shuts down gracefully on Ctrl-C and SIGTERM, then raises the signal again. Ctrl-C comes back as
    # KeyboardInterrupt (or not at all where it was ignored, in a background job); SIGTERM would end the process
    # with 143: it comes back as KeyboardInterrupt too, so both stop the server with exit 0, as `tunelab web` does.
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _stop)
    shown = f"[{host}]" if ":" in host else host
    print(f"tunelab serve: {model_name or chat.name} at http://{shown}:{port}/v1 (Ctrl-C to stop)", flush=True)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    print("tunelab serve: stopped", flush=True)
    return 0


def _stop(*_: object) -> None:
    raise KeyboardInterrupt
