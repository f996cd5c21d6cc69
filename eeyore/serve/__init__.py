"""Serving: an OpenAI-compatible HTTP server and offline generation over one batching engine.

How to read this package, following one chat request from HTTP to a sampled token:

1. `app.py` — the aiohttp routes. A request body is read and checked by `protocol.py` (the
   OpenAI wire format: every field validated into `SamplingParams`, the response bodies, the
   `ErrorReply` envelope), tokenized off the event loop, and handed to the engine.
2. `params.py` — `SamplingParams` (one request's generation settings), where their defaults come
   from (transformers < generation_config.json < server flags < request) and their allowed ranges.
3. `engine.py` — the step loop on the engine's own thread: prefill, then one batched decode
   forward over the running rows, then the sampler, then text out through `text.py` (stop
   strings matched across tokens). `scheduler.py` decides which request sits in which KV-cache
   slot (admission, the waiting line, prefix reuse); `request.py` is one request's state
   (`Request` owns its tokens) and what flows out of it (`Output`, `Completion`, the errors).
4. `sampler.py` — the logits processors and the draw, batched with per-row parameters; a row
   with a `response_format` first has every token its `guided.py` Guide does not allow set to
   -inf (`guided_schema.py` turns the JSON schema into what the Guide walks).

Around them: `memory.py` sizes the KV cache from the model and the free memory; `offline.py` is
`Engine.generate` / `agenerate` for scripts; `lifecycle.py` is listening and the SIGTERM drain;
`__main__.py` is the command line (`python -m eeyore.serve --help`); `client.py` is the async
client the evaluator and data tools use, and `structured.py` its send-`response_format`-else-
fall-back rule.
"""
