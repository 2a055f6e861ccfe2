"""`laprox`: hand-computed scores (the default norm product and the Frobenius option, pooled or
not, each normalisation), the efficient scores against explicit ones, the model-wide selection
and its ties, the model-wide total, defaults and bad input."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import flexkv
from flexkv.policies.base import ChunkInfo
from flexkv.cache import KVCache, LayerCache
from flexkv.policies import LaProx, PrefillContext
from flexkv.policies.laprox import norm_product_scores, output_error_norms, window_output_norm
from helpers import random_ids, NoCacheBuilt

F64 = torch.float64


def _hand_context(policy):
    """1 layer, 1 KV head, 2 query heads, D = d_model = 2, prompt positions 0..3, window w = 1.

    The window query (position 3) of head 0 has q = (sqrt2, 0), of head 1 q = (0, sqrt2); key
    j = (ln p0_j, ln p1_j), so the logits q.k / sqrt(2) are ln p0_j and ln p1_j and the softmax
    gives exactly p0 = [.4, .1, .3, .2] and p1 = [.4, .3, .1, .2]."""
    p0 = torch.tensor([0.4, 0.1, 0.3, 0.2], dtype=F64)
    p1 = torch.tensor([0.4, 0.3, 0.1, 0.2], dtype=F64)
    q = torch.zeros(1, 2, 4, 2, dtype=F64)
    q[0, 0, 3] = torch.tensor([math.sqrt(2), 0.0], dtype=F64)
    q[0, 1, 3] = torch.tensor([0.0, math.sqrt(2)], dtype=F64)
    k = torch.stack([p0.log(), p1.log()], dim=-1)[None, None]           # [1, 1, 4, 2]
    v = torch.tensor([[1.0, 0], [0, 1], [0, 1.5], [1, 1]], dtype=F64)[None, None]
    # W_o^(0) = I, W_o^(1) = -I: o_proj.weight [d_model, H*D] = [I | -I]
    weight = torch.tensor([[1.0, 0, -1, 0], [0, 1, 0, -1]], dtype=F64)
    attn = SimpleNamespace(o_proj=SimpleNamespace(weight=weight), layer_idx=0, window=None)
    pos = torch.arange(4)[None, None]
    cap = policy.capacity(0, 4, 1)
    lc = LayerCache(1, 1, cap, 2, dtype=F64, device="cpu", stats={"score": F64},
                    budget=policy.layer_budget(0, 4, 1, cap))
    ctx = PrefillContext(0, q, k, v, pos, pos[0], None, {"score": torch.zeros(1, 1, 4, dtype=F64)},
                         None, attn, ChunkInfo(prompt_len=4), lc.budget)
    return ctx, lc


# window w = 1 (position 3); raw scores of positions 0..2 (window: 0):
# frobenius: E_j = p0_j (v_j I) + p1_j (v_j (-I)) = (p0_j - p1_j) v_j -> |p0 - p1| ||v|| =
#   [0, .2, .2 * 1.5] = [0, .2, .3] (token 0: both heads attend .4 and their outputs cancel);
# norm_product: mean_h ||a_h[W, j]|| ||v_j W_o^(h)|| = mean(p0_j, p1_j) ||v_j|| = [.4, .2, .3].
# normalize "layer": / the sum over the layer's candidates (.5 and .9); "output": / ||O[W]||,
# O[W] = sum_j (p0_j - p1_j) v_j = -.2 (0, 1) + .2 (0, 1.5) = (0, .1); kernel 3 (average, zero
# padding counted, window 0): norm_product [(0+.4+.2), (.4+.2+.3), (.2+.3+0)] / 3 = [.2, .3, 1/6],
# "layer" -> / (2/3) = [.3, .45, .25]. Budget C = 2, w = 1: the global top L*Hkv*(C-w) = 1.
@pytest.mark.parametrize("score, normalize, kernel, expected, kept", [
    ("frobenius", "none", 1, [0.0, 0.2, 0.3], [2, 3]),
    ("frobenius", "output", 1, [0.0, 2.0, 3.0], [2, 3]),
    ("frobenius", "layer", 1, [0.0, 0.4, 0.6], [2, 3]),
    ("norm_product", "none", 1, [0.4, 0.2, 0.3], [0, 3]),   # mean attention alone would also
    ("norm_product", "layer", 1, [4 / 9, 2 / 9, 3 / 9], [0, 3]),  # keep 0: .4 in both heads
    ("norm_product", "layer", 3, [0.3, 0.45, 0.25], [1, 3]),
    ("frobenius", False, 1, [0.0, 0.2, 0.3], [2, 3]),       # the earlier boolean spellings
    ("frobenius", True, 1, [0.0, 2.0, 3.0], [2, 3]),
])
def test_hand_example_scores_and_selection(score, normalize, kernel, expected, kept):
    policy = LaProx(budget=2, window=1, score=score, normalize=normalize, kernel=kernel)
    ctx, lc = _hand_context(policy)
    ctx.stats = policy.prefill_scores(ctx)
    torch.testing.assert_close(ctx.stats["score"][0, 0], torch.tensor(expected + [0.0], dtype=F64),
                               atol=1e-12, rtol=0)
    policy.store(lc, ctx)  # head_max = 4 * (2 - 1) >= 3 candidates: all stay until the end
    assert sorted(p for p in lc.pos[0, 0].tolist() if p >= 0) == [0, 1, 2, 3]
    policy.finish_prefill(KVCache([lc]), None)
    assert sorted(p for p in lc.pos[0, 0].tolist() if p >= 0) == kept
    assert lc.budget.tolist() == [[2 + 1]]  # retained + max_new_tokens (= 1) slots


def test_defaults_are_the_papers_reading():
    p = LaProx(budget=64)
    assert (p.window, p.kernel, p.score, p.normalize) == (32, 7, "norm_product", "layer")


def _caches(scores, order=None):
    """One LayerCache per layer from scores[l][g] = scores of positions 0..2 (position 3 = the
    window, w = 1); slots shuffled by `order` (slot order carries no meaning)."""
    layers = []
    for per_head in scores:
        lc = LayerCache(1, len(per_head), 6, 1, dtype=F64, device="cpu", stats={"score": F64},
                        budget=4)  # 4 prefill slots + 2 new-token slots
        for g, s in enumerate(per_head):
            slots = order or list(range(4))
            for p, slot in enumerate(slots):
                lc.pos[0, g, slot] = p
                lc.score[0, g, slot] = ([*s, 0.0])[p]
        layers.append(lc)
    return KVCache(layers)


@pytest.mark.parametrize("case", [
    # 3 layers, 1 KV head, C = 2 -> K = 3. Sorted (score, pos, layer) descending:
    # (5,0,L0) (3,2,L2) (3,2,L1) | (3,2,L0) (3,1,L1) 0 ... : L0's position 2 loses the tie to the
    # same score and position in higher layers; L1's position 1 loses on position.
    dict(C=2, scores=[[[5, 0, 3]], [[0, 3, 3]], [[0, 0, 3]]], kept=[[[0, 3]], [[2, 3]], [[2, 3]]]),
    # 2 layers, C = 3 -> K = 4: 5, 4 (L0) then the 3s: (3,2,L1) (3,2,L0) | (3,1,L1): uneven budgets.
    dict(C=3, scores=[[[5, 4, 3]], [[1, 3, 3]]], kept=[[[0, 1, 2, 3]], [[2, 3]]]),
    # 1 layer, 2 KV heads, C = 2 -> K = 2: (7,0,h0) (2,1,h1) | (2,1,h0): the lower head loses.
    dict(C=2, scores=[[[7, 2, 0], [0, 2, 0]]], kept=[[[0, 3], [1, 3]]]),
])
@pytest.mark.parametrize("order", [None, [3, 5, 0, 2]])
def test_hand_global_selection_and_ties(case, order):
    cache = _caches(case["scores"], order)
    LaProx(budget=case["C"], window=1).finish_prefill(cache, None)
    for lc, kept in zip(cache.layers, case["kept"]):
        got = [sorted(p for p in lc.pos[0, g].tolist() if p >= 0) for g in range(lc.pos.shape[1])]
        assert got == kept
        assert lc.budget[0].tolist() == [len(x) + 2 for x in kept]


def test_efficient_score_equals_explicit_frobenius():
    g = torch.Generator().manual_seed(0)
    B, n_kv, G, W, N, D, d_model = 2, 2, 3, 5, 7, 4, 6
    probs = torch.softmax(torch.randn(B, n_kv, G, W, N, generator=g, dtype=F64), dim=-1)
    v = torch.randn(B, n_kv, N, D, generator=g, dtype=F64)
    weight = torch.randn(d_model, n_kv * G * D, generator=g, dtype=F64)
    w_o = [weight[:, h * D:(h + 1) * D].T for h in range(n_kv * G)]  # [D, d_model] each
    fast = output_error_norms(probs, v, weight)
    out = torch.zeros(B, W, d_model, dtype=F64)
    for b in range(B):
        for kv in range(n_kv):
            for j in range(N):
                err = sum(torch.outer(probs[b, kv, i, :, j], v[b, kv, j] @ w_o[kv * G + i])
                          for i in range(G))
                assert torch.allclose(fast[b, kv, j], torch.linalg.norm(err, "fro"), atol=1e-12)
            for i in range(G):
                out[b] += probs[b, kv, i] @ v[b, kv] @ w_o[kv * G + i]
    torch.testing.assert_close(window_output_norm(probs, v, weight), out.flatten(1).norm(dim=-1))
    prod = norm_product_scores(probs, v, weight)
    for b in range(B):
        for kv in range(n_kv):
            for j in range(N):
                want = sum(probs[b, kv, i, :, j].norm() * (v[b, kv, j] @ w_o[kv * G + i]).norm()
                           for i in range(G)) / G
                assert torch.allclose(prod[b, kv, j], want, atol=1e-12)
    # one query head per group: the two scores are the same
    w1 = weight.reshape(d_model, n_kv, G, D)[:, :, 0].reshape(d_model, n_kv * D)  # head 0 each
    torch.testing.assert_close(norm_product_scores(probs[:, :, :1], v, w1),
                               output_error_norms(probs[:, :, :1], v, w1))


@pytest.mark.parametrize("T,C,w,f,chunk,pad,normalize", [
    (40, 12, 4, 4, None, 0, "layer"), (40, 12, 4, 1, 7, 0, "output"),
    (33, 9, 3, 1.5, 5, 6, "none"), (24, 23, 8, 4, None, 0, "layer"), (24, 5, 4, 4, 1, 3, "layer"),
])
def test_model_wide_total_and_static_slots(tiny_llama, T, C, w, f, chunk, pad, normalize):
    ids = random_ids(2, T, tiny_llama.args.vocab_size, seed=T)
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, :pad] = 0
    L, n_kv, new = tiny_llama.args.num_hidden_layers, tiny_llama.args.num_key_value_heads, 6
    per_head = []

    def track(cache):
        per_head.append(cache.retained().clone())  # [L, B, Hkv]

    out = flexkv.generate(tiny_llama, ids, max_new_tokens=new, policy="laprox", budget=C,
                          window=w, max_head_factor=f, normalize=normalize, prefill_chunk=chunk,
                          attention_mask=mask, cache_callback=track)
    head_max = int(f * (C - w))
    for lc in out.cache.layers:
        assert lc.capacity == min(T, min(T - w, head_max) + w) + new
    for step, ret in enumerate(per_head):
        # every row compresses to exactly L * Hkv * C (its prompt is longer than C), then appends
        assert ret.sum(dim=(0, 2)).tolist() == [L * n_kv * C + step * L * n_kv] * 2
        assert (ret - step <= min(head_max, T - w) + w).all()  # no head above its cap
    budgets = torch.stack([lc.budget for lc in out.cache.layers])
    assert torch.equal(budgets, per_head[0] + new)
    if f > 1 and C < 20:  # (with f = 1 every head sits exactly at its cap C: uniform)
        assert budgets.unique().numel() > 1, "budgets should vary by layer and head"
    for lc in out.cache.layers:  # each head's window (and all appended tokens) kept
        for b, last in enumerate([T - 1, T - 1 - pad]):
            for g in range(n_kv):
                kept = set(lc.pos[b, g].tolist())
                assert set(range(last - w + 1, last + new)) <= kept


@pytest.mark.parametrize("kw,match", [
    (dict(budget=8, window=8), "budget.*window"), (dict(budget=8, window=12), "budget.*window"),
    (dict(budget=8, window=0), "window"), (dict(budget=8, window=2.5), "window"),
    (dict(budget=8, window=2, max_head_factor=0.5), "max_head_factor"),
    (dict(budget=8, window=2, max_head_factor="4"), "max_head_factor"),
    (dict(budget=8, window=2, max_head_factor=True), "max_head_factor"),
    (dict(budget=8, window=2, normalize="yes"), "normalize must be one of"),
    (dict(budget=8, window=2, normalize=1), "normalize"),
    (dict(budget=8, window=2, score="l2"), "score must be one of \\('norm_product', 'frobenius'\\)"),
    (dict(budget=8, window=2, kernel=4), "kernel"), (dict(budget=8, window=2, kernel=0), "kernel"),
    (dict(window=2), "budget"), (dict(budget=0, window=2), "budget"),
])
def test_bad_input(tiny_llama, kw, match):
    with NoCacheBuilt(), pytest.raises(ValueError, match=match):
        flexkv.generate(tiny_llama, random_ids(1, 12, 101), max_new_tokens=2, policy="laprox", **kw)
