"""snapkv, pyramidkv, adakv: hand-computed selections, decode appends, budgets, bad input.

The hand examples drive the policies' own prefill plumbing (`prefill_layer`) on raw tensors with
one batch row, head dim 16 and queries `e_d`: a key `k_j = 4 * ln(m_j) e_d` (scale 1/sqrt(16))
gives query `e_d` the attention `m_j / sum(m)` over the tokens it sees, so the SnapKV score of a
token is proportional to its weight `m_j` whenever every window query sees it.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import flexkv
from flexkv.policies.base import ChunkInfo
from flexkv.policies import AdaKV, PyramidKV, SnapKV
from helpers import random_ids, NoCacheBuilt

F64 = torch.float64
D = 16


def fake_model(n_layers: int, n_kv: int):
    args = SimpleNamespace(num_hidden_layers=n_layers, num_key_value_heads=n_kv, head_dim=D)
    return SimpleNamespace(args=args, lm_head=SimpleNamespace(weight=torch.zeros(1, dtype=F64)))


def keys(weights, dim: int = 0, k=None):
    """weights [Hkv][T] -> k [1, Hkv, T, D] with component `dim` = 4 ln(weight)."""
    w = torch.tensor(weights, dtype=F64)
    k = torch.zeros(1, w.shape[0], w.shape[1], D, dtype=F64) if k is None else k
    k[..., dim] = 4 * torch.log(w)
    return k


def prefill(policy, k, q_dim, chunks=None, n_layers=1, layer=0, max_new=3):
    """Prefill one layer of `policy` with keys k [1, Hkv, T, D] and queries e_{q_dim[t]} (one
    query head per KV head); -> (kept positions per head, the KVCache)."""
    n_kv, T = k.shape[1], k.shape[2]
    q = torch.zeros(1, n_kv, T, D, dtype=F64)
    q[0, :, torch.arange(T), torch.tensor(q_dim)] = 1.0
    policy.validate(T, max_new, n_layers)
    cache = policy.build_cache(fake_model(n_layers, n_kv), 1, T, max_new)
    lc = cache.layers[layer]
    attn = SimpleNamespace(window=None, layer_idx=layer)
    start = 0
    for end in chunks or [T]:
        info = ChunkInfo(first=start == 0, last=end == T, prompt_len=T, max_new_tokens=max_new)
        sl = slice(start, end)
        policy.prefill_layer(attn, lc, q[:, :, sl], k[:, :, sl], k[:, :, sl],
                             torch.arange(start, end)[None], info)
        start = end
    return [sorted(p for p in lc.pos[0, g].tolist() if p >= 0) for g in range(n_kv)], cache


# ------------------------------------------------------------------------------ snapkv
@pytest.mark.parametrize("kernel, kept", [(1, [1, 3, 4, 5]), (3, [1, 2, 4, 5])])
def test_snapkv_hand_example(kernel, kept):
    # T = 6, C = 4, w = 2: window = positions 4, 5 (queries and protected tokens).
    # m = [1, 8, 2, 3 | 9, 4]; s_j = m_j (1/Z_4 + 1/Z_5) for j < 4, so s ~ [1, 8, 2, 3].
    # kernel 1: top C - w = 2 -> positions 1 (8) and 3 (3).
    # kernel 3: pooled over positions 0..3 only (window tokens count 0) = [8, 8, 8, 3]; the tie
    # among 0, 1, 2 keeps the higher positions -> 1, 2. (Had the window's 9 leaked into the
    # pooling, position 3 would score 9 and be kept.)
    got, cache = prefill(SnapKV(budget=4, window=2, kernel=kernel, pool="max"),
                         keys([[1, 8, 2, 3, 9, 4]]), [0] * 6)
    assert got == [kept]
    assert cache.layers[0].capacity == 4 + 3  # min(C, T) + max_new_tokens


@pytest.mark.parametrize("pool, kept", [("avg", [1, 2, 4, 5]), ("max", [0, 1, 4, 5])])
def test_snapkv_pool_hand_example(pool, kept):
    # T = 6, C = 4, w = 2, weights m = [5, 1, 2, 4 | 9, 4]: s ~ [5, 1, 2, 4] (window tokens 0).
    # kernel 3, avg (zero padding counted, as F.avg_pool1d and the authors' code):
    #   [0+5+1, 5+1+2, 1+2+4, 2+4+0] / 3 = [6, 8, 7, 6] / 3 -> keep 1 (8) and 2 (7);
    # max: [5, 5, 4, 4] -> keep 0 and 1.
    got, _ = prefill(SnapKV(budget=4, window=2, kernel=3, pool=pool), keys([[5, 1, 2, 4, 9, 4]]),
                     [0] * 6)
    assert got == [kept]


def test_snapkv_defaults_are_the_authors():
    # FasterDecoding/SnapKV `init_snapkv`: window 32, kernel 5, avgpool; AdaKV keeps its code's
    # max-pool, kernel 7; kvmerger its earlier kernel 7 max
    assert (SnapKV().window, SnapKV().kernel, SnapKV().pool) == (32, 5, "avg")
    assert (AdaKV().kernel, AdaKV().pool) == (7, "max")
    assert (PyramidKV().kernel, PyramidKV().pool) == (5, "avg")


def test_snapkv_chunked_uses_each_chunks_window():
    # Queries at positions 0..4 read key dim 0 (weights a), 5..7 read dim 1 (weights b).
    # chunk 1 = positions 0..4: window {3, 4}; a = [1, 5, 3 | 1, 1] -> keep 1, 2 + window.
    # chunk 2 = 5..7 over the held {1, 2, 3, 4} + {5, 6, 7}: window {6, 7};
    # b over {1..5} = [1, 2, 3, 4, 5] -> keep 4, 5 + window.
    # One-shot (window 6, 7 over all of 0..5) would keep position 0 (b = 9) and 5 instead.
    k = keys([[1, 5, 3, 1, 1, 1, 1, 1]], dim=0)
    k = keys([[9, 1, 2, 3, 4, 5, 1, 1]], dim=1, k=k)
    q_dim = [0] * 5 + [1] * 3
    pol = SnapKV(budget=4, window=2, kernel=1)
    assert prefill(pol, k, q_dim, chunks=[5, 8])[0] == [[4, 5, 6, 7]]
    assert prefill(pol, k, q_dim)[0] == [[0, 5, 6, 7]]


def test_snapkv_decode_appends(tiny_llama):
    ids = random_ids(2, 24, tiny_llama.args.vocab_size, seed=5)
    retained, kept = [], []

    def track(cache):
        retained.append(cache.retained().clone())
        kept.append(cache.layers[0].pos.clone())

    out = flexkv.generate(tiny_llama, ids, max_new_tokens=6, policy="snapkv", budget=10, window=4,
                          cache_callback=track)
    assert [lc.capacity for lc in out.cache.layers] == [16, 16]  # C + max_new_tokens
    for step, ret in enumerate(retained):  # C after prefill, then one more per decode step
        assert (ret == 10 + step).all(), step
    for step, pos in enumerate(kept):  # the window and every generated token stay
        held = [set(p.tolist()) for row in pos for p in row]
        assert all(set(range(20, 24 + step)) <= h for h in held)


# ------------------------------------------------------------------------------ pyramidkv
@pytest.mark.parametrize("T, n_layers, keep", [
    # C-w = 8: min = 8 // 4 = 2, max = 16 - 2 = 14 (<= T-w = 28), step = (14-2)//3 = 4
    (30, 4, [16, 12, 8, 4]),
    # T-w = 10 < 14: max = 10, min = 16 - 10 = 6, step = (10-6)//3 = 1
    # T-w = 14 (T >= 2(C-w) = 16): max = min(14, 14) = 14, min = 2, step = 4
    (16, 4, [16, 12, 8, 4]),
    # T = 20, C-w = 8, beta 4, but L = 3: step = (14 - 2) // 2 = 6
    (20, 3, [16, 10, 4]),
    # C < T < 2(C-w) = 16: uniform SnapKV (KVCache-Factory's fallback), every layer keeps C
    (12, 4, [10, 10, 10, 10]),
    (15, 4, [10, 10, 10, 10]),
    (30, 1, [16]),           # one layer: step 0, keeps max + w
    (9, 4, [9, 9, 9, 9]),    # T <= C: nothing to compress
])
def test_pyramidkv_layer_budgets(T, n_layers, keep):
    pol = PyramidKV(budget=10, window=2, beta=4)
    pol.validate(T, 5, n_layers)
    cache = pol.build_cache(fake_model(n_layers, 2), 1, T, 5)
    assert [lc.capacity for lc in cache.layers] == [n + 5 for n in keep]
    assert [pol.prefill_keep(l, T) for l in range(n_layers)] == keep


def test_pyramidkv_hand_example():
    # C = 4, w = 2, beta = 2, L = 2, T = 8: min = 2//2 = 1, max = 4-1 = 3, step = 2 ->
    # layer 0 keeps 3 + w, layer 1 keeps 1 + w. Weights m = [5, 1, 7, 2, 6, 3 | 4, 4]:
    # layer 0: top 3 of positions 0..5 = 2 (7), 4 (6), 0 (5); layer 1: top 1 = 2 (7).
    k = keys([[5, 1, 7, 2, 6, 3, 4, 4]])
    pol = PyramidKV(budget=4, window=2, kernel=1, beta=2)
    assert prefill(pol, k, [0] * 8, n_layers=2, layer=0)[0] == [[0, 2, 4, 6, 7]]
    assert prefill(pol, k, [0] * 8, n_layers=2, layer=1)[0] == [[2, 6, 7]]


# ------------------------------------------------------------------------------ adakv
def test_adakv_hand_example():
    # 3 KV heads, T = 8, C = 4, w = 1 (window = position 7, the only window query), alpha 0.2.
    # Each head's weights sum to 100, so the scores are m / 100, comparable across heads.
    m = [[20, 18, 16, 14, 12, 10, 1, 9],
         [1, 1, 17, 2, 15, 1, 1, 62],
         [19, 1, 1, 1, 1, 1, 1, 75]]
    # layer-wide top Hkv*(C-w) = 9 outside the window: 20 18 16 14 12 10 (head 0), 19 (head 2),
    # 17 15 (head 1) -> counts (6, 2, 1). quota = 0.8 count + 0.6 = (5.4, 2.2, 1.4): plain
    # rounding gives 5 + 2 + 1 = 8 != 9; largest remainder: floors (5, 2, 1), one more to the
    # largest remainder 0.4, tied between heads 0 and 2 -> the lower head 0: (6, 2, 1).
    got, cache = prefill(AdaKV(budget=4, window=1, kernel=1, alpha=0.2), keys(m), [0] * 8)
    assert got == [[0, 1, 2, 3, 4, 5, 7], [2, 4, 7], [0, 7]]
    lc = cache.layers[0]
    assert lc.budget.tolist() == [[7 + 3, 3 + 3, 2 + 3]]  # head budget + max_new_tokens
    assert int(cache.retained().sum()) == 3 * 4  # the uniform total Hkv * C
    # slots: w + min(T-w, floor(0.8 * min(9, 7) + 0.6) + 1) + max_new = 1 + 7 + 3 per head
    assert cache.slots() == 3 * 11


@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.35, 1.0])
@pytest.mark.parametrize("chunk", [None, 7])
def test_adakv_total_equals_uniform(tiny_llama, alpha, chunk):
    ids = random_ids(2, 40, tiny_llama.args.vocab_size, seed=7)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0  # left padding: row 1 has 34 tokens, still > C
    first = []
    out = flexkv.generate(tiny_llama, ids, max_new_tokens=4, policy="adakv", budget=12, window=3,
                          alpha=alpha, attention_mask=mask, prefill_chunk=chunk,
                          cache_callback=lambda c: first.append(c.retained().clone()))
    n_kv = tiny_llama.args.num_key_value_heads
    totals = first[0].sum(-1)  # [L, B] retained after prefill
    if chunk is None:
        assert (totals == n_kv * 12).all()
    else:  # chunked: a head's unusable share is not redistributed (documented choice)
        assert (totals <= n_kv * 12).all()
    if alpha == 1.0:  # all floor: the uniform SnapKV split
        assert (first[0] == 12).all()
    # lc.budget: each head's declared share (+ the 4 decode slots); decode appends one per step
    declared = torch.stack([lc.budget for lc in out.cache.layers]) - 4
    assert (first[0] == declared).all() if chunk is None else (first[0] <= declared).all()
    assert all(torch.equal(ret, first[0] + step) for step, ret in enumerate(first))
    assert out.cache.slots() >= int(first[-1][:, 0].sum())


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("policy, kw, match", [
    ("snapkv", dict(window=0), "window"),
    ("snapkv", dict(window=2.5), "window"),
    ("snapkv", dict(window=8), "window"),  # window >= budget
    ("snapkv", dict(window=12), "window"),
    ("snapkv", dict(kernel=4), "kernel"),
    ("snapkv", dict(kernel=0), "kernel"),
    ("snapkv", dict(kernel=True), "kernel"),
    ("snapkv", dict(pool="mean"), "pool must be one of \\('avg', 'max'\\)"),
    ("pyramidkv", dict(pool="MAX"), "pool"),
    ("adakv", dict(pool=None), "pool"),
    ("pyramidkv", dict(beta=0), "beta"),
    ("pyramidkv", dict(window=8), "window"),
    ("adakv", dict(alpha=-0.1), "alpha"),
    ("adakv", dict(alpha=1.5), "alpha"),
    ("adakv", dict(alpha="0.2"), "alpha"),
    ("adakv", dict(kernel=2), "kernel"),
])
def test_bad_input(tiny_llama, policy, kw, match):
    kw = dict(dict(window=2), **kw)
    with NoCacheBuilt(), pytest.raises(ValueError, match=match):
        flexkv.generate(tiny_llama, random_ids(1, 12, 101), max_new_tokens=2, policy=policy,
                        budget=8, **kw)
