"""`LLM`: the offline facade, named and shaped like vLLM's, over an LLMEngine.

    llm = LLM("/data/Qwen-VL", dtype="bfloat16")
    outs = llm.generate(["Picture 1: <img>/data/a.jpg</img>\\nWhat is this? Answer:"], SamplingParams(max_tokens=10))
    outs[0].outputs[0].text, outs[0].text, outs[0].token_ids, outs[0].finish_reason, outs[0].ttft

`generate` adds every prompt to the engine (a prompt that cannot run fails before any model work, or,
with errors="return", becomes that prompt's error output), then steps the engine until all of them
have finished.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

from .config import EngineArgs
from .errors import EngineError
from .llm_engine import LLMEngine
from .sampling import RequestOutputKind, SamplingParams
from .sequence import RequestOutput


def is_single_prompt(prompt) -> bool:
    """Whether `prompt` is one prompt (as opposed to a list of prompts): a string, a dict (vLLM's
    {"prompt": ...} / {"prompt_token_ids": ...}), or a list of parts / chat messages (dicts with
    image, text, box, ref or role keys)."""
    if isinstance(prompt, (str, dict)):
        return True
    return (
        isinstance(prompt, list)
        and bool(prompt)
        and all(isinstance(p, dict) and not {"prompt", "prompt_token_ids"} & set(p) for p in prompt)
        and all({"role", "image", "text", "box", "ref"} & set(p) for p in prompt)
    )


class LLM:
    """LLM(model, **engine_args): every EngineArgs field (engine/config.py) as a keyword, vLLM's
    names included (tensor_parallel_size, gpu_memory_utilization, max_num_seqs,
    max_num_batched_tokens, trust_remote_code)."""

    def __init__(self, model, **kwargs):
        self.llm_engine = LLMEngine.from_engine_args(EngineArgs(model=model, **kwargs))
        self._ids = itertools.count()

    # what the engine holds, for code that looks inside (tests, benchmarks)
    @property
    def config(self):
        return self.llm_engine.config

    @property
    def tokenizer(self):
        return self.llm_engine.tokenizer

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def prompt_token_ids(self, prompt) -> list[int]:
        """The token ids one prompt (any form generate takes) runs as, without running it."""
        return self.llm_engine.prompt_token_ids(prompt)

    @property
    def model(self):
        return self.llm_engine.model

    @property
    def model_config(self):
        return self.llm_engine.family.config

    @property
    def runner(self):
        return self.llm_engine.runner

    @property
    def scheduler(self):
        return self.llm_engine.scheduler

    @property
    def block_manager(self):
        return self.llm_engine.block_manager

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

        engine = self.llm_engine
        final = {}  # generate only needs each request's last output
        outputs: list[RequestOutput | None] = [None] * len(prompts)
        index: dict[str, int] = {}
        try:
            for i, (prompt, params) in enumerate(zip(prompts, params_list, strict=True)):
                request_id = str(next(self._ids))
                try:
                    if not isinstance(params, SamplingParams):
                        raise EngineError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
                    if id(params) not in final:
                        final[id(params)] = replace(params, output_kind=RequestOutputKind.FINAL_ONLY)
                    engine.add_request(request_id, prompt, final[id(params)])
                except EngineError as e:
                    if errors == "raise":
                        raise EngineError(f"prompt {i}: {e}") from None  # the finally drops what was queued
                    outputs[i] = RequestOutput.failed(request_id, str(prompt)[:200], str(e))
                    if on_output:
                        on_output(i, outputs[i])
                    continue
                index[request_id] = i
            remaining = len(index)
            with tqdm(total=remaining, desc="generating", unit="req", disable=not use_tqdm) as bar:
                while remaining:
                    for out in engine.step():
                        i = index.get(out.request_id)
                        if i is None or not out.finished:
                            continue
                        outputs[i] = out
                        remaining -= 1
                        bar.update()
                        if on_output:
                            on_output(i, out)
        finally:
            engine.abort_request([rid for rid, i in index.items() if outputs[i] is None])
        return outputs  # type: ignore[return-value]
