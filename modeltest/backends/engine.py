"""The `engine` backend: the bundled paged-attention engine (engine.LLM), which runs Qwen-VL (v1) from its
original checkpoint files, and Qwen2-VL / Qwen2.5-VL.

Each Qwen-VL request is rendered in Qwen-VL's raw query format (`<img>path</img>question Answer:`, the
format of Qwen-VL's own evaluate_vqa.py), or with `Request.list_format` as the original
`from_list_format` renders it (`Picture 1: <img>path</img>\\ntext`, the seed's caption runs); for a
model whose tokenizer has a chat template (Qwen2-VL) a request is always the user turn of that template
(the parts in order), as the hf backend renders every model; its
images are opened here (paths, PIL images or `datasets` cells) and handed to the engine with the
prompt, so an unreadable image fails only its sample. A whole batch goes to `LLM.generate` at once
and the engine schedules it. Greedy.
"""

from __future__ import annotations

import time

from ..errors import ModelTestError
from .base import (
    Backend,
    Generation,
    Request,
    SampleError,
    TimedBatch,
    check_model_path,
    fit_input,
    image_name,
    open_image,
    render_qwen_prompt,
)

DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
MAX_LABEL_BYTES = 256  # Qwen-VL's <img>..</img> span holds at most this many path bytes
# Performance prompts: text tokens drawn from these ids (ordinary BPE tokens of the Qwen vocabulary, far
# from its special tokens), and one random-noise image of Qwen-VL's input size.
FILLER_IDS = (1000, 30000)
PERF_IMAGE_SIZE = 448


class EngineBackend(Backend):
    name = "engine"
    supports_tp = True  # tp > 1: every rank of the group runs the same requests (engine/distributed.py)
    window = 256  # requests handed to the scheduler at once; each is saved as it finishes
    streams = True
    times_tokens = True

    @classmethod
    def check(cls, model_cfg, tp: int = 1) -> None:
        """Everything loading would check first, without loading weights (mm_run.sh's pre-flight)."""
        from engine import EngineError, check_model

        path = check_model_path(model_cfg)
        _warmup_images(model_cfg)
        try:
            check_model(path, tensor_parallel_size=tp)
        except EngineError as e:
            raise ModelTestError(f"{path}: {e}") from None

    def __init__(self, model_cfg, device: str | None = None, tp: int = 1, batch_size: int = 1, progress: bool = True):
        from engine import LLM, EngineError

        path = check_model_path(model_cfg)
        params = model_cfg.mm_model.infer_params
        max_model_len = None
        if params.max_input_length and params.max_output_length:
            max_model_len = params.max_input_length + params.max_output_length
        if model_cfg.max_position_embedding > 0:  # the seed's cap on the context (-1: the model's own)
            max_model_len = min(max_model_len or model_cfg.max_position_embedding, model_cfg.max_position_embedding)
        try:
            self.llm = LLM(
                path,
                dtype=DTYPES[model_cfg.data_type],
                device=device,
                block_size=model_cfg.block_size,
                max_batch_size=params.max_batch_size or batch_size,  # the seed's --batch_size: sequences at once
                max_model_len=max_model_len,
                max_prefill_tokens=params.max_prefill_tokens,
                tensor_parallel_size=tp,
                warmup_images=_warmup_images(model_cfg) or None,
                progress=progress,
            )
        except EngineError as e:
            hint = " (max_position_embedding in the model config)" if model_cfg.max_position_embedding > 0 else ""
            raise ModelTestError(f"{path}: {e}{hint if 'max_model_len' in str(e) else ''}") from None
        self.device = self.llm.config.device
        # a model whose tokenizer carries a chat template (transformers' attribute) has no raw image format:
        # every sample is its template's user turn, as the hf backend renders every model
        self.chat_only = getattr(self.llm.get_tokenizer(), "chat_template", None) is not None

    def _prompt(self, request: Request) -> tuple[dict, int]:
        """The engine prompt (and the tokens requested_max_input_length made it cut): Qwen-VL's raw
        query, or with request.chat the user turn of a ChatML conversation (the original make_context:
        default system prompt, the parts as from_list_format renders them), its image spans taking the
        images opened here."""
        images = [open_image(p["image"]) for p in request.parts if "image" in p]
        labeled = [{"image": _label(p["image"])} if "image" in p else p for p in request.parts]

        def build(parts: list[dict]) -> dict:
            if request.chat or self.chat_only:
                prompt = [{"role": "user", "content": parts}]
            else:
                prompt = render_qwen_prompt(parts, request.list_format)
            return {"prompt": prompt, "multi_modal_data": {"image": images}}

        from engine import EngineError

        def count(parts: list[dict]) -> int:
            try:
                return len(self.llm.prompt_token_ids(build(parts)))
            except EngineError as e:
                raise SampleError(str(e)) from None

        tok = self.llm.get_tokenizer()
        parts, cut = fit_input(request, labeled, count, tok.encode, tok.decode)
        return build(parts), cut

    def generate(self, requests: list[Request], on_result=None) -> list[Generation]:
        from engine import SamplingParams

        results: list[Generation | None] = [None] * len(requests)
        prompts, params, rows, cuts = [], [], [], []
        for i, req in enumerate(requests):
            try:
                prompt, cut = self._prompt(req)
                prompts.append(prompt)
                cuts.append(cut)
            except SampleError as e:
                results[i] = Generation(error=str(e))
                if on_result:
                    on_result(i, results[i])
                continue
            params.append(SamplingParams(max_tokens=req.max_new_tokens, min_tokens=min(req.min_new_tokens, req.max_new_tokens),
                                         logprobs=-1 if req.distributions else None))  # fmt: skip
            rows.append(i)
        if rows:

            def finished(j: int, out) -> None:
                results[rows[j]] = _generation(out, requests[rows[j]].distributions)
                if cuts[j]:
                    results[rows[j]].extra["input_truncated"] = cuts[j]  # type: ignore[union-attr]
                if on_result:
                    on_result(rows[j], results[rows[j]])

            self.llm.generate(prompts, params, use_tqdm=False, errors="return", on_output=finished)
        return results  # type: ignore[return-value]


    # ---- task_type performance ----------------------------------------------------------------------

    def _perf_image(self, rng) -> tuple[list[int], list]:
        """One random-noise image (so no two requests share image features) and its span's token ids."""
        from PIL import Image

        image = Image.fromarray(rng.integers(0, 256, (PERF_IMAGE_SIZE, PERF_IMAGE_SIZE, 3), dtype="uint8"))
        # Qwen-VL's raw span, or the smallest chat-template prompt holding the image
        prompt = [{"role": "user", "content": [{"image": "perf"}]}] if self.chat_only else "<img>perf</img>"
        return self.llm.prompt_token_ids({"prompt": prompt, "multi_modal_data": {"image": [image]}}), [image]

    def _perf_prompt(self, input_len: int, with_image: bool, rng) -> dict:
        """`input_len` prompt token ids: an image span first (with_image), then random ordinary tokens
        (so no two requests share a prefix block): ids from FILLER_IDS, within the middle of a smaller
        vocabulary (the special tokens sit at one end or the other)."""
        ids, images = self._perf_image(rng) if with_image else ([], [])
        if input_len < len(ids):
            raise SampleError(f"{input_len} input tokens cannot hold the image's span of {len(ids)} tokens")
        vocab = self.llm.get_tokenizer().vocab_size
        low, high = min(FILLER_IDS[0], vocab // 10), min(FILLER_IDS[1], vocab * 9 // 10)
        ids += rng.integers(low, high, input_len - len(ids)).tolist()
        return {"prompt_token_ids": ids, **({"multi_modal_data": {"image": images}} if images else {})}

    def image_span_tokens(self) -> int:
        import numpy as np

        return len(self._perf_image(np.random.default_rng(0))[0])

    def run_timed(self, input_len: int, output_len: int, batch_size: int, with_image: bool, seed: int) -> TimedBatch:
        """The batch through LLMEngine.add_request / step (vLLM's public loop), every token stamped when
        the step that made it returns: the engine synchronizes the device at the end of each step
        (engine/device.py now()), so the stamp follows the device's work, on any device. ignore_eos and
        min_tokens = max_tokens: exactly `output_len` tokens, no end token can stop a request early."""
        import numpy as np

        from engine import EngineError, SamplingParams

        engine = self.llm.llm_engine
        rng = np.random.default_rng(seed)
        prompts = [self._perf_prompt(input_len, with_image, rng) for _ in range(batch_size)]
        params = SamplingParams(max_tokens=output_len, min_tokens=output_len, ignore_eos=True)
        ids = [f"perf-{seed}-{i}" for i in range(batch_size)]
        times: dict[str, list[float]] = {rid: [] for rid in ids}
        inputs: dict[str, int] = {}
        before = engine.stats()
        accelerator = _accelerator(self.device)
        if accelerator is not None:
            accelerator.synchronize()
            accelerator.reset_peak_memory_stats(self.device)
        most = 0
        submitted = time.perf_counter()
        try:
            for rid, prompt in zip(ids, prompts, strict=True):
                engine.add_request(rid, prompt, params)
            while engine.has_unfinished_requests():
                outs = engine.step()
                stamp = time.perf_counter()
                most = max(most, sum(1 for o in outs if len(o.token_ids) > len(times[o.request_id])))
                for out in outs:
                    got = times[out.request_id]
                    got += [stamp] * (len(out.token_ids) - len(got))
                    inputs[out.request_id] = len(out.prompt_token_ids)
        except (EngineError, RuntimeError) as e:  # a request that cannot run; out of device memory
            engine.abort_request(ids)
            raise SampleError(f"{type(e).__name__}: {e}") from None
        after = engine.stats()
        peak = None
        if accelerator is not None:
            accelerator.synchronize()
            peak = accelerator.max_memory_allocated(self.device)
        return TimedBatch(
            submitted=submitted,
            input_tokens=[inputs[rid] for rid in ids],
            token_times=[times[rid] for rid in ids],
            peak_memory_bytes=peak,
            engine={"max_concurrent": most, "preemptions": after.num_preemptions - before.num_preemptions,
                    "prefix_cache_hit_tokens": after.prefix_cache_hit_tokens - before.prefix_cache_hit_tokens,
                    "image_cache_hits": after.image_cache_hits - before.image_cache_hits},
        )  # fmt: skip


def _accelerator(device: str):
    """torch.cuda or torch.npu (torch_npu mirrors torch.cuda's memory counters) for a device; None on cpu,
    which has no peak-memory counter."""
    import torch

    return {"cuda": torch.cuda, "npu": getattr(torch, "npu", None)}.get(device.split(":")[0])


def _warmup_images(model_cfg) -> list[str]:
    """mm_model.warm_up_image_path: the images the engine's warm-up uses (the seed's key); each must
    be a file (checked before anything loads)."""
    import os

    paths = [str(p) for p in model_cfg.mm_model.warm_up_image_path or []]
    for p in paths:
        if not os.path.isfile(p):
            raise ModelTestError(f"mm_model.warm_up_image_path: {p} is not a file; give an image the warm-up can use "
                                 "(any image of the dataset), or remove the key for a blank one")  # fmt: skip
    return paths


def _generation(out, distributions: int = 0) -> Generation:
    if out.finish_reason == "error":
        return Generation(prompt=out.prompt, error=out.error)
    extra = {"ttft_s": out.ttft, "decode_s_per_token": out.decode_time_per_token, "finish_reason": out.finish_reason}
    if distributions and out.logprobs:
        import torch

        extra["logprobs"] = torch.stack(out.logprobs[:distributions])  # [tokens, vocab] float32
        extra["token_ids"] = list(out.token_ids[:distributions])
    return Generation(
        text=out.text,
        prompt=out.prompt,
        input_tokens=len(out.prompt_token_ids),
        output_tokens=len(out.token_ids),
        e2e_time=out.e2e_time or 0.0,
        extra=extra,
    )


def _label(image) -> str:
    """The text inside the image's <img>..</img> span: its path when it fits (as the original
    writes it), else its file name; an image held in memory (ImageBytes, a `datasets` cell) by its name.
    The model never sees it: the span's slots take the image."""
    import os

    path = image_name(image) or "image"
    if len(path.encode("utf-8")) <= MAX_LABEL_BYTES:
        return path
    return os.path.basename(path).encode("utf-8")[-MAX_LABEL_BYTES:].decode("utf-8", "ignore")
