"""The serving engine's sampler (flexkv.serve.sampling.sample_slots).

- Its distribution is transformers' (`TemperatureLogitsWarper`, `TopKLogitsWarper`,
  `TopPLogitsWarper`, in generate's order): over many steps of one seed, each token's frequency
  is within 5 sigma of its probability, and no token outside the kept set is ever drawn.
- The cutoffs (a radix select over the values' bits) are those of a plain sort of the row, ties
  at the cutoff kept; the `hint` never changes a token (hypothesis over rows with and without
  cuts), and a row's token is the same alone and in any batch; temperature 0 is the argmax.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from flexkv.serve.sampling import CutHint, _largest_key_reaching, _order_keys, cut_hint, sample_slots


def hf_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The distribution transformers' generate samples from, for one row [V]."""
    x = logits.double()[None]
    x = TemperatureLogitsWarper(temperature)(None, x)
    if top_k > 0:
        x = TopKLogitsWarper(top_k)(None, x)
    if top_p < 1:
        x = TopPLogitsWarper(top_p)(None, x)
    return x.softmax(-1)[0]


def draw(logits, temperature, top_k, top_p, seed, steps, hint=None):
    """One row's tokens at steps 0 .. steps-1 (one call, the row repeated per step)."""
    n = steps
    row = lambda v, dt: torch.full((n,), v, dtype=dt)  # noqa: E731
    return sample_slots(logits[None].expand(n, -1), row(temperature, torch.float32),
                        row(top_k, torch.long), row(top_p, torch.float32), row(seed, torch.long),
                        torch.arange(n), hint=hint)


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0), (1.0, 0, 0.8), (0.8, 6, 0.9), (2.0, 3, 0.5)])
def test_frequencies_follow_transformers_distribution(temperature, top_k, top_p):
    V, N = 12, 6000
    logits = torch.randn(V, generator=torch.Generator().manual_seed(1)) * 2
    want = hf_probs(logits, temperature, top_k, top_p)
    hint = cut_hint([type("P", (), {"top_k": top_k, "top_p": top_p})()])
    tokens = draw(logits, temperature, top_k, top_p, seed=123, steps=N, hint=hint)
    freq = torch.bincount(tokens, minlength=V).double() / N
    assert (freq[want == 0] == 0).all()                  # never outside the kept set
    sigma = (want * (1 - want) / N).sqrt()
    assert ((freq - want).abs() <= 5 * sigma + 1e-12).all(), (freq, want)
    assert torch.equal(tokens, draw(logits, temperature, top_k, top_p, seed=123, steps=N))
    # beside rows with a top-k of at most 3 and a top-p
    assert torch.equal(tokens, draw(logits, temperature, top_k, top_p, 123, N,
                                    hint=CutHint(max(3, top_k), True, top_k == 0 and top_p < 1)))


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
    hint = cut_hint(params)
    assert torch.equal(sample_slots(logits, *args, hint=hint), exact)
    more = CutHint(data.draw(st.integers(max(1, hint.top_k), V + 3)), True,  # looser bounds
                   hint.top_p_alone or data.draw(st.booleans()))
    assert torch.equal(sample_slots(logits, *args, hint=more), exact)
    for i in range(len(batch)):
        one = [a[i:i + 1] for a in args]
        alone = sample_slots(logits[i:i + 1], *one)
        assert int(alone) == int(exact[i])
        if batch[i][0] == 0:
            assert int(alone) == int(logits[i].argmax())


def test_hint():
    P = lambda k, p: type("P", (), {"top_k": k, "top_p": p})()  # noqa: E731
    assert cut_hint([P(0, 1.0), P(0, 1.0)]) == CutHint(0, False, False)
    assert cut_hint([P(0, 1.0), P(5, 0.9), P(20, 1.0)]) == CutHint(20, True, False)
    assert cut_hint([P(5, 1.0), P(0, 0.9)]) == CutHint(5, True, True)
    assert cut_hint([]) == CutHint(0, False, False)


@settings(max_examples=80, deadline=None)
@given(values=st.lists(st.sampled_from([-3.5, -1.0, -0.0, 0.0, 0.25, 2.0, 7.0, float("-inf")])
                       | st.floats(-50, 50, width=32), min_size=1, max_size=60),
       data=st.data())
def test_radix_cutoffs_equal_a_sort(values, data):
    """`_order_keys` orders as the values do (-0.0 as +0.0); `_largest_key_reaching` gives the
    k-th largest value (count weights) and the nucleus' last value (mass weights) that a plain
    descending sort gives."""
    x = torch.tensor([values], dtype=torch.float32)
    keys = _order_keys(x)
    order = sorted(range(len(values)), key=lambda i: values[i])
    assert all(keys[0, a] <= keys[0, b] for a, b in zip(order, order[1:]))
    assert all((keys[0, a] == keys[0, b]) == (values[a] == values[b]) for a in range(len(values))
               for b in range(len(values)))
    desc = sorted(values, reverse=True)
    k = data.draw(st.integers(1, len(values)))
    kth = _largest_key_reaching(keys, torch.ones(1, len(values), dtype=torch.int64),
                                torch.tensor([[k]]))
    assert kth.item() == _order_keys(torch.tensor([[desc[k - 1]]])).item()
    w = torch.tensor([data.draw(st.lists(st.integers(0, 9), min_size=len(values),
                                         max_size=len(values)))], dtype=torch.float64)
    need = data.draw(st.integers(1, max(1, int(w.sum()))))
    got = _largest_key_reaching(keys, w, torch.tensor([[float(need)]], dtype=torch.float64))
    # the plain rule: walk the values down (ties together) until the mass reaches `need`
    want = None
    for v in sorted(set(values), reverse=True):
        if w[0, [i for i, y in enumerate(values) if y >= v]].sum() >= need:
            want = v
            break
    if want is not None:
        assert got.item() == _order_keys(torch.tensor([[want]])).item()


def test_radix_cutoffs_at_vocabulary_size():
    """The 16-bit-digit passes (rows of 16384 values or more) against a sort: the k-th largest
    and the nucleus' last value, for rows with ties, negative values and -inf."""
    V = 20000
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(3, V, generator=g) * 4).round(decimals=1)          # many ties
    x[1, :50] = float("-inf")
    keys = _order_keys(x)
    desc = x.sort(dim=-1, descending=True).values
    for k in (1, 2, 17, 999, V - 50):
        kth = _largest_key_reaching(keys, torch.ones_like(keys), torch.full((3, 1), k))
        assert torch.equal(kth, _order_keys(desc[:, k - 1:k]))
    mass = (x.softmax(dim=-1).double() * 2.0**52).round().long()       # fixed point, as sampled
    for top_p in (0.05, 0.5, 0.9, 0.999):
        need = round(top_p * 2**52)
        got = _largest_key_reaching(keys, mass, torch.full((3, 1), need))
        ms = mass.gather(-1, x.sort(dim=-1, descending=True).indices)
        last = ((ms.cumsum(-1) - ms) < need).sum(-1, keepdim=True) - 1   # the sort's rule
        want = _order_keys(desc.gather(-1, last))
        assert torch.equal(got, want), (top_p, got, want)
