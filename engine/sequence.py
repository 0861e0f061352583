"""One request's state while the engine works on it (Sequence), and what the engine hands back
(RequestOutput with vLLM's fields: `.outputs[0]` is a CompletionOutput)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .detokenizer import Detokenizer
from .models.base import ImageSpan
from .sampling import RequestOutputKind, SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int  # the engine's own number, in arrival order
    request_id: str
    prompt: str  # the rendered model input
    prompt_token_ids: list[int]
    params: SamplingParams
    end_ids: frozenset[int]  # ids that end it: eos unless ignore_eos, stop_token_ids, the format's ends
    eos_token_id: int | None = None  # an end by this id reports stop_reason None, as vLLM does
    images: list[ImageSpan] = field(default_factory=list)
    state: Any = None  # the model family's per-request state (Qwen-VL: its dynamic-NTK factor)
    cache_salt: bytes = b""  # part of every prefix-cache key: blocks computed under another state differ
    detokenizer: Detokenizer | None = None
    output_token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None
    block_table: list[int] = field(default_factory=list)
    block_keys: list[bytes] = field(default_factory=list)  # content keys of its full blocks (prefix cache)
    num_cached: int = 0  # tokens whose K/V are in the cache
    # chunked prefill: the next step computes tokens [num_cached, chunk_end) only, and samples nothing;
    # None: it computes up to num_tokens (the whole rest of the prompt, or the one decode token)
    chunk_end: int | None = None
    num_registered: int = 0  # leading full blocks already registered in the prefix cache
    num_preemptions: int = 0
    status: Status = Status.WAITING
    finish_reason: str | None = None  # "stop", "length" or "abort"
    stop_reason: int | str | None = None
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finish_time: float | None = None
    generator: torch.Generator | None = None
    sent_text: int = 0  # characters of text already handed out (delta outputs)
    sent_tokens: int = 0
    _prompt_tensor: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def step_end(self) -> int:
        """Tokens in the cache once the next step has run (its blocks must cover them)."""
        return self.num_tokens if self.chunk_end is None else self.chunk_end

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    def token_ids(self, start: int, end: int) -> list[int]:
        """(prompt + output ids)[start:end], without building the whole list."""
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]

    def prompt_tensor(self) -> torch.Tensor:
        """The prompt's ids as a CPU tensor, made once (the repetition penalty reads them every step)."""
        if self._prompt_tensor is None:
            self._prompt_tensor = torch.tensor(self.prompt_token_ids, dtype=torch.long)
        return self._prompt_tensor

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED


@dataclass
class CompletionOutput:
    """One generated completion (vLLM's CompletionOutput). With RequestOutputKind.DELTA, `text` and
    `token_ids` hold only what this step added."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    # per token: {token_id: logprob}, top-k and the chosen one (logprobs=-1: the whole distribution, a
    # float32 tensor [vocab])
    logprobs: list | None = None
    finish_reason: str | None = None  # "stop" (end token or stop string), "length", "abort" or "error"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """What the engine returns per request: vLLM's shape (`outputs[0].text`), and the same fields
    flattened (`.text`, `.token_ids`, ...) as this engine has always had them."""

    request_id: str
    prompt: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True
    error: str | None = None  # why the request could not run (finish_reason "error")
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def stop_reason(self) -> int | str | None:
        return self.outputs[0].stop_reason

    @property
    def logprobs(self) -> list[dict[int, float]] | None:
        return self.outputs[0].logprobs

    @property
    def ttft(self) -> float | None:
        """Seconds from submission to the first generated token."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e_time(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival_time

    @property
    def decode_time_per_token(self) -> float | None:
        """Mean seconds per generated token after the first (of a finished request)."""
        n = len(self.outputs[0].token_ids)
        if self.first_token_time is None or self.finish_time is None or n < 2:
            return None
        return (self.finish_time - self.first_token_time) / (n - 1)

    @classmethod
    def from_sequence(cls, seq: Sequence) -> RequestOutput:
        """The request's output now: cumulative, or what changed since the last one (DELTA)."""
        finished = seq.is_finished
        text = seq.detokenizer.visible_text(finished) if seq.detokenizer is not None else ""
        tokens, logprobs = seq.output_token_ids, seq.logprobs
        if seq.params.output_kind is RequestOutputKind.DELTA:
            text, seq.sent_text = text[seq.sent_text :], len(text)
            start, seq.sent_tokens = seq.sent_tokens, len(tokens)
            tokens = tokens[start:]
            logprobs = None if logprobs is None else logprobs[start:]
        else:
            tokens = list(tokens)
            logprobs = None if logprobs is None else list(logprobs)
        completion = CompletionOutput(0, text, tokens, seq.cumulative_logprob, logprobs,
                                      seq.finish_reason, seq.stop_reason)  # fmt: skip
        return cls(
            request_id=seq.request_id,
            prompt=seq.prompt,
            prompt_token_ids=seq.prompt_token_ids,
            outputs=[completion],
            finished=finished,
            arrival_time=seq.arrival_time,
            first_token_time=seq.first_token_time,
            finish_time=seq.finish_time,
        )

    @classmethod
    def failed(cls, request_id: str, prompt: str, error: str) -> RequestOutput:
        """The output of a request that could not run."""
        return cls(request_id, prompt, [], [CompletionOutput(0, "", [], finish_reason="error")], error=error)
