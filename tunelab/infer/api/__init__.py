"""`tunelab serve`: an OpenAI-compatible HTTP API in front of the generation core (routes.py, split next)."""

from tunelab.infer.api.routes import Batcher, _bind, build_api, ensure_port_free, serve_api

__all__ = ["Batcher", "_bind", "build_api", "ensure_port_free", "serve_api"]
