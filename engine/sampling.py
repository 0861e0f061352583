"""SamplingParams (vLLM's names and meanings) and the sampler that turns a step's logits into tokens.

Order of logits processing, as in transformers' generate: repetition penalty (over prompt and
output), min_tokens (end tokens masked), then greedy argmax when temperature is 0, else temperature,
top-k, top-p and a draw from the request's own torch.Generator (seeded: reproducible whatever else
is in the batch). Logprobs are taken from the model's raw distribution (log_softmax of the logits).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import EngineError


@dataclass
class SamplingParams:
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens must be an integer >= 1"),
            (
                isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens,
                "min_tokens must be an integer in [0, max_tokens]",
            ),
            (self.temperature >= 0, "temperature must be >= 0 (0 is greedy)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be an integer >= 0 (0 disables it)"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0 (1.0 disables it)"),
            (all(isinstance(s, str) and s for s in self.stop), "stop must be a list of non-empty strings"),
            (all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids must be token ids"),
            (self.logprobs is None or (isinstance(self.logprobs, int) and self.logprobs >= 0), "logprobs must be >= 0"),
            (self.seed is None or isinstance(self.seed, int), "seed must be an integer or None"),
        ]
        for ok, message in checks:
            if not ok:
                raise EngineError(f"SamplingParams: {message} (got {self!r})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def process_logits(logits: torch.Tensor, params: SamplingParams, seen: list[int], output_len: int, end_ids) -> torch.Tensor:
    """One row of fp32 logits [vocab] after repetition penalty and min_tokens."""
    if params.repetition_penalty != 1.0 and seen:
        ids = torch.tensor(sorted(set(seen)), device=logits.device)
        score = logits[ids]
        logits[ids] = torch.where(score < 0, score * params.repetition_penalty, score / params.repetition_penalty)
    if output_len < params.min_tokens and end_ids:
        logits[torch.tensor(sorted(end_ids), device=logits.device)] = float("-inf")
    return logits


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Pick one token from processed fp32 logits [vocab]."""
    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        # transformers' TopPLogitsWarper: drop the low tail whose mass is <= 1 - top_p, keep at least one
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - params.top_p)
        remove[-1] = False
        logits = logits.masked_fill(remove.scatter(0, order, remove), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def top_logprobs(raw_logits: torch.Tensor, token: int, k: int) -> dict[int, float]:
    """{token_id: logprob} for the k most likely tokens and the chosen one, from raw fp32 logits."""
    logp = torch.log_softmax(raw_logits, dim=-1)
    out: dict[int, float] = {}
    if k > 0:
        values, ids = torch.topk(logp, k)
        out = {int(i): float(v) for i, v in zip(ids, values, strict=True)}
    out[token] = float(logp[token])
    return out
