"""The serving engine's sampler (flexkv.serve.sampling.sample_slots).

- Its distribution is transformers' (`TemperatureLogitsWarper`, `TopKLogitsWarper`,
  `TopPLogitsWarper`, in generate's order): over many steps of one seed, each token's frequency
  is within 5 sigma of its probability, and no token outside the kept set is ever drawn.
- The `candidates` hint never changes a token (hypothesis over rows with and without cuts), and
  a row's token is the same alone and in any batch; temperature 0 is the argmax.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from flexkv.serve.sampling import candidates_hint, sample_slots


def hf_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The distribution transformers' generate samples from, for one row [V]."""
    x = logits.double()[None]
    x = TemperatureLogitsWarper(temperature)(None, x)
    if top_k > 0:
        x = TopKLogitsWarper(top_k)(None, x)
    if top_p < 1:
        x = TopPLogitsWarper(top_p)(None, x)
    return x.softmax(-1)[0]


def draw(logits, temperature, top_k, top_p, seed, steps, candidates=None):
    """One row's tokens at steps 0 .. steps-1 (one call, the row repeated per step)."""
    n = steps
    row = lambda v, dt: torch.full((n,), v, dtype=dt)  # noqa: E731
    return sample_slots(logits[None].expand(n, -1), row(temperature, torch.float32),
                        row(top_k, torch.long), row(top_p, torch.float32), row(seed, torch.long),
                        torch.arange(n), candidates=candidates)


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0), (1.0, 0, 0.8), (0.8, 6, 0.9), (2.0, 3, 0.5)])
def test_frequencies_follow_transformers_distribution(temperature, top_k, top_p):
    V, N = 12, 6000
    logits = torch.randn(V, generator=torch.Generator().manual_seed(1)) * 2
    want = hf_probs(logits, temperature, top_k, top_p)
    hint = candidates_hint([type("P", (), {"top_k": top_k, "top_p": top_p})()])
    tokens = draw(logits, temperature, top_k, top_p, seed=123, steps=N, candidates=hint)
    freq = torch.bincount(tokens, minlength=V).double() / N
    assert (freq[want == 0] == 0).all()                  # never outside the kept set
    sigma = (want * (1 - want) / N).sqrt()
    assert ((freq - want).abs() <= 5 * sigma + 1e-12).all(), (freq, want)
    assert torch.equal(tokens, draw(logits, temperature, top_k, top_p, seed=123, steps=N))
    if top_k == 0 and top_p == 1:   # a row without a cut, beside rows whose top-k bound is 3
        assert torch.equal(tokens, draw(logits, temperature, top_k, top_p, 123, N, candidates=3))


rows = st.tuples(st.sampled_from([0.0, 0.5, 1.0, 1.7]), st.sampled_from([0, 1, 3, 8]),
                 st.sampled_from([1.0, 0.95, 0.6, 0.2]), st.integers(0, 2**40), st.integers(0, 50))


@settings(max_examples=60, deadline=None)
@given(batch=st.lists(rows, min_size=1, max_size=5), data=st.data())
def test_the_hint_and_the_batch_never_change_a_token(batch, data):
    V = 40
    logits = torch.randn(len(batch), V, generator=torch.Generator().manual_seed(len(batch))) * 3
    # ties at the cutoff are kept, whichever way it is found
    logits[:, 5] = logits[:, 6]
    col = lambda i, dt: torch.tensor([b[i] for b in batch], dtype=dt)  # noqa: E731
    args = (col(0, torch.float32), col(1, torch.long), col(2, torch.float32), col(3, torch.long),
            col(4, torch.long))
    exact = sample_slots(logits, *args)
    params = [type("P", (), {"top_k": b[1], "top_p": b[2]})() for b in batch if b[0] > 0]
    hint = candidates_hint(params)
    assert torch.equal(sample_slots(logits, *args, candidates=hint), exact)
    if hint:   # any larger bound gives the same too
        more = data.draw(st.integers(hint, V + 3))
        assert torch.equal(sample_slots(logits, *args, candidates=more), exact)
    for i in range(len(batch)):
        one = [a[i:i + 1] for a in args]
        alone = sample_slots(logits[i:i + 1], *one)
        assert int(alone) == int(exact[i])
        if batch[i][0] == 0:
            assert int(alone) == int(logits[i].argmax())


def test_hint():
    P = lambda k, p: type("P", (), {"top_k": k, "top_p": p})()  # noqa: E731
    assert candidates_hint([P(0, 1.0), P(0, 1.0)]) == 0
    assert candidates_hint([P(0, 1.0), P(5, 0.9), P(20, 1.0)]) == 20
    assert candidates_hint([P(5, 1.0), P(0, 0.9)]) is None
    assert math.isfinite(float(candidates_hint([P(3, 0.5)])))
