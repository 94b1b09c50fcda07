"""`tunelab serve`: an OpenAI-compatible HTTP API in front of the generation core.

requests.py reads a chat completion request (OpenAI's parameters and errors; the messages through
data/formats); batcher.py answers requests in arrival order on one worker thread, batching queued greedy ones;
stream.py turns a streamed answer into server-sent events; routes.py is the FastAPI app; server.py binds it.
"""
