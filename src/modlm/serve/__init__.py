"""Serving: ``modlm-serve``, an OpenAI-compatible HTTP server with continuous batching over MoD's routed caches.

``engine.py`` (the decode loop: one thread, one running batch that requests join and leave between
steps), ``text.py`` (a continuation's text as it arrives, stop strings), ``schema.py`` (the request
bodies), ``errors.py`` (OpenAI-style errors), ``completions.py`` (a request's job and its answer,
whole or streamed), ``app.py`` (the FastAPI app: endpoints, the key, the body limit), ``command.py``
(the command line). Beside ``cli``: it reads models through ``modlm.saved`` and imports no training code.
"""
