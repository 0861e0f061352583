"""The engine's OpenAI-compatible HTTP server: `python -m engine.serve MODEL_PATH` (`modeltest-serve`).

    cli.py       flags (vLLM's names), startup, uvicorn, SIGTERM drain
    app.py       FastAPI routes, OpenAI error bodies, API key, streaming with disconnect = abort
    worker.py    the one engine thread (requests in through a queue, outputs back to the loop), and
                 the followers of rank 0 under tensor parallelism
    protocol.py  request models and response / chunk shapes
    prompts.py   messages -> the engine's prompt forms (chatml | raw)
    media.py     images from data: URLs and allowed local files, with size and pixel limits
    metrics.py   Prometheus metrics (engine:... names, the server's own registry)
"""
