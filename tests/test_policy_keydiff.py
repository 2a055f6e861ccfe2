"""`keydiff`: hand-computed scores and selections (static hooks and the reference), the recent
window, query-agnosticism (no attention statistics), magnitude invariance, bad input."""
from __future__ import annotations

import math

import pytest
import torch

import flexkv
from flexkv.policies.base import ChunkInfo
from flexkv.cache import LayerCache
from flexkv.policies import KeyDiff
from flexkv.policies.base import DecodeContext, PrefillContext, lowest
from flexkv.policies.keydiff import key_diff_score
from flexkv.reference import reference_for
from flexkv.reference.engine import Chunk, Head, Step

F64 = torch.float64
R = 1 / math.sqrt(2)
# One head, D=2, positions 0..3: k0=(1,0), k1=(0,1), k2=(2,0) (k0's direction, twice as long),
# k3=(1,1). Unit keys u = (1,0), (0,1), (1,0), (R,R); anchor a = mean u = ((2+R)/4, (1+R)/4),
# direction a/|a| = (2+R, 1+R)/sqrt((2+R)^2+(1+R)^2) = (0.8459, 0.5334).
# cos(k_j, a): k0 = k2 = 0.8459, k1 = 0.5334, k3 = (0.8459+0.5334)*R = 0.9753.
KEYS = torch.tensor([[1., 0], [0, 1], [2, 0], [1, 1]], dtype=F64)
_n = math.hypot(2 + R, 1 + R)
COS = torch.tensor([(2 + R) / _n, (1 + R) / _n, (2 + R) / _n, (3 + 2 * R) * R / _n], dtype=F64)


def test_score_by_hand():
    score = key_diff_score(KEYS[None, None], torch.arange(4)[None, None])
    torch.testing.assert_close(score[0, 0], -COS)
    torch.testing.assert_close(-COS, torch.tensor([-0.8459, -0.5334, -0.8459, -0.9753], dtype=F64),
                               atol=1e-4, rtol=0)
    # empty slots (pos -1) are left out of the anchor: a stale key there changes nothing
    k = torch.cat([KEYS, torch.tensor([[0., 5]], dtype=F64)])[None, None]
    s = key_diff_score(k, torch.tensor([[[0, 1, 2, 3, -1]]]))
    torch.testing.assert_close(s[0, 0, :4], -COS)


def _prefill_ctx(q, window_budget=2):
    pos = torch.arange(4)[None, None]
    return PrefillContext(0, q, KEYS[None, None], torch.zeros(1, 1, 4, 2, dtype=F64), pos,
                          torch.arange(4)[None], None, {}, None, None, ChunkInfo(prompt_len=4),
                          torch.full((1, 1), window_budget))


@pytest.mark.parametrize("seed", [0, 1])
def test_prefill_hand_example_query_agnostic(seed):
    """Budget 2: scores -cos = [-0.846, -0.533, -0.846, -0.975] keep k1 first, then k0/k2 tie and
    the higher position (2) survives -> {1, 2}. Whatever the queries are (query-agnostic)."""
    q = torch.randn(1, 1, 4, 2, dtype=F64, generator=torch.Generator().manual_seed(seed))
    lc = LayerCache(1, 1, 3, 2, dtype=F64, device="cpu", budget=2)
    KeyDiff(budget=2, window=0).store(lc, _prefill_ctx(q))
    assert sorted(p for p in lc.pos[0, 0].tolist() if p >= 0) == [1, 2]
    # window 1 protects position 3, then the best other token (k1) fills the budget -> {1, 3}
    KeyDiff(budget=2, window=1).store(lc, _prefill_ctx(q))
    assert sorted(p for p in lc.pos[0, 0].tolist() if p >= 0) == [1, 3]


@pytest.mark.parametrize("window, keep", [(0, [1, 2]), (1, [1, 3])])
def test_reference_prefill_hand_example(window, keep):
    head = Head(torch.arange(4), KEYS.clone(), torch.zeros(4, 2, dtype=F64))
    chunk = Chunk(torch.zeros(1, 4, 2, dtype=F64), torch.arange(4), torch.zeros(1, 4, 4, dtype=F64), True)
    out = reference_for(KeyDiff(budget=2, window=window)).prefill_select(0, 0, [head], [chunk], None)
    assert sorted(out[0].pos.tolist()) == keep


@pytest.mark.parametrize("window, evicted", [(0, 3), (1, 0), (2, 0)])
def test_decode_hand_example(window, evicted):
    """Budget 3, slots hold positions 3, 0, 2, 1 (the new token is 3). window 0: argmin score is
    k3 (cos 0.975) -> evict 3. window 1 protects 3: k0 and k2 tie at cos 0.846, the lower
    position 0 is evicted. window 2 protects {2, 3}: evict 0 as well."""
    lc = LayerCache(1, 1, 4, 2, dtype=F64, device="cpu", budget=3)
    order = torch.tensor([3, 0, 2, 1])
    lc.k.copy_(KEYS[order][None, None])
    lc.pos.copy_(order[None, None])
    ctx = DecodeContext(0, lc, None, None, None, None, torch.tensor([[3]]), None,
                        torch.ones(1, dtype=torch.bool))  # no probs needed
    victim = lowest(KeyDiff(budget=3, window=window).decode_victim_score(ctx), lc.pos)
    lc.evict(victim, lc.retained() > lc.budget)
    assert sorted(p for p in lc.pos[0, 0].tolist() if p >= 0) == sorted({0, 1, 2, 3} - {evicted})
    # the reference agrees
    head = Head(order.clone(), KEYS[order], torch.zeros(4, 2, dtype=F64))
    step = Step(torch.zeros(1, 2, dtype=F64), 3, torch.zeros(1, 4, dtype=F64), torch.zeros(1, 2, dtype=F64))
    out = reference_for(KeyDiff(budget=3, window=window)).decode_update(0, 0, [head], [step], None)
    assert sorted(out[0].pos.tolist()) == sorted({0, 1, 2, 3} - {evicted})


def test_flags_query_agnostic():
    assert KeyDiff.decode_evicts and not KeyDiff.needs_decode_probs and not KeyDiff.needs_lse
    assert KeyDiff.stats == {}
    # default: the paper's sliding-window variant (window 0 evicts each new key on arrival)
    assert KeyDiff(budget=64).window == 32


def test_generate_keeps_window(tiny_llama):
    ids = torch.randint(0, tiny_llama.args.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    seen = []

    def check(cache):
        last = 19 + len(seen)
        for lc in cache.layers:
            for g in range(lc.pos.shape[1]):
                kept = set(lc.pos[0, g].tolist())
                assert {last - 2, last - 1, last} <= kept
        seen.append(cache.retained().clone())

    flexkv.generate(tiny_llama, ids, max_new_tokens=10, policy="keydiff", budget=6, window=3,
                    prefill_chunk=7, cache_callback=check)
    assert all((r == 6).all() for r in seen)


@pytest.mark.parametrize("kw, match", [
    (dict(budget=4, window=-1), "window"), (dict(budget=4, window=1.5), "window"),
    (dict(budget=4, window=4), "budget must be >= 5"), (dict(budget=None), "budget"),
    (dict(budget=0), "budget"), (dict(budget=4, block=2), "unknown parameter"),
    (dict(budget=16), "budget must be >= 33 .*window=32"),  # the default window
])
def test_bad_input(tiny_llama, kw, match):
    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match=match):
        flexkv.generate(tiny_llama, ids, max_new_tokens=2, policy="keydiff", **kw)
