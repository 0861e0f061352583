"""SamplingParams (vLLM's names and meanings) and the sampler that turns a step's logits into tokens.

Order of logits processing, as in transformers' generate: repetition penalty (over prompt and
output), min_tokens (end tokens masked), then greedy argmax when temperature is 0, else temperature,
top-k, top-p and a draw from the request's own torch.Generator (seeded: reproducible whatever else
is in the batch). Logprobs are taken from the model's raw distribution (log_softmax of the logits).

The sampler works on the whole step at once: each kind of processing is one set of tensor
operations over the rows that need it, whatever mix of settings the batch holds; a batch of plain
greedy rows is one argmax. Sampled rows draw one uniform number each from their own generator and
pick by inverse CDF over their processed distribution, all rows in one pass; top-k / top-p rows are
decided on their most likely ids (one topk) instead of a sort of the whole vocabulary.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .errors import EngineError

if TYPE_CHECKING:
    from .sequence import Sequence


class RequestOutputKind(enum.Enum):
    """vLLM's: what each RequestOutput of a running request holds."""

    CUMULATIVE = 0  # everything so far
    DELTA = 1  # what this step added (streaming)
    FINAL_ONLY = 2  # nothing until it finishes


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
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

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
            (self.logprobs is None or (isinstance(self.logprobs, int) and self.logprobs >= -1),
             "logprobs must be >= 0, or -1 for the whole distribution"),
            (self.seed is None or isinstance(self.seed, int), "seed must be an integer or None"),
            (isinstance(self.output_kind, RequestOutputKind), "output_kind must be a RequestOutputKind"),
        ]
        for ok, message in checks:
            if not ok:
                raise EngineError(f"SamplingParams: {message} (got {self!r})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class SamplerOutput:
    tokens: list[int]
    # per row, when the request asked: {token_id: logprob}, or (logprobs=-1) the whole distribution as a
    # float32 CPU tensor [vocab]
    logprobs: list[dict[int, float] | torch.Tensor | None]


class Sampler:
    """Picks one token per row of a step's logits. Requests without a seed draw from one generator
    seeded at engine start (reproducible for the same requests in the same order)."""

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        """logits: fp32 [len(seqs), vocab], one row per sequence; processed in place."""
        n = len(seqs)
        params = [s.params for s in seqs]
        want_logprobs = [i for i, p in enumerate(params) if p.logprobs is not None]
        logp = None
        if want_logprobs:  # from the raw distribution, before anything below changes the logits
            logp = torch.log_softmax(logits[_index(want_logprobs, n, logits.device)], dim=-1)
        penalized = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
        if penalized:
            apply_repetition_penalty(logits, [seqs[i] for i in penalized], penalized)
        masked = [i for i, s in enumerate(seqs) if len(s.output_token_ids) < s.params.min_tokens and s.end_ids]
        if masked:
            mask_end_tokens(logits, [seqs[i] for i in masked], masked)

        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if not sampled:
            tokens = logits.argmax(dim=-1)
        else:
            tokens = torch.empty(n, dtype=torch.long, device=logits.device)
            greedy = [i for i, p in enumerate(params) if p.greedy]
            if greedy:
                rows = _index(greedy, n, logits.device)
                tokens[rows] = logits[rows].argmax(dim=-1)
            rows = _index(sampled, n, logits.device)
            tokens[rows] = self._sample(logits[rows], [seqs[i] for i in sampled])

        token_list = tokens.tolist()
        out: list[dict[int, float] | torch.Tensor | None] = [None] * n
        if logp is not None:
            top = [(j, i) for j, i in enumerate(want_logprobs) if params[i].logprobs >= 0]
            if top:
                rows = [j for j, _ in top]
                chosen = torch.tensor([token_list[i] for _, i in top], device=logp.device)
                entries = top_logprobs(logp[rows], chosen, [params[i].logprobs for _, i in top])
                for (_, i), entry in zip(top, entries, strict=True):
                    out[i] = entry
            for j, i in enumerate(want_logprobs):
                if params[i].logprobs == -1:
                    out[i] = logp[j].float().cpu()
        return SamplerOutput(token_list, out)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """One draw per row of [rows, vocab] processed logits, after temperature, top-k and top-p."""
        device = logits.device
        temps = torch.tensor([s.params.temperature for s in seqs], dtype=logits.dtype, device=device)
        logits = logits / temps[:, None]
        u = self._uniforms(seqs).to(device)
        top_k, top_p = [s.params.top_k for s in seqs], [s.params.top_p for s in seqs]
        filtered = [i for i, (k, p) in enumerate(zip(top_k, top_p, strict=True)) if k > 0 or p < 1.0]
        if not filtered:
            return inverse_cdf(torch.softmax(logits, dim=-1), u)
        tokens = torch.empty(len(seqs), dtype=torch.long, device=device)
        plain = [i for i in range(len(seqs)) if i not in set(filtered)]
        if plain:
            rows = torch.tensor(plain, device=device)
            tokens[rows] = inverse_cdf(torch.softmax(logits[rows], dim=-1), u[rows])
        rows = _index(filtered, len(seqs), device)
        tokens[rows] = sample_top_k_top_p(logits[rows], [top_k[i] for i in filtered], [top_p[i] for i in filtered],
                                          u[rows])  # fmt: skip
        return tokens

    def _uniforms(self, seqs: list[Sequence]) -> torch.Tensor:
        """One U[0, 1) per row: from the request's own generator, else from the engine's."""
        u = torch.empty(len(seqs), dtype=torch.float64)
        shared = [i for i, s in enumerate(seqs) if s.generator is None]
        if shared:
            u[shared] = torch.rand(len(shared), generator=self.generator, dtype=torch.float64)
        for i, s in enumerate(seqs):
            if s.generator is not None:
                u[i] = torch.rand((), generator=s.generator, dtype=torch.float64)
        return u


def _index(rows: list[int], n: int, device) -> torch.Tensor | slice:
    return slice(None) if len(rows) == n else torch.tensor(rows, device=device)


def _rows_of(counts: list[int], rows: list[int]) -> torch.Tensor:
    """rows[j] repeated counts[j] times, as one tensor."""
    return torch.repeat_interleave(torch.tensor(rows), torch.tensor(counts))


def apply_repetition_penalty(logits: torch.Tensor, seqs: list[Sequence], rows: list[int]) -> None:
    """transformers' RepetitionPenaltyLogitsProcessor on each row over the ids its sequence has seen
    (prompt and output): a seen id's logit is divided by the penalty when positive, multiplied when
    negative. In place, all rows at once (an id seen twice gets the same value twice)."""
    local = list(range(len(seqs)))
    which = torch.cat([_rows_of([len(s.prompt_token_ids) for s in seqs], local),
                       _rows_of([len(s.output_token_ids) for s in seqs], local)])  # fmt: skip
    ids = torch.cat([*(s.prompt_tensor() for s in seqs),
                     torch.tensor([t for s in seqs for t in s.output_token_ids], dtype=torch.long)])  # fmt: skip
    penalty = torch.tensor([s.params.repetition_penalty for s in seqs], dtype=logits.dtype)
    row_ids, factor = torch.tensor(rows)[which], penalty[which]
    row_ids, ids, factor = (t.to(logits.device) for t in (row_ids, ids, factor))
    score = logits[row_ids, ids]
    logits[row_ids, ids] = torch.where(score < 0, score * factor, score / factor)


def mask_end_tokens(logits: torch.Tensor, seqs: list[Sequence], rows: list[int]) -> None:
    """min_tokens: a sequence that has not generated enough yet cannot pick an end token."""
    row_ids = _rows_of([len(s.end_ids) for s in seqs], rows).to(logits.device)
    ids = torch.tensor([t for s in seqs for t in s.end_ids], dtype=torch.long, device=logits.device)
    logits[row_ids, ids] = float("-inf")


def apply_top_k(logits: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    """Keep each row's k largest logits (k = 0: all), ties with the k-th included."""
    vocab = logits.shape[-1]
    if not any(top_k):
        return logits
    ks = [min(k, vocab) if k > 0 else vocab for k in top_k]
    values = torch.topk(logits, max(ks), dim=-1).values  # [rows, kmax], descending
    kth = values.gather(1, torch.tensor(ks, device=logits.device)[:, None] - 1)
    kth = kth.masked_fill(torch.tensor([k == 0 for k in top_k], device=logits.device)[:, None], float("-inf"))
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: list[float]) -> torch.Tensor:
    """transformers' TopPLogitsWarper per row: drop the low tail whose probability mass is <= 1 - top_p,
    keeping at least the most likely token. Rows with top_p 1 are left as they are."""
    rows = [i for i, p in enumerate(top_p) if p < 1.0]
    if not rows:
        return logits
    index = _index(rows, len(top_p), logits.device)
    part = logits[index]
    sorted_logits, order = torch.sort(part, descending=False, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    threshold = 1 - torch.tensor([top_p[i] for i in rows], dtype=cumulative.dtype, device=logits.device)
    remove = cumulative <= threshold[:, None]
    remove[:, -1] = False
    part = part.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    if isinstance(index, slice):
        return part
    logits = logits.clone()
    logits[index] = part
    return logits


TOP_P_CANDIDATES = 1024  # a top-p row is decided among its most likely ids when they hold top_p of its mass


def sample_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float], u: torch.Tensor) -> torch.Tensor:
    """Draws for rows with top-k and/or top-p: the same distribution as masking the whole vocabulary
    (apply_top_k, then apply_top_p, then softmax), without sorting it (see top_k_top_p_candidates)."""
    cand_ids, probs, slow = top_k_top_p_candidates(logits, top_k, top_p)
    tokens = cand_ids.gather(1, inverse_cdf(probs, u)[:, None]).squeeze(1)
    if slow:
        full = logits[slow]
        full = apply_top_p(apply_top_k(full, [top_k[r] for r in slow]), [top_p[r] for r in slow])
        tokens[slow] = inverse_cdf(torch.softmax(full, dim=-1), u[slow])
    return tokens


def top_k_top_p_candidates(
    logits: torch.Tensor, top_k: list[int], top_p: list[float]
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Each row's most likely ids (its top k; at least TOP_P_CANDIDATES when it has top-p only), taken
    once with topk, and their probabilities after top-k and top-p (0 for the ids these drop; rows
    unnormalized): (ids [rows, n], probs [rows, n] float64, rows the candidates cannot decide). A
    row is undecided when ties with its k-th value reach past its candidates, or (top-p only) when
    they hold less than top_p of its probability; those rows need the whole vocabulary."""
    vocab = logits.shape[-1]
    device = logits.device
    k_cand = min(vocab, max(top_k) if all(top_k) else max(max(top_k), TOP_P_CANDIDATES))
    values, ids = torch.topk(logits, min(vocab, k_cand + 1), dim=-1)  # descending; one extra to see ties
    cand, cand_ids = values[:, :k_cand], ids[:, :k_cand]
    has_k = torch.tensor([k > 0 for k in top_k], device=device)
    k_idx = torch.tensor([min(k, vocab) if k > 0 else k_cand for k in top_k], device=device)
    kth = cand.gather(1, k_idx[:, None] - 1)  # [rows, 1]
    keep = cand >= kth  # top-k, ties with the k-th value included; all candidates for top-p-only rows
    # probabilities: over the kept top k, or (top-p only) over the whole vocabulary
    lse = torch.logsumexp(cand.masked_fill(~keep, float("-inf")), dim=-1)
    if not bool(has_k.all()):
        lse = torch.where(has_k, lse, torch.logsumexp(logits, dim=-1))
    probs = torch.exp((cand - lse[:, None]).double()).masked_fill(~keep, 0.0)
    p = torch.tensor(top_p, dtype=torch.float64, device=device)[:, None]
    before = probs.cumsum(dim=-1) - probs  # mass of the more likely candidates
    keep &= (before < p) | (p >= 1.0)  # transformers' top-p: the low tail whose mass is <= 1 - top_p goes
    slow: list[int] = []
    if k_cand < vocab:
        ties = has_k & (values[:, k_cand] == kth[:, 0])
        short = ~has_k & (probs.sum(dim=-1) < p[:, 0])
        slow = (ties | short).nonzero().flatten().tolist()
    return cand_ids, probs * keep, slow


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """For each row of (unnormalized) probabilities, the first id whose cumulative probability exceeds
    u x the row's total: a draw from the row's distribution (an id of probability 0 is never picked)."""
    cdf = probs.double().cumsum(dim=-1)  # [rows, vocab]
    total = cdf[:, -1:].contiguous()
    picked = torch.searchsorted(cdf, u[:, None].double() * total, right=True)
    last = torch.searchsorted(cdf, total)  # the last id with probability > 0 (u x total may round to total)
    return torch.minimum(picked, last).squeeze(1)


def top_logprobs(logp: torch.Tensor, chosen: torch.Tensor, ks: list[int]) -> list[dict[int, float]]:
    """Per row of log-probabilities [rows, vocab]: {id: logprob} of its k most likely ids and its chosen one."""
    kmax = max(ks)
    top_ids = top_values = None
    if kmax > 0:
        top_values, top_ids = torch.topk(logp, kmax, dim=-1)
        top_values, top_ids = top_values.tolist(), top_ids.tolist()
    picked = logp.gather(1, chosen[:, None]).squeeze(1).tolist()
    out = []
    for r, (k, token) in enumerate(zip(ks, chosen.tolist(), strict=True)):
        entry = dict(zip(top_ids[r][:k], top_values[r][:k], strict=True)) if k else {}
        entry[token] = picked[r]
        out.append(entry)
    return out
