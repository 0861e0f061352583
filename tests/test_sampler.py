"""Protects the batched sampler's arithmetic on its own (the engine-level tests check it in generation):

- top-k / top-p decided on each row's most likely ids give, per row, exactly the distribution of
  transformers' warpers applied to the whole vocabulary (TopKLogitsWarper, then TopPLogitsWarper);
  rows the candidates cannot decide (ties past them, a flat top-p row) are flagged for the full path;
- the whole-vocabulary fallback itself matches transformers' warpers;
- inverse-CDF draws pick by cumulative probability and never an id of probability 0;
- seeded rows draw the same tokens whatever else is in the batch.
"""

from __future__ import annotations

import pytest
import torch

from engine.sampling import (
    Sampler,
    SamplingParams,
    apply_top_k,
    apply_top_p,
    inverse_cdf,
    sample_top_k_top_p,
    top_k_top_p_candidates,
)
from engine.sequence import Sequence


def _reference(row: torch.Tensor, k: int, p: float) -> torch.Tensor:
    """transformers' TopK then TopP warpers on the whole vocabulary, then softmax: [vocab] float64."""
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    scores = row[None].clone()
    if k > 0:
        scores = TopKLogitsWarper(top_k=k)(None, scores)
    if p < 1.0:
        scores = TopPLogitsWarper(top_p=p)(None, scores)
    return torch.softmax(scores[0].double(), dim=-1)


def _dense(ids: torch.Tensor, probs: torch.Tensor, vocab: int) -> torch.Tensor:
    out = torch.zeros(vocab, dtype=torch.float64)
    out[ids] = probs
    return out / out.sum()


def test_candidates_give_the_whole_vocabulary_distribution():
    g = torch.Generator().manual_seed(0)
    vocab = 5000
    logits = torch.randn(6, vocab, generator=g) * 4  # peaked enough that top-p rows are decided by candidates
    settings = [(50, 1.0), (0, 0.5), (20, 0.7), (1, 1.0), (7, 0.05), (0, 0.95)]
    ids, probs, slow = top_k_top_p_candidates(logits, [k for k, _ in settings], [p for _, p in settings])
    assert slow == []
    for r, (k, p) in enumerate(settings):
        want = _reference(logits[r], k, p)
        got = _dense(ids[r], probs[r], vocab)
        assert (got - want).abs().max() < 1e-6, (k, p)
        assert set(got.nonzero().flatten().tolist()) == set(want.nonzero().flatten().tolist())


def test_rows_the_candidates_cannot_decide_are_flagged_and_drawn_from_the_full_path():
    vocab = 3000
    flat = torch.zeros(vocab)  # top-p 0.9 of a uniform row needs 2,700 ids: more than the candidates
    ties = torch.arange(vocab, dtype=torch.float32) / vocab
    ties[:100] = 5.0  # 100 ids tie with the 3rd largest value
    peaked = torch.randn(vocab, generator=torch.Generator().manual_seed(1)) * 5
    logits = torch.stack([flat, ties, peaked])
    assert top_k_top_p_candidates(logits[[0, 2]], [0, 0], [0.9, 0.9])[2] == [0]
    assert top_k_top_p_candidates(logits[[1, 2]], [3, 5], [1.0, 1.0])[2] == [0]  # 3 candidates, 100 ties
    u = torch.tensor([0.37, 0.99], dtype=torch.float64)
    # the full path: the uniform row keeps its 2,700 most likely ids, the tied row all 100 tied ids; the
    # draw is u's place in their cumulative distribution
    for r, (k, p) in enumerate([(0, 0.9), (3, 1.0)]):
        token = sample_top_k_top_p(logits[r : r + 1], [k], [p], u[r : r + 1])[0]
        full = apply_top_p(apply_top_k(logits[r : r + 1], [k]), [p])
        assert token == inverse_cdf(torch.softmax(full, dim=-1), u[r : r + 1])[0]
    assert torch.isfinite(apply_top_k(logits[1:2], [3])).sum() == 100
    assert torch.isfinite(apply_top_p(logits[0:1], [0.9])).sum() == 2700


@pytest.mark.parametrize("k, p", [(3, 1.0), (0, 0.6), (10, 0.3)])
def test_full_vocabulary_fallback_matches_transformers(k, p):
    row = torch.randn(200, generator=torch.Generator().manual_seed(2)) * 3
    masked = apply_top_p(apply_top_k(row[None], [k]), [p])[0]
    want = _reference(row, k, p)
    assert torch.equal(torch.isfinite(masked), want > 0)


def test_inverse_cdf_picks_by_cumulative_probability_and_never_a_zero():
    probs = torch.tensor([[0.0, 0.2, 0.0, 0.3, 0.5, 0.0]] * 5, dtype=torch.float64)
    u = torch.tensor([0.0, 0.1999, 0.2, 0.49, 1 - 2**-53], dtype=torch.float64)
    assert inverse_cdf(probs, u).tolist() == [1, 1, 3, 3, 4]
    unnormalized = probs * 7
    assert inverse_cdf(unnormalized, u).tolist() == [1, 1, 3, 3, 4]


def _seq(i: int, params: SamplingParams) -> Sequence:
    seq = Sequence(i, str(i), "", [1, 2, 3], params, frozenset())
    if params.seed is not None:
        seq.generator = torch.Generator().manual_seed(params.seed)
    return seq


def test_seeded_rows_draw_the_same_tokens_whatever_the_batch():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 1000, generator=g)
    seeded = SamplingParams(temperature=0.9, top_p=0.8, top_k=40, seed=11)
    alone = [Sampler(0)(logits[1:2].clone(), [_seq(0, seeded)]).tokens[0] for _ in range(1)]
    mixed = [SamplingParams(), seeded, SamplingParams(temperature=1.0), SamplingParams(temperature=0.5, top_p=0.5)]
    for batch_seed in (0, 1):
        tokens = Sampler(batch_seed)(logits.clone(), [_seq(i, p) for i, p in enumerate(mixed)]).tokens
        assert tokens[1] == alone[0]
        assert tokens[0] == int(logits[0].argmax())
