"""`LLM`: the engine's facade, named and shaped like vLLM's.

    llm = LLM("/data/Qwen-VL", dtype="bfloat16")
    outs = llm.generate(["Picture 1: <img>/data/a.jpg</img>\\nWhat is this? Answer:"], SamplingParams(max_tokens=10))
    outs[0].text, outs[0].token_ids, outs[0].finish_reason, outs[0].ttft

Building it reads config.json, builds the model on the meta device, loads the checkpoint's tensors
into place, and sizes the paged KV cache. `generate` renders and checks every prompt first (a bad
prompt fails before any model work, or, with errors="return", becomes that prompt's error output),
then runs scheduler steps until every sequence has finished.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from .block_manager import BlockManager, blocks_for
from .config import EngineConfig, resolve_dtype
from .device import (
    MemoryInfo,
    available_memory,
    empty_cache,
    memory_info,
    now,
    peak_memory,
    reset_peak_memory,
    resolve_device,
)
from .errors import EngineError
from .image_cache import pixel_key
from .model_runner import ModelRunner
from .models.qwen_vl.config import QwenVLConfig
from .models.qwen_vl.language import LOGN_TABLE_LEN, QwenVLForCausalLM, ntk_alpha
from .models.qwen_vl.processor import resize
from .models.qwen_vl.tokenizer import QwenVLTokenizer
from .models.qwen_vl.weights import load_weights
from .prompts import is_single_prompt, render_prompt
from .sampling import SamplingParams, process_logits, sample_row, top_logprobs
from .scheduler import Scheduler
from .sequence import RequestOutput, Sequence, Status

logger = logging.getLogger("engine")


def _default_logging() -> None:
    """Like vLLM, say what the engine decided (KV cache size) on stderr unless the application has
    configured logging itself."""
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("engine: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


ACTIVATION_RESERVE = 2 << 30  # bytes kept free for activations on an accelerator sized without a warm-up
DEFAULT_MEMORY_FRACTION = 0.9  # of the device's total memory the engine may use (weights, activations, KV)
CPU_KV_SHARE = 0.5  # at most this share of the host's available memory goes to the KV cache on CPU


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def _env_knob(name: str, value: float | None, default: float) -> float:
    """An explicit argument, else the seed's environment variable, else the default."""
    if value is not None:
        return value
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    try:
        return float(raw)
    except ValueError:
        raise EngineError(f"environment variable {name}={raw!r} is not a number") from None


def kv_budget(info: MemoryInfo, peak: int, fraction: float, reserved_gb: float) -> tuple[float, str]:
    """Bytes for the KV cache after a warm-up, the seed's formula: fraction x device memory - reserved
    - the warm-up's peak (weights + activations) - memory used outside this process's allocator
    (the driver context, other processes)."""
    others = max(0, info.total - info.free - info.torch_reserved)
    reserved = reserved_gb * (1 << 30)
    budget = fraction * info.total - reserved - peak - others
    why = (f"{fraction:.0%} of {_gib(info.total)} GiB device memory - {reserved_gb:g} GiB reserved - "
           f"{_gib(peak)} GiB warm-up peak - {_gib(others)} GiB used outside torch")  # fmt: skip
    return budget, why


class LLM:
    def __init__(
        self,
        model: str | Path,
        dtype: str | torch.dtype = "auto",
        device: str | None = None,
        block_size: int = 128,
        max_batch_size: int = 16,
        max_model_len: int | None = None,
        max_prefill_tokens: int | None = None,
        num_blocks: int | None = None,
        kv_cache_memory_gb: float | None = None,
        memory_fraction: float | None = None,
        reserved_memory_gb: float | None = None,
        warmup: bool | None = None,
        image_cache_gb: float = 0.5,
        enable_prefix_caching: bool = True,
        attention_backend: str | None = None,
        seed: int = 0,
        progress: bool = True,
    ):
        from .device import DeviceError

        _default_logging()
        model_path = Path(model)
        if not model_path.is_dir():
            raise EngineError(f"model folder not found: {model_path}")
        self.model_config = QwenVLConfig.from_pretrained(model_path)
        try:
            device = resolve_device(device)
        except DeviceError as e:
            raise EngineError(str(e)) from None
        cfg = self.model_config
        limit = LOGN_TABLE_LEN if cfg.use_logn_attn else None
        if max_model_len is None:
            max_model_len = cfg.max_position_embeddings if limit is None else min(cfg.max_position_embeddings, limit)
        if limit is not None and max_model_len > limit:
            raise EngineError(
                f"max_model_len {max_model_len} is beyond {limit}, the longest context Qwen-VL's log-n attention covers"
            )
        self.config = EngineConfig(
            model=str(model_path),
            dtype=resolve_dtype(dtype, device, cfg.torch_dtype),
            device=device,
            block_size=block_size,
            max_batch_size=max_batch_size,
            max_model_len=max_model_len,
            max_prefill_tokens=max_prefill_tokens,
            num_blocks=num_blocks,
            kv_cache_memory_gb=kv_cache_memory_gb,
            memory_fraction=_env_knob("NPU_MEMORY_FRACTION", memory_fraction, DEFAULT_MEMORY_FRACTION),
            reserved_memory_gb=_env_knob("RESERVED_MEMORY_GB", reserved_memory_gb, 0.0),
            image_cache_gb=image_cache_gb,
            enable_prefix_caching=enable_prefix_caching,
            attention_backend=attention_backend,
        )
        self.tokenizer = QwenVLTokenizer(model_path)
        if self.tokenizer.vocab_size > cfg.vocab_size:
            raise EngineError(
                f"{model_path / 'config.json'}: vocab_size {cfg.vocab_size} is smaller than the tokenizer's "
                f"{self.tokenizer.vocab_size} tokens"
            )
        with torch.device("meta"):
            self.model = QwenVLForCausalLM(cfg)
        load_weights(self.model, model_path, self.config.dtype, device, progress=progress)
        self.model.eval()

        self.config.num_blocks = self._size_kv_cache(warmup)
        self.block_manager = BlockManager(self.config.num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_batch_size, self.config.max_prefill_tokens)
        self.runner = ModelRunner(self.model, self.block_manager, self.config.dtype, device, attention_backend,
                                  image_cache_bytes=int(image_cache_gb * (1 << 30)))  # fmt: skip
        self.generator = torch.Generator().manual_seed(seed)  # for requests without their own seed
        self._next_id = 0

    def _size_kv_cache(self, warmup: bool | None) -> int:
        """Blocks for the KV cache: num_blocks, or kv_cache_memory_gb, or what the device has left
        after a warm-up step (accelerators), or a share of host memory (cpu); never more than a full
        batch of max_model_len sequences needs."""
        c = self.config
        per_block = ModelRunner.kv_bytes_per_block(self.model_config, c.block_size, c.dtype)
        wanted = c.max_batch_size * blocks_for(c.max_model_len, c.block_size)
        info = memory_info(c.device)
        if warmup is None:
            warmup = info is not None and c.num_blocks is None and c.kv_cache_memory_gb is None
        peak = self._profile_run() if warmup else None
        if c.num_blocks is not None:
            num, why = c.num_blocks, "num_blocks"
        else:
            if c.kv_cache_memory_gb is not None:
                budget, why = c.kv_cache_memory_gb * (1 << 30), "kv_cache_memory_gb"
            elif info is None:
                budget, why = available_memory(c.device) * CPU_KV_SHARE, f"{CPU_KV_SHARE:.0%} of available host memory"
            elif peak is not None:
                budget, why = kv_budget(memory_info(c.device), peak, c.memory_fraction, c.reserved_memory_gb)
            else:
                budget = info.free * c.memory_fraction - c.reserved_memory_gb * (1 << 30) - ACTIVATION_RESERVE
                why = (f"{c.memory_fraction:.0%} of {_gib(info.free)} GiB free device memory - {c.reserved_memory_gb:g} "
                       f"GiB reserved - {_gib(ACTIVATION_RESERVE)} GiB for activations (no warm-up)")  # fmt: skip
            num = min(wanted, int(budget // per_block))
            if num == wanted:
                why = f"a full batch: {c.max_batch_size} x max_model_len {c.max_model_len}; within {why}"
            else:
                why = f"{why}; a full batch of {c.max_batch_size} x max_model_len {c.max_model_len} wants {wanted} blocks"
        if num < 1:
            raise EngineError(
                f"no room for the KV cache ({why}): one block of {c.block_size} tokens needs {per_block / 2**20:.1f} MiB; "
                "lower block_size or max_model_len, or set kv_cache_memory_gb / num_blocks"
            )
        logger.info(
            "KV cache: %d blocks x %d tokens = %d tokens, %.2f GiB (%s)",
            num, c.block_size, num * c.block_size, num * per_block / 2**30, why,
        )  # fmt: skip
        return num

    @torch.inference_mode()
    def _profile_run(self) -> int | None:
        """The seed's warm-up: one prefill step as large as the scheduler can build (max_prefill_tokens
        tokens over up to max_batch_size sequences, each long enough starting with a blank 448x448
        image, all images through the vision tower at once) on a throwaway KV cache. Returns the
        device's peak bytes in use (weights + activations, the throwaway cache excluded); None on cpu."""
        from PIL import Image

        c, cfg = self.config, self.model_config
        total = min(c.max_prefill_tokens, c.max_batch_size * c.max_model_len)
        span = self.tokenizer.encode("<img>warm-up</img>")  # <img> + 256 slots + </img>
        n = max(-(-total // c.max_model_len), min(c.max_batch_size, max(1, total // len(span))))
        lengths = [total // n + (i < total % n) for i in range(n)]
        blank = resize(Image.new("RGB", (cfg.visual.image_size,) * 2), cfg.visual.image_size)
        filler = self.tokenizer.encode(" the")
        seqs = []
        for i, length in enumerate(lengths):
            with_image = length >= len(span)
            ids = (span if with_image else []) + filler * (length - (len(span) if with_image else 0))
            seqs.append(Sequence(seq_id=-1 - i, prompt="", prompt_token_ids=ids, params=SamplingParams(max_tokens=1),
                                 end_ids=set(), images=[blank] if with_image else [],
                                 image_keys=[f"warm-up-{i}"] if with_image else [],
                                 image_starts=[0] if with_image else []))  # fmt: skip
        blocks = sum(blocks_for(length, c.block_size) for length in lengths)
        reset_peak_memory(c.device)
        bm = BlockManager(blocks, c.block_size, prefix_caching=False)
        runner = ModelRunner(self.model, bm, c.dtype, c.device, c.attention_backend)
        for seq in seqs:
            bm.allocate(seq)
        images = sum(len(seq.images) for seq in seqs)
        t0 = now(c.device)
        runner.run(seqs)
        elapsed = now(c.device) - t0
        peak = peak_memory(c.device)
        del runner, bm, seqs
        empty_cache(c.device)
        throwaway = blocks * ModelRunner.kv_bytes_per_block(cfg, c.block_size, c.dtype)
        shown = "not measured on cpu" if peak is None else f"peak {_gib(peak - throwaway)} GiB (weights + activations)"
        logger.info("warm-up: %d tokens in %d sequences, %d images, %.2f s; %s",
                    total, n, images, elapsed, shown)  # fmt: skip
        return None if peak is None else peak - throwaway

    # ---- requests -------------------------------------------------------------------------

    def _make_sequence(self, prompt, params: SamplingParams) -> Sequence:
        rendered = render_prompt(self.tokenizer, prompt)
        n = len(rendered.token_ids)
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
        size = self.model_config.visual.image_size
        pixels = [resize(image, size) for image in rendered.images]  # uint8 until the vision tower needs them
        keys = [pixel_key(p) for p in pixels]  # the same content key as the float pixels': normalize is 1:1
        end_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            end_ids.add(self.tokenizer.eod_id)
        if rendered.is_chat:
            end_ids |= {self.tokenizer.im_end_id, self.tokenizer.im_start_id}
        seq = Sequence(
            seq_id=self._next_id,
            prompt=rendered.text,
            prompt_token_ids=rendered.token_ids,
            params=params,
            end_ids=end_ids,
            images=pixels,
            image_keys=keys,
            image_starts=rendered.image_starts,
            logprobs=[] if params.logprobs is not None else None,
        )
        cfg = self.model_config
        if cfg.use_dynamic_ntk:  # fixed by the prompt's length, also when a preempted sequence is recomputed
            seq.ntk_alpha = ntk_alpha(n, cfg.seq_length)
        if params.seed is not None:
            seq.generator = torch.Generator().manual_seed(params.seed)
        self._next_id += 1
        return seq

    def generate(
        self, prompts, sampling_params=None, use_tqdm: bool = True, errors: str = "raise", on_output=None
    ) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. `errors="return"` turns a prompt that cannot run (bad
        image, too long) into an output with finish_reason "error" and the message in `.error`.
        `on_output(index, output)` is called as each prompt finishes, so callers can save results
        while the rest still runs."""
        from tqdm import tqdm

        if errors not in ("raise", "return"):
            raise EngineError(f"errors must be 'raise' or 'return', got {errors!r}")
        if is_single_prompt(prompts):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params_list = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params_list) != len(prompts):
            raise EngineError(f"{len(params_list)} sampling params for {len(prompts)} prompts")

        outputs: list[RequestOutput | None] = [None] * len(prompts)
        index: dict[int, int] = {}
        seqs = []
        for i, (prompt, params) in enumerate(zip(prompts, params_list, strict=True)):
            try:
                seq = self._make_sequence(prompt, params)
            except EngineError as e:
                if errors == "raise":
                    raise EngineError(f"prompt {i}: {e}") from None  # nothing was queued yet
                outputs[i] = RequestOutput(self._next_id, str(prompt)[:200], [], "", [], "error", error=str(e))
                self._next_id += 1
                if on_output:
                    on_output(i, outputs[i])
                continue
            index[seq.seq_id] = i
            seqs.append(seq)
        for seq in seqs:
            self.scheduler.add(seq)

        bar = tqdm(total=len(index), desc="generating", unit="req", disable=not use_tqdm)
        try:
            while self.scheduler.has_work():
                for seq in self.step():
                    i = index[seq.seq_id]
                    outputs[i] = RequestOutput.from_sequence(seq)
                    bar.update()
                    if on_output:
                        on_output(i, outputs[i])
        finally:
            bar.close()
            self._abort_all()
        return outputs  # type: ignore[return-value]

    def _abort_all(self) -> None:
        """Drop whatever an interrupted generate left behind, so the engine stays usable."""
        for seq in list(self.scheduler.running):
            self.scheduler.finish(seq)
        self.scheduler.waiting.clear()

    # ---- one engine step ------------------------------------------------------------------

    def step(self) -> list[Sequence]:
        """Run one scheduled step; returns the sequences that finished in it."""
        seqs = self.scheduler.schedule()
        logits = self.runner.run(seqs)  # [seqs, vocab] fp32
        tokens = self._sample(seqs, logits)
        stamp = now(self.config.device)  # after the device finished the step: true TTFT / token times
        finished = []
        for seq, token, row in zip(seqs, tokens, logits, strict=True):
            if seq.first_token_time is None:
                seq.first_token_time = stamp
            if seq.logprobs is not None:
                seq.logprobs.append(top_logprobs(row, token, seq.params.logprobs))
            seq.output_token_ids.append(token)
            if self._check_finished(seq):
                seq.finish_time = stamp
                self.scheduler.finish(seq)
                finished.append(seq)
        return finished

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
        plain = [
            s.params.greedy and s.params.repetition_penalty == 1.0 and len(s.output_token_ids) >= s.params.min_tokens
            for s in seqs
        ]
        tokens = logits.argmax(dim=-1).tolist() if any(plain) else [0] * len(seqs)
        for i, seq in enumerate(seqs):
            if plain[i]:
                continue
            p = seq.params
            row = process_logits(logits[i].clone(), p, seq.all_token_ids, len(seq.output_token_ids), seq.end_ids)
            generator = seq.generator or self.generator
            tokens[i] = sample_row(row if p.greedy else row.cpu(), p, generator)
        return tokens

    def _check_finished(self, seq: Sequence) -> bool:
        p, out = seq.params, seq.output_token_ids
        token = out[-1]
        if token in seq.end_ids:
            seq.finish_reason = "stop"
            seq.stop_reason = None if token == self.tokenizer.eod_id else token
            seq.text = self.tokenizer.decode(out[:-1])
        elif p.stop and len(out) >= p.min_tokens:
            text = self.tokenizer.decode(out)
            hits = [(text.find(s), s) for s in p.stop if s in text]
            if hits:
                at, stop = min(hits)
                seq.finish_reason, seq.stop_reason, seq.text = "stop", stop, text[:at]
        if seq.finish_reason is None and (len(out) >= p.max_tokens or seq.num_tokens >= self.config.max_model_len):
            seq.finish_reason = "length"
            seq.text = self.tokenizer.decode(out)
        if seq.finish_reason is None:
            return False
        seq.status = Status.FINISHED
        return True
