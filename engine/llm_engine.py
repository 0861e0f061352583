"""`LLMEngine`: requests in, one step at a time, outputs out (vLLM's name and shape).

    engine = LLMEngine.from_engine_args(EngineArgs(model="/data/Qwen-VL"))
    engine.add_request("a", prompt, SamplingParams(max_tokens=16, output_kind=RequestOutputKind.DELTA))
    while engine.has_unfinished_requests():
        for out in engine.step():          # the requests that changed in this step
            print(out.request_id, out.outputs[0].text, out.finished)
    engine.abort_request("a")              # whenever: its KV blocks are free when this returns

Building it reads config.json, finds the model family in the registry, builds the model on the meta
device, loads the checkpoint's tensors into place and sizes the paged KV cache (engine/kv_sizing.py).
A request is rendered and checked when it is added (a bad one raises EngineError and is not queued);
its images are read then. Each step: the scheduler picks the batch, the model runner runs it, the
sampler picks one token per sequence (but for those that computed a prompt chunk short of its end:
chunked prefill), and each sequence's text grows by that token's (stop strings
and end tokens checked on the new text only).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import cuda_graphs
from .block_manager import BlockManager, blocks_for
from .config import EngineArgs
from .detokenizer import Detokenizer
from .device import DeviceError, now, resolve_device
from .distributed import init_tensor_parallel
from .errors import EngineError
from .kv_sizing import size_kv_cache
from .loader import load_weights
from .model_runner import ModelRunner
from .models import load_family
from .sampling import RequestOutputKind, Sampler, SamplingParams
from .scheduler import Scheduler
from .sequence import RequestOutput, Sequence, Status

logger = logging.getLogger("engine")
_handler: logging.Handler | None = None  # the stderr handler the engine added itself, if it did


def _default_logging(rank: str = "") -> None:
    """Like vLLM, say what the engine decided (KV cache size) on stderr unless the application has
    configured logging itself; under tensor parallelism each line names its rank."""
    global _handler
    if _handler is None:
        if logger.handlers or logging.getLogger().handlers:
            return  # the application's handlers and formats stay as they are
        _handler = logging.StreamHandler()
        logger.addHandler(_handler)
        logger.setLevel(logging.INFO)
    _handler.setFormatter(logging.Formatter(f"engine{rank}: %(message)s"))


def check_model(model: str | Path, tensor_parallel_size: int = 1) -> None:
    """What building an engine on `model` would check first, without loading any weight: the folder,
    config.json (a model type the engine runs), the tokenizer files, that weights are there, and that
    the model splits tensor_parallel_size ways. EngineError says what is wrong."""
    from .loader import checkpoint_files

    path = Path(model)
    if not path.is_dir():
        raise EngineError(f"model folder not found: {path}")
    load_family(path, tensor_parallel_size)
    checkpoint_files(path)


@dataclass(frozen=True)
class EngineStats:
    num_running: int  # sequences in the running batch
    num_waiting: int  # queued, not yet admitted (or preempted)
    kv_blocks_used: int
    kv_blocks_total: int
    num_preemptions: int  # since the engine started
    prefix_cache_hit_tokens: int  # prompt tokens served from the prefix cache, since the engine started
    image_cache_hits: int
    image_cache_misses: int

    @property
    def kv_cache_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total


class LLMEngine:
    def __init__(self, args: EngineArgs):
        _default_logging()
        model_path = Path(args.model)
        if not model_path.is_dir():
            raise EngineError(f"model folder not found: {model_path}")
        self.family = family = load_family(model_path, args.tensor_parallel_size)
        try:
            device = resolve_device(args.device)
        except DeviceError as e:
            raise EngineError(str(e)) from None
        self.parallel, device = init_tensor_parallel(args.tensor_parallel_size, device)
        if self.parallel.tp_size > 1:
            _default_logging(f"[tp rank {self.parallel.tp_rank}]")
        spec = family.spec
        max_model_len = spec.max_model_len if args.max_model_len is None else args.max_model_len
        limit = spec.max_model_len_limit
        if limit is not None and isinstance(max_model_len, int) and max_model_len > limit:
            raise EngineError(f"max_model_len {max_model_len} is beyond {limit}, {spec.limit_reason}")
        self.config = c = args.engine_config(device, spec.checkpoint_dtype, max_model_len)
        self.tokenizer = family.tokenizer
        warmup_images = [family.warmup_image(p) for p in args.warmup_images or []]  # read before the weights
        with torch.device("meta"):
            self.model = family.build_model(self.parallel)
        progress = args.progress and self.parallel.tp_rank == 0
        load_weights(self.model, model_path, c.dtype, device, family.checkpoint_name, progress=progress)
        self.model.eval()

        c.num_blocks = size_kv_cache(c, family, self.model, args.warmup, self.parallel, warmup_images)
        self.block_manager = BlockManager(c.num_blocks, c.block_size, c.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, c.max_batch_size, c.max_prefill_tokens,
                                   chunked_prefill=c.enable_chunked_prefill)  # fmt: skip
        capture = None if c.enforce_eager else cuda_graphs.capture_for(device)
        self.runner = ModelRunner(self.model, spec, self.block_manager, c.dtype, device, c.attention_backend,
                                  image_cache_bytes=int(c.image_cache_gb * (1 << 30)),
                                  scratch_blocks=1 if capture else 0)  # fmt: skip
        if capture is not None and self.runner.attention.graph_safe:
            state = family.request_state(family.warmup_prompt(1, 0))[0]  # a one-token prompt's
            self.runner.capture_graphs(c.max_batch_size, c.max_model_len, state, capture)
        elif capture is not None:
            logger.info("decode graphs: off, the %s attention backend decodes with host work (the cuda backend's "
                        "Triton kernel does not)", self.runner.attention.name)  # fmt: skip
        self.sampler = Sampler(args.seed)
        self.requests: dict[str, Sequence] = {}  # unfinished, by request id
        self._seq_ids = itertools.count()

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> LLMEngine:
        return cls(args)

    def get_tokenizer(self):
        return self.tokenizer

    def prompt_token_ids(self, prompt) -> list[int]:
        """The token ids `prompt` runs as (image spans included; no image is read): its input length."""
        return list(self.family.process_prompt(prompt).token_ids)

    # ---- requests -------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> None:  # fmt: skip
        """Queue a request. Its prompt is rendered and checked now: EngineError if it cannot run (too
        long, a bad image, ...), and nothing is queued."""
        if request_id in self.requests:
            raise EngineError(f"request id {request_id!r} is already in the engine")
        seq = self._make_sequence(request_id, prompt, params or SamplingParams())
        if arrival_time is not None:
            seq.arrival_time = arrival_time
        self.requests[request_id] = seq
        self.scheduler.add(seq)

    def _make_sequence(self, request_id: str, prompt, params: SamplingParams) -> Sequence:
        if not isinstance(params, SamplingParams):
            raise EngineError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        processed = self.family.process_prompt(prompt)
        n = len(processed.token_ids)
        c = self.config
        if n + params.max_tokens > c.max_model_len:
            raise EngineError(
                f"the prompt is {n} tokens; with max_tokens {params.max_tokens} it needs {n + params.max_tokens}, "
                f"more than max_model_len {c.max_model_len}"
            )
        need = blocks_for(n + params.max_tokens, c.block_size)
        if need > c.num_blocks:
            raise EngineError(
                f"the prompt ({n} tokens) with max_tokens {params.max_tokens} needs {need} KV blocks; the cache has "
                f"{c.num_blocks}: raise kv_cache_memory_gb / num_blocks or shorten the request"
            )
        self.family.load_images(processed)
        eos = self.tokenizer.eos_token_id
        end_ids = set(params.stop_token_ids) | processed.stop_token_ids
        if not params.ignore_eos:
            end_ids.add(eos)
        state, salt = self.family.request_state(processed)
        return Sequence(
            seq_id=next(self._seq_ids),
            request_id=request_id,
            prompt=processed.text,
            prompt_token_ids=processed.token_ids,
            params=params,
            end_ids=frozenset(end_ids),
            eos_token_id=eos,
            images=processed.images,
            state=state,
            cache_salt=salt,
            detokenizer=Detokenizer(self.tokenizer.token_stream(), params.stop),
            logprobs=[] if params.logprobs is not None else None,
            cumulative_logprob=0.0 if params.logprobs is not None else None,
            generator=None if params.seed is None else torch.Generator().manual_seed(params.seed),
        )

    def abort_request(self, request_id: str | Iterable[str]) -> None:
        """Stop requests wherever they are (queued or running); their KV blocks are free when this
        returns. Unknown or finished ids are ignored."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            seq = self.requests.pop(rid, None)
            if seq is not None:
                self.scheduler.abort(seq)
                seq.finish_reason = "abort"

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    def stats(self) -> EngineStats:
        bm, cache = self.block_manager, self.runner.image_cache
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_blocks_used=bm.num_used,
            kv_blocks_total=bm.num_blocks,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_hit_tokens=bm.hit_tokens,
            image_cache_hits=cache.hits,
            image_cache_misses=cache.misses,
        )

    # ---- one step ---------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduled step; returns the outputs of the requests it changed (per their output_kind)."""
        if not self.requests:
            return []
        seqs = self.scheduler.schedule()
        if not seqs:  # everything running was preempted this step
            return []
        logits = self.runner.run(seqs)  # [seqs, vocab] fp32
        done = [i for i, seq in enumerate(seqs) if seq.chunk_end is None]  # not mid-prompt: they sample
        if len(done) < len(seqs):
            logits, seqs = logits[done], [seqs[i] for i in done]
            if not seqs:
                return []
        sampled = self.sampler(logits, seqs)
        stamp = now(self.config.device)  # after the device finished the step: true TTFT / token times
        outputs = []
        for seq, token, logprobs in zip(seqs, sampled.tokens, sampled.logprobs, strict=True):
            self._append(seq, token, logprobs, stamp)
            if seq.is_finished:
                self.scheduler.finish(seq)
                del self.requests[seq.request_id]
            if seq.is_finished or seq.params.output_kind is not RequestOutputKind.FINAL_ONLY:
                outputs.append(RequestOutput.from_sequence(seq))
        return outputs

    def _append(self, seq: Sequence, token: int, logprobs, stamp: float) -> None:
        """Add one generated token, then check whether it ends the sequence: an end token (not part of
        the text), a stop string in the new text (the text ends before it), max_tokens or max_model_len."""
        if seq.first_token_time is None:
            seq.first_token_time = stamp
        if logprobs is not None:
            seq.logprobs.append(logprobs)
            seq.cumulative_logprob += float(logprobs[token])
        seq.output_token_ids.append(token)
        p, n, detok = seq.params, len(seq.output_token_ids), seq.detokenizer
        if token in seq.end_ids:
            detok.finish()
            seq.finish_reason, seq.stop_reason = "stop", None if token == seq.eos_token_id else token
        else:
            detok.push(token)
            hit = detok.find_stop() if p.stop and n >= p.min_tokens else None
            if hit is not None:
                detok.finish(cut=hit[0])
                seq.finish_reason, seq.stop_reason = "stop", hit[1]
            elif n >= p.max_tokens or seq.num_tokens >= self.config.max_model_len:
                detok.finish()
                seq.finish_reason = "length"
        if seq.finish_reason is not None:
            seq.status = Status.FINISHED
            seq.finish_time = stamp
