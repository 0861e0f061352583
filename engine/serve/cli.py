"""`python -m engine.serve MODEL_PATH` (also the `modeltest-serve` command): the OpenAI-compatible
server, with vLLM's flag names (`vllm serve`).

Startup order: flags, the model folder (config.json, tokenizer, weights present: a bad one is one
line and exit 2 before anything loads), the listening socket (bound first, so a busy port fails
fast; it accepts nothing until the server runs), the engine, then uvicorn. Once it accepts
connections it prints `engine.serve: listening on http://HOST:PORT` on stderr, with the real port
when --port is 0. SIGTERM or Ctrl-C: no new connections, the requests in flight finish (at most
--drain-timeout seconds, then they are cancelled), the engine thread stops, exit 0.

Under torchrun with --tensor-parallel-size N (the world being N processes), rank 0 serves HTTP and
the other ranks follow its engine step by step (engine/serve/worker.py).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

from ..errors import EngineError

PROG = "engine.serve"
SCRIPT = "modeltest-serve"
EXIT_BAD_INPUT = 2
EPILOG = """\
examples:
  python -m engine.serve /data/Qwen-VL-Chat --port 8000
  python -m engine.serve /data/Qwen-VL --chat-template raw --api-key secret --max-waiting 64
  torchrun --nproc_per_node 2 -m engine.serve /data/Qwen-VL-Chat --tensor-parallel-size 2

routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health, GET /metrics

exit codes:
  0    stopped by SIGTERM / Ctrl-C after draining the requests in flight
  1    the engine failed while serving (the traceback is on stderr)
  2    bad flags, model folder or address (one line on stderr)
"""


class _Parser(argparse.ArgumentParser):
    """Bad flags are one line on stderr (and exit 2), not the usage block."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{PROG}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    # the name the user typed: the console script (also .exe / -script.py on Windows), or python -m
    typed = SCRIPT if sys.argv and Path(sys.argv[0]).name.startswith(SCRIPT) else "python -m engine.serve"
    p = _Parser(prog=typed, description="OpenAI-compatible HTTP server for the bundled engine.", epilog=EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("model", help="checkpoint folder (config.json, tokenizer files, weights)")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port, printed once listening)")
    g.add_argument("--api-key", default=os.environ.get("MODELTEST_API_KEY"),
                   help="require `Authorization: Bearer KEY` on every route (default: $MODELTEST_API_KEY)")
    g.add_argument("--served-model-name", nargs="+", metavar="NAME",
                   help="model name(s) clients use (default: MODEL as given)")
    g.add_argument("--chat-template", choices=("auto", "chatml", "raw"), default="auto",
                   help="chat prompts: chatml (Qwen-VL-Chat's make_context) or raw (base models: images as "
                        "<img>..</img>, texts as they are, nothing added); auto: the checkpoint's "
                        "generation_config.json chat_format, else chatml")
    g.add_argument("--max-waiting", type=int, metavar="N",
                   help="requests allowed to wait for a place in the batch; more get 503 with Retry-After "
                        "(default: no limit)")
    g.add_argument("--drain-timeout", type=float, default=30.0, metavar="S",
                   help="on SIGTERM, seconds the requests in flight get to finish (default 30)")
    g.add_argument("--allowed-local-media-path", metavar="DIR",
                   help="local images (file:// URLs, <img>path</img> in completions) are read only from under "
                        "DIR (default: none are)")
    g.add_argument("--max-image-bytes", type=int, default=20 << 20, metavar="N",
                   help="largest image file accepted, in bytes (default 20 MiB)")
    g.add_argument("--max-image-pixels", type=int, default=4096 * 4096, metavar="N",
                   help="largest width x height accepted, checked from the image's header before decoding "
                        "(default 4096 x 4096)")
    g.add_argument("--limit-mm-per-prompt", default='{"image": 8}', metavar="JSON",
                   help='images per request, as vLLM takes it (default \'{"image": 8}\')')
    g.add_argument("--uvicorn-log-level", default="info",
                   choices=("critical", "error", "warning", "info", "debug", "trace"))
    g.add_argument("--disable-uvicorn-access-log", action="store_true", help="no log line per request")
    e = p.add_argument_group("engine (vLLM's names)")
    e.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"),
                   help="auto: the checkpoint's dtype on an accelerator, float32 on cpu")
    e.add_argument("--device", help="cpu, cuda[:i] or npu[:i] (default: the best available)")
    e.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                   help="run the model over N processes (start under torchrun --nproc_per_node N)")
    e.add_argument("--max-num-seqs", type=int, metavar="N", help="sequences running at once (default 16)")
    e.add_argument("--max-model-len", type=int, metavar="N", help="context length (default: the model's)")
    e.add_argument("--max-num-batched-tokens", type=int, metavar="N", help="prefill tokens per step")
    e.add_argument("--block-size", type=int, default=128, metavar="N", help="KV-cache block, in tokens")
    e.add_argument("--num-gpu-blocks-override", type=int, metavar="N", help="KV-cache blocks (default: sized "
                   "from the device's memory)")  # fmt: skip
    e.add_argument("--gpu-memory-utilization", type=float, metavar="F",
                   help="share of the device's memory the engine may use (default 0.9)")
    e.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    e.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True,
                   help="share each step's --max-num-batched-tokens between running decodes and prompt chunks")
    e.add_argument("--enforce-eager", action="store_true",
                   help="no CUDA graphs for decode steps (captured at start-up on CUDA otherwise)")
    e.add_argument("--seed", type=int, default=0, help="the sampler's seed for requests without their own")
    return p


def _checked(args: argparse.Namespace) -> dict:
    """Flag values the parser cannot check; EngineError names the flag."""
    if not 0 <= args.port <= 65535:
        raise EngineError(f"--port {args.port}: use 0..65535 (0: any free port)")
    for flag, value in (("--max-waiting", args.max_waiting), ("--max-image-bytes", args.max_image_bytes),
                        ("--max-image-pixels", args.max_image_pixels)):  # fmt: skip
        if value is not None and value < 1:
            raise EngineError(f"{flag} {value}: must be >= 1")
    if args.drain_timeout < 0:
        raise EngineError(f"--drain-timeout {args.drain_timeout}: must be >= 0 seconds")
    if args.allowed_local_media_path is not None and not Path(args.allowed_local_media_path).is_dir():
        raise EngineError(f"--allowed-local-media-path {args.allowed_local_media_path}: not a folder")
    try:
        limits = json.loads(args.limit_mm_per_prompt)
    except ValueError:
        limits = None
    if not (isinstance(limits, dict) and set(limits) <= {"image"}
            and all(isinstance(v, int) and v >= 0 for v in limits.values())):  # fmt: skip
        raise EngineError(f"--limit-mm-per-prompt {args.limit_mm_per_prompt}: give JSON like '{{\"image\": 8}}'")
    world = os.environ.get("WORLD_SIZE")
    if world is not None and world != str(args.tensor_parallel_size):
        raise EngineError(f"--tensor-parallel-size {args.tensor_parallel_size} under torchrun with {world} "
                          f"processes: the server runs one model; start --nproc_per_node {args.tensor_parallel_size}")  # fmt: skip
    return {"max_images": limits.get("image", 8)}


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound now (uvicorn listens on it once the engine is up)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise EngineError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def serve(args: argparse.Namespace) -> int:
    from ..config import EngineArgs
    from ..llm_engine import LLMEngine, check_model

    extra = _checked(args)
    check_model(args.model, args.tensor_parallel_size)
    tp = args.tensor_parallel_size
    rank = int(os.environ.get("RANK", "0")) if tp > 1 else 0
    sock = _bind(args.host, args.port) if rank == 0 else None
    engine = LLMEngine.from_engine_args(EngineArgs(
        model=args.model, dtype=args.dtype, device=args.device, tensor_parallel_size=tp,
        max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
        max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
        num_blocks=args.num_gpu_blocks_override, gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=args.enable_prefix_caching, enable_chunked_prefill=args.enable_chunked_prefill,
        enforce_eager=args.enforce_eager, seed=args.seed,
    ))  # fmt: skip
    broadcast = None
    if tp > 1:
        from .worker import CommandBroadcast, follow

        broadcast = CommandBroadcast(tp)
        if rank != 0:
            follow(engine, broadcast)
            return 0
    return _run_http(args, extra, engine, broadcast, sock)


def _run_http(args, extra: dict, engine, broadcast, sock: socket.socket) -> int:
    import uvicorn

    from .app import ServeState, create_app
    from .media import MediaLimits
    from .metrics import ServeMetrics
    from .prompts import resolve_template
    from .worker import EngineWorker

    names = args.served_model_name or [args.model]
    worker = EngineWorker(engine, args.max_waiting, broadcast=broadcast)
    worker.metrics = metrics = ServeMetrics(names[0], lambda: (worker.stats, worker.num_queued))
    tokenizer = engine.get_tokenizer()
    allowed = args.allowed_local_media_path
    state = ServeState(
        worker=worker, metrics=metrics, served_model_names=names, model_path=Path(args.model),
        max_model_len=engine.config.max_model_len,
        chat_template=resolve_template(args.chat_template, Path(args.model)),
        media=MediaLimits(args.max_image_bytes, args.max_image_pixels, extra["max_images"],
                          None if allowed is None else Path(allowed)),
        token_bytes=_token_bytes(tokenizer), api_key=args.api_key or None, created=int(time.time()),
    )  # fmt: skip
    config = uvicorn.Config(create_app(state), log_level=args.uvicorn_log_level,
                            access_log=not args.disable_uvicorn_access_log,
                            timeout_graceful_shutdown=args.drain_timeout)  # fmt: skip
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                print(f"{PROG}: listening on http://{shown}:{port}", file=sys.stderr, flush=True)

    # uvicorn drains on SIGTERM / SIGINT, then re-raises the signal to the handler it found: make that
    # one a no-op, so a drained server exits 0 (not killed by its own signal)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    Server(config).run(sockets=[sock])
    return 0 if worker.error is None else 1


def _token_bytes(tokenizer):
    """One token's bytes (a token may hold part of a UTF-8 character): the tokenizer's own, else its text."""
    own = getattr(tokenizer, "token_bytes", None)
    return own if own is not None else (lambda token_id: tokenizer.decode([token_id]).encode())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return serve(args)
    except EngineError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:  # before the server runs (while loading)
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
