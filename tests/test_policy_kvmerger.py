"""`kvmerger`: a hand-computed merge (static hooks and the reference), merged slots are convex
combinations of one contiguous run each (weights read back through one-hot values), exactly
`budget` tokens per head, static == reference on the merged k/v, SnapKV selection in the
skipped layers, bad input."""
from __future__ import annotations

import math

import pytest
import torch

import flexkv
from flexkv.policies.base import ChunkInfo
from flexkv.cache import LayerCache
from flexkv.policies import KVMerger
from flexkv.policies.base import PrefillContext
from flexkv.reference import reference_for
from flexkv.reference.engine import Chunk, Head
from helpers import random_ids, NoCacheBuilt

F64 = torch.float64


# --------------------------------------------------------------------------- hand example
# 6 tokens (positions 0..5), D = 2, one KV head with one query head; budget C = 4, window w = 2:
# positions 4, 5 are the window, 0..3 are merged into C - w = 2 sets, i.e. C - w - 1 = 1 cut.
#   keys  k0 = (2, 0)  k1 = (1, 0)  k2 = (0, 1)  k3 = (0, 3)  | k4 = (1, 1)  k5 = (1, -1)
#   cos(k0, k1) = 1, cos(k1, k2) = 0, cos(k2, k3) = 1  -> cut between 1 and 2: sets {0,1}, {2,3}
# Window queries (positions 4, 5) q = (0, 1): logits q.k / sqrt(2) = y / sqrt(2), so tokens 0 and 1
# get exactly the same attention (y = 0) and s0 = s1 < s2 < s3 (y = 0, 0, 1, 3).
#   kernel 1: pivot of {0,1} = 0 (tie in pooled and raw score -> lower position); of {2,3} = 3.
#   kernel 3: pooled(0) = max(s0, s1) = s0, pooled(1) = max(s0, s1, s2) = s2 -> pivot of {0,1} = 1;
#             pooled(2) = pooled(3) = s3 (tie) -> the larger raw score: pivot 3.
# Gaussian weights of a 2-token set {p, i}: d = (0, |k_p - k_i|^2), sigma^2 = d_i / 2 + eps,
#   g_i = exp(-d_i / (2 sigma^2)) = exp(-d_i / (d_i + 2 eps)) (~ e^-1), w_p = 1 / (1 + g_i).
#   {0,1}: d_1 = |(2,0) - (1,0)|^2 = 1;   {2,3}: d = |(0,3) - (0,1)|^2 = 4.
KEYS = [[2., 0], [1, 0], [0, 1], [0, 3], [1, 1], [1, -1]]
VALS = [[1., 0], [0, 1], [2, 0], [0, 2], [5, 5], [6, 6]]
EPS = 1e-6
SLOTS = [3, 5, 0, 2, 4, 1]  # the tokens are handed over in this slot order (order carries no meaning)


def _ctx():
    k = torch.tensor(KEYS, dtype=F64)[SLOTS][None, None]
    v = torch.tensor(VALS, dtype=F64)[SLOTS][None, None]
    pos = torch.tensor(SLOTS)[None, None]
    q = torch.tensor([[0., 1]] * 6, dtype=F64)[None, None]
    return PrefillContext(0, q, k, v, pos, torch.arange(6)[None], None, {}, None, None, ChunkInfo(prompt_len=6),
                          torch.full((1, 1), 4))


def _pair(p_key, i_key, p_val, i_val):
    """Merged (k, v) of a 2-token set with pivot p (the derivation above)."""
    d = sum((a - b) ** 2 for a, b in zip(p_key, i_key))
    g = math.exp(-d / (2 * (d / 2 + EPS)))
    wp, wi = 1 / (1 + g), g / (1 + g)
    return ([wp * a + wi * b for a, b in zip(p_key, i_key)],
            [wp * a + wi * b for a, b in zip(p_val, i_val)])


def _expected(kernel):
    piv_a = 0 if kernel == 1 else 1
    ka, va = _pair(KEYS[piv_a], KEYS[1 - piv_a], VALS[piv_a], VALS[1 - piv_a])
    kb, vb = _pair(KEYS[3], KEYS[2], VALS[3], VALS[2])
    return {piv_a: (ka, va), 3: (kb, vb), 4: (KEYS[4], VALS[4]), 5: (KEYS[5], VALS[5])}


def _as_dict(pos, k, v):
    return {int(p): (k[i].tolist(), v[i].tolist()) for i, p in enumerate(pos.tolist()) if p >= 0}


def _assert_same(got, want):
    assert sorted(got) == sorted(want)
    for p in want:
        for a, b in zip(got[p], want[p]):
            torch.testing.assert_close(torch.tensor(a, dtype=F64), torch.tensor(b, dtype=F64),
                                       atol=1e-12, rtol=0)


@pytest.mark.parametrize("kernel", [1, 3])
def test_hand_example_static(kernel):
    pol = KVMerger(budget=4, window=2, kernel=kernel, skip_layers=(1,), eps=EPS)
    pol.n_layers = 2  # recorded by build_cache in a real run
    ctx = _ctx()
    ctx.stats = pol.prefill_scores(ctx)
    lc = LayerCache(1, 1, 5, 2, dtype=F64, device="cpu")
    pol.store(lc, ctx)
    assert int(lc.retained()) == 4
    got = _as_dict(lc.pos[0, 0], lc.k[0, 0], lc.v[0, 0])
    _assert_same(got, _expected(kernel))
    # e.g. kernel 1, set {0,1}: k' = (2 w0 + w1, 0) with w0 = 1 / (1 + e^-1) = 0.7311
    if kernel == 1:
        assert abs(got[0][0][0] - (2 / (1 + math.exp(-1)) + math.exp(-1) / (1 + math.exp(-1)))) < 1e-5


def _reference_heads(kernel, skip=()):
    ctx = _ctx()
    ref = reference_for(KVMerger(budget=4, window=2, kernel=kernel, eps=EPS))
    ref.skip = set(skip)
    head = Head(ctx.pos[0, 0], ctx.k[0, 0], ctx.v[0, 0])
    logits = ctx.q[0, 0] @ head.k.T / math.sqrt(2)              # [6 queries, 6 tokens]
    logits = logits.masked_fill(head.pos[None, :] > torch.arange(6)[:, None], -math.inf)
    chunk = Chunk(ctx.q[0], ctx.q_pos[0], torch.softmax(logits, -1)[None], True)
    return ref.prefill_select(0, 0, [head], [chunk], None)[0]


@pytest.mark.parametrize("kernel", [1, 3])
def test_hand_example_reference(kernel):
    head = _reference_heads(kernel)
    _assert_same(_as_dict(head.pos, head.k, head.v), _expected(kernel))


def test_hand_example_skipped_layer_is_snapkv():
    """Layer 0 is skipped: SnapKV keeps the top C - w = 2 older tokens by pooled score (kernel 1:
    s3 > s2 > s0 = s1 -> 2, 3) plus the window, unmerged."""
    pol = KVMerger(budget=4, window=2, kernel=1, skip_layers=(0,), eps=EPS)
    pol.n_layers = 2
    ctx = _ctx()
    ctx.stats = pol.prefill_scores(ctx)
    lc = LayerCache(1, 1, 5, 2, dtype=F64, device="cpu")
    pol.store(lc, ctx)
    want = {p: (KEYS[p], VALS[p]) for p in (2, 3, 4, 5)}
    _assert_same(_as_dict(lc.pos[0, 0], lc.k[0, 0], lc.v[0, 0]), want)
    head = _reference_heads(1, skip={0})
    _assert_same(_as_dict(head.pos, head.k, head.v), want)


# --------------------------------------------------------------------------- convex combinations
@pytest.mark.parametrize("bias", [None, "log_mass"])
def test_merged_slots_are_convex_combinations_of_runs(bias):
    """Random keys, values v_i = e_i (one-hot), so each merged value IS its weight vector. Per head:
    exactly C tokens; the window untouched; the weights are >= 0, sum to 1, their support is one
    run of consecutive older positions containing the pivot (largest weight, g = 1), the runs
    partition the older tokens, k' = sum w_i k_i (inside the convex hull of its run), the Gaussian
    form holds (2 sigma^2 log(w_p / w_i) = |k_p - k_i|^2), and every cut similarity is <= every
    similarity inside a run. Row 1 is left-padded (5 empty slots) and stored in shuffled slots."""
    g = torch.Generator().manual_seed(0)
    B, Hkv, G, N, C, w = 2, 2, 2, 40, 12, 4
    pos = torch.arange(N).expand(B, Hkv, N).clone()
    pos[1, :, :5] = -1
    pos[1] = pos[1].roll(7, dims=-1)  # slot order != position order
    k = torch.randn(B, Hkv, N, N, generator=g, dtype=F64)
    v = torch.zeros(B, Hkv, N, N, dtype=F64).scatter_(-1, pos.clamp(min=0)[..., None], 1.0)
    q = torch.randn(B, Hkv * G, N, N, generator=g, dtype=F64)
    q_pos = torch.arange(N).expand(B, N).clone()
    q_pos[1, :5] = -1
    pol = KVMerger(budget=C, window=w, kernel=3, skip_layers=(), bias=bias)
    pol.n_layers = 1
    stats = {"merged": torch.zeros(B, Hkv, N, dtype=F64)} if bias else {}
    ctx = PrefillContext(0, q, k, v, pos, q_pos, None, stats, None, None, ChunkInfo(prompt_len=N),
                         torch.full((B, Hkv), C + 1))
    ctx.stats = pol.prefill_scores(ctx)
    lc = LayerCache(B, Hkv, C + 1, N, dtype=F64, device="cpu", stats=pol.stats)
    pol.store(lc, ctx)
    for b in range(B):
        for h in range(Hkv):
            key = {int(p): k[b, h, i] for i, p in enumerate(pos[b, h].tolist()) if p >= 0}
            first = min(key)
            older = list(range(first, N - w))
            kept = [i for i in range(C + 1) if lc.pos[b, h, i] >= 0]
            assert len(kept) == C
            runs, cut_sims, in_sims = [], [], []
            for i in kept:
                p, wt = int(lc.pos[b, h, i]), lc.v[b, h, i]
                support = torch.nonzero(wt).flatten().tolist()
                if p >= N - w:  # window token: unchanged
                    assert support == [p] and torch.equal(lc.k[b, h, i], key[p])
                    continue
                assert (wt >= 0).all() and abs(float(wt.sum()) - 1) < 1e-12
                assert support == list(range(support[0], support[-1] + 1)) and p in support
                assert float(wt[p]) == float(wt.max())
                torch.testing.assert_close(lc.k[b, h, i], sum(wt[j] * key[j] for j in support))
                d = torch.tensor([float(((key[p] - key[j]) ** 2).sum()) for j in support], dtype=F64)
                var = float(d.mean()) + pol.eps
                torch.testing.assert_close(2 * var * torch.log(wt[p] / wt[support]), d)
                if bias:
                    assert float(lc.merged[b, h, i]) == len(support) - 1
                runs.append(support)
                in_sims += [_cos(key[j], key[j + 1]) for j in support[:-1]]
                cut_sims.append(support[-1])
            assert sorted(j for r in runs for j in r) == older and len(runs) == C - w
            cut_sims = [_cos(key[j], key[j + 1]) for j in cut_sims if j + 1 in older]
            assert len(cut_sims) == C - w - 1 and max(cut_sims) <= min(in_sims)


def _cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


# --------------------------------------------------------------------------- on the tiny model
@pytest.fixture(scope="module")
def tiny64(tiny_llama_dir):
    model, _ = flexkv.load_model(tiny_llama_dir, dtype=F64)
    return model


def _ref_cache(layer):
    """{(b, g): {pos: (k, v)}} of a reference layer cache."""
    return {(b, g): {int(p): (h.k[i], h.v[i]) for i, p in enumerate(h.pos.tolist())}
            for b, row in enumerate(layer.heads) for g, h in enumerate(row)}


def _static_cache(lc):
    B, H = lc.pos.shape[:2]
    return {(b, g): {int(p): (lc.k[b, g, i], lc.v[b, g, i])
                     for i, p in enumerate(lc.pos[b, g].tolist()) if p >= 0}
            for b in range(B) for g in range(H)}


@pytest.mark.parametrize("chunk,bias", [(None, None), (7, "log_mass"), (5, None)])
def test_static_equals_reference_merged_kv(tiny64, chunk, bias):
    """pos -> (k, v) of every layer, row and head equal between the static implementation and the
    reference after prefill and after the decode steps (float64 model, 1e-8); exactly `budget`
    tokens per head after prefill (row 1 left-padded: still more than `budget` real tokens)."""
    T, C, N = 24, 9, 4
    ids = random_ids(2, T, tiny64.args.vocab_size, seed=3)
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, :4] = 0
    kw = dict(policy="kvmerger", budget=C, window=3, kernel=3, skip_layers=(), bias=bias,
              prefill_chunk=chunk, attention_mask=mask, max_new_tokens=N, output_logits=True)
    after_prefill = []
    a = flexkv.generate(tiny64, ids, cache_callback=lambda c: after_prefill.append(
        c.retained().clone()), **kw)
    r = flexkv.generate(tiny64, ids, reference=True, **kw)
    assert (after_prefill[0] == C).all()
    for l in range(len(a.cache.layers)):
        sa, sr = _static_cache(a.cache.layers[l]), _ref_cache(r.cache.layers[l])
        for key in sr:
            assert sorted(sa[key]) == sorted(sr[key]), (l, key)
            for p in sr[key]:
                for x, y in zip(sa[key][p], sr[key][p]):
                    torch.testing.assert_close(x, y, atol=1e-8, rtol=0)
    torch.testing.assert_close(a.logits, r.logits, atol=1e-8, rtol=0)
    # the window and the decoded tokens are kept
    assert set(range(T - 4 - 3, T - 4 + N - 1)) <= set(sa[(1, 0)])


def test_default_skip_layers(tiny_llama):
    """Default skip_layers = first two and last: on the 2-layer model every layer is SnapKV
    selection (no merging: kept k/v are the prompt's own); skip_layers=() merges (k/v differ)."""
    ids = random_ids(1, 20, tiny_llama.args.vocab_size, seed=1)
    full = flexkv.generate(tiny_llama, ids, max_new_tokens=1)
    snap = flexkv.generate(tiny_llama, ids, max_new_tokens=1, policy="snapkv", budget=8, window=2,
                           kernel=7, pool="max")  # kvmerger's pooling defaults
    dflt = flexkv.generate(tiny_llama, ids, max_new_tokens=1, policy="kvmerger", budget=8, window=2)
    mrg = flexkv.generate(tiny_llama, ids, max_new_tokens=1, policy="kvmerger", budget=8, window=2,
                          skip_layers=())
    for l in range(2):
        s, d, m = (_static_cache(o.cache.layers[l]) for o in (snap, dflt, mrg))
        f = _static_cache(full.cache.layers[l])
        assert {k: sorted(x) for k, x in s.items()} == {k: sorted(x) for k, x in d.items()}
        for key in d:
            for p, (kk, vv) in d[key].items():
                assert torch.equal(kk, f[key][p][0]) and torch.equal(vv, f[key][p][1])
        assert any(not torch.equal(kk, f[key][p][0]) for key in m for p, (kk, _) in m[key].items())


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kw,match", [
    (dict(budget=4, window=4), "budget"),            # window >= budget
    (dict(budget=4, window=6), "window"),
    (dict(budget=8, window=2, skip_layers=(2,)), "skip_layers"),   # 2-layer model: [-2, 1]
    (dict(budget=8, window=2, skip_layers=(-3,)), "skip_layers"),
    (dict(budget=8, window=2, skip_layers=1), "skip_layers"),
    (dict(budget=8, window=2, skip_layers=(0.5,)), "skip_layers"),
    (dict(budget=8, window=2, eps=0.0), "eps"),
    (dict(budget=8, window=2, eps=-1e-3), "eps"),
    (dict(budget=8, window=2, kernel=4), "kernel"),
    (dict(budget=8, window=2, bias="mass"), "bias"),
    (dict(budget=8, window=0), "window"),
    (dict(window=2), "budget"),
])
def test_bad_input(tiny_llama, kw, match):
    ids = random_ids(1, 12, tiny_llama.args.vocab_size)
    with NoCacheBuilt(), pytest.raises(ValueError, match=match):
        flexkv.generate(tiny_llama, ids, max_new_tokens=2, policy="kvmerger", **kw)
