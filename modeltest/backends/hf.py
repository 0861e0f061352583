"""The `hf` backend: transformers' own classes for models transformers runs natively.

`AutoModelForImageTextToText` when the config is a vision-language model, else
`AutoModelForCausalLM`; `AutoProcessor` renders each request through the model's chat template
(the only generic way to place image tokens); batched, left-padded, greedy.
Code from the model folder runs only with `trust_remote_code: true` in the model config.
"""

from __future__ import annotations

import time

from ..errors import ModelTestError
from .base import Backend, Generation, Request, SampleError, check_model_path, fit_input, open_image

DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


class HFBackend(Backend):
    name = "hf"

    def __init__(self, model_cfg, device: str | None = None, tp: int = 1, progress: bool = True):
        import torch
        import transformers
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

        from engine import DeviceError, resolve_device

        if tp != 1:
            raise ModelTestError("the hf backend runs on one device; use --backend engine for tensor parallel")
        path = check_model_path(model_cfg)
        try:
            self.device = resolve_device(device)
        except DeviceError as e:
            raise ModelTestError(str(e)) from None
        trust = model_cfg.trust_remote_code
        _refuse_engine_only(path)
        if not progress:
            transformers.utils.logging.disable_progress_bar()  # the weight-loading bar (--no_progress)
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust)
        except (OSError, ValueError) as e:
            raise ModelTestError(f"{path}: transformers cannot read this model's config.json: {e}") from None
        dtype = getattr(torch, DTYPES[model_cfg.data_type])
        if self.device == "cpu" and dtype == torch.float16:
            dtype = torch.float32  # fp16 matmuls are not implemented on every CPU
        vision = type(config) in AutoModelForImageTextToText._model_mapping
        auto = AutoModelForImageTextToText if vision else AutoModelForCausalLM
        try:
            self.model = auto.from_pretrained(path, dtype=dtype, trust_remote_code=trust).to(self.device).eval()
            self.processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust)
        except (OSError, ValueError) as e:
            raise ModelTestError(f"{path}: transformers {transformers.__version__} cannot load it: {e}") from None
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if not getattr(self.processor, "chat_template", None) and not getattr(self.tokenizer, "chat_template", None):
            raise ModelTestError(f"{path}: the processor has no chat template; the hf backend needs one to place images")
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self.stop_ids = {i for i in eos + [self.tokenizer.pad_token_id] if i is not None}

    def _render(self, request: Request) -> tuple[str, list, int]:
        """The prompt text, its images and the tokens requested_max_input_length made it cut.
        Request.list_format (Qwen-VL's "Picture n: <img>path</img>" labels) is for raw-query models;
        here the chat template places each image, followed by the text as is (with or without
        request.chat: the template is the only generic way to place image tokens)."""
        images = [open_image(part["image"]) for part in request.parts if "image" in part]

        def build(parts: list[dict]) -> str:
            content = [{"type": "image"} if "image" in p else {"type": "text", "text": p["text"]} for p in parts]
            messages = [{"role": "user", "content": content}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

        def count(parts: list[dict]) -> int:
            kwargs = {"images": images} if images else {}
            return int(self.processor(text=[build(parts)], return_tensors="pt", **kwargs)["input_ids"].shape[1])

        parts, cut = fit_input(request, request.parts, count, self.tokenizer.encode,
                               lambda ids: self.tokenizer.decode(ids, skip_special_tokens=False))  # fmt: skip
        return build(parts), images, cut

    def generate(self, requests: list[Request]) -> list[Generation]:
        import torch

        results: list[Generation | None] = [None] * len(requests)
        texts, images, rows, cuts = [], [], [], []
        for i, req in enumerate(requests):
            try:
                text, imgs, cut = self._render(req)
                cuts.append(cut)
            except SampleError as e:
                results[i] = Generation(error=str(e))
                continue
            texts.append(text)
            images.extend(imgs)
            rows.append(i)
        if rows:
            start = time.perf_counter()
            kwargs = {"images": images} if images else {}
            inputs = self.processor(text=texts, padding=True, return_tensors="pt", **kwargs).to(self.device)
            max_new = max(requests[i].max_new_tokens for i in rows)
            min_new = min(requests[i].min_new_tokens for i in rows)
            with torch.inference_mode():
                out = self.model.generate(
                    **inputs, max_new_tokens=max_new, min_new_tokens=min_new, do_sample=False,
                    num_beams=1, pad_token_id=self.tokenizer.pad_token_id,
                )  # fmt: skip
            elapsed = time.perf_counter() - start
            prompt_len = inputs["input_ids"].shape[1]
            attention = inputs["attention_mask"]
            for row, i in enumerate(rows):
                new = out[row, prompt_len:].tolist()[: requests[i].max_new_tokens]
                for n, tok in enumerate(new):
                    if tok in self.stop_ids:
                        new = new[: n + 1]
                        break
                results[i] = Generation(
                    text=self.tokenizer.decode(new, skip_special_tokens=True),
                    prompt=texts[row],
                    input_tokens=int(attention[row].sum()),
                    output_tokens=len(new),
                    e2e_time=elapsed,
                    extra={"input_truncated": cuts[row]} if cuts[row] else {},
                )
        return results  # type: ignore[return-value]


def _refuse_engine_only(path: str) -> None:
    """Qwen-VL (v1) ships only its own code (config.json model_type "qwen" with a visual tower), which
    transformers does not include and which no longer imports under transformers 5: say where it
    runs instead of passing on transformers' advice to trust remote code."""
    import json
    import os

    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError):
        return  # transformers reports it
    if isinstance(raw, dict) and raw.get("model_type", "qwen") == "qwen" and "visual" in raw:
        raise ModelTestError(f"{path}: Qwen-VL (v1) is not a model transformers runs itself (config.json model_type "
                             "'qwen'); it runs on the engine backend: backend: engine in the model config, or "
                             "--backend engine")  # fmt: skip
