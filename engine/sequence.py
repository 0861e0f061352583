"""One request's state while the engine works on it, and what it returns (RequestOutput)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from .sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    seq_id: int
    prompt: str  # the rendered model input (raw text or ChatML)
    prompt_token_ids: list[int]
    params: SamplingParams
    end_ids: set[int]  # tokens that end the sequence (eos unless ignore_eos, stop_token_ids)
    images: list = field(default_factory=list)  # resized uint8 pixels [3, H, W] per span (normalized in the runner)
    image_starts: list[int] = field(default_factory=list)  # position of each span's <img> token
    image_keys: list[str] = field(default_factory=list)  # content hash of each image (feature cache key)
    output_token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    block_table: list[int] = field(default_factory=list)
    block_keys: list[bytes] = field(default_factory=list)  # content keys of its full blocks (prefix cache)
    num_cached: int = 0  # tokens whose K/V are in the cache
    ntk_alpha: float = 1.0  # from the prompt length, for the whole generation, as the original does
    num_preemptions: int = 0
    status: Status = Status.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    text: str = ""
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finish_time: float | None = None
    generator: torch.Generator | None = None

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def max_total_tokens(self) -> int:
        return len(self.prompt_token_ids) + self.params.max_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED


@dataclass
class RequestOutput:
    """What `LLM.generate` returns per prompt, in prompt order (vLLM's fields, flattened)."""

    request_id: int
    prompt: str
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" (end token or stop string), "length", or "error"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: list[dict[int, float]] | None = None
    error: str | None = None
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None

    @property
    def ttft(self) -> float | None:
        """Seconds from submission to the first generated token."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e_time(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival_time

    @property
    def decode_time_per_token(self) -> float | None:
        """Mean seconds per generated token after the first."""
        if self.first_token_time is None or self.finish_time is None or len(self.token_ids) < 2:
            return None
        return (self.finish_time - self.first_token_time) / (len(self.token_ids) - 1)

    @classmethod
    def from_sequence(cls, seq: Sequence) -> RequestOutput:
        return cls(
            request_id=seq.seq_id,
            prompt=seq.prompt,
            prompt_token_ids=seq.prompt_token_ids,
            text=seq.text,
            token_ids=list(seq.output_token_ids),
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            logprobs=seq.logprobs,
            arrival_time=seq.arrival_time,
            first_token_time=seq.first_token_time,
            finish_time=seq.finish_time,
        )
