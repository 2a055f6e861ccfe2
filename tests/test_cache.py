"""The slot cache's one-token mechanics (`free_slot`, `write`, `evict`) and `lowest`, the victim
choice every decode-time policy shares, against per-(row, head) loops: eager (one shared index
and gate, bench/NOTES.md session 16) and traced by dynamo (the `index_put` path inductor writes
in place) give the same cache."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexkv.cache import LayerCache
from flexkv.policies.base import INF, lowest


def _cache(seed: int, dtype: torch.dtype) -> LayerCache:
    """B=3 rows, 2 heads, 4 slots, D=3, one statistic; row 2 of head 0 full (no free slot)."""
    g = torch.Generator().manual_seed(seed)
    lc = LayerCache(3, 2, 4, 3, dtype=dtype, device="cpu", stats={"score": torch.float32})
    lc.k.copy_(torch.randn(lc.k.shape, generator=g))
    lc.v.copy_(torch.randn(lc.v.shape, generator=g))
    lc.score.copy_(torch.rand(lc.score.shape, generator=g))
    pos = torch.randint(-1, 20, lc.pos.shape, generator=g)
    pos[2, 0] = torch.tensor([3, 7, 1, 9])
    lc.pos.copy_(pos)
    return lc


def _write_and_evict(lc, slot, k, v, pos, score, when, victim, evict_when):
    lc.write(slot, k, v, pos, {"score": score}, when=when)
    lc.evict(victim, evict_when)
    return lc.k, lc.v, lc.pos, lc.score


def _reference(lc, slot, k, v, pos, score, when, victim, evict_when):
    k_, v_, p_, s_ = lc.k.clone(), lc.v.clone(), lc.pos.clone(), lc.score.clone()
    B, H = slot.shape
    for b in range(B):
        for h in range(H):
            i = int(slot[b, h])
            if when[b, h]:
                k_[b, h, i], v_[b, h, i] = k[b, h, 0].to(k_.dtype), v[b, h, 0].to(v_.dtype)
                p_[b, h, i], s_[b, h, i] = pos[b, 0], score[b, h]
            if evict_when[b, h]:
                p_[b, h, int(victim[b, h])] = -1
    return k_, v_, p_, s_


@pytest.mark.parametrize("traced", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_write_and_evict_equal_a_loop(traced, dtype, seed):
    lc = _cache(seed, dtype)
    g = torch.Generator().manual_seed(seed + 1)
    slot, has_free = lc.free_slot()
    first_empty = torch.where(lc.pos < 0, torch.arange(4), 4).amin(dim=-1)
    assert torch.equal(has_free, lc.pos.lt(0).any(-1))
    assert torch.equal(slot[has_free], first_empty[has_free])        # the first empty slot
    assert not has_free[2, 0]
    active = torch.tensor([True, False, True])[:, None]
    when = has_free & active
    k, v = (torch.randn(3, 2, 1, 3, generator=g, dtype=torch.float32) for _ in range(2))
    pos = torch.tensor([[30], [31], [32]])
    score = torch.rand(3, 2, generator=g)
    victim = torch.randint(0, 4, (3, 2), generator=g)
    evict_when = torch.rand(3, 2, generator=g) < 0.5
    args = (slot, k, v, pos, score, when, victim, evict_when)
    want = _reference(lc, *args)
    fn = torch.compile(_write_and_evict, backend="aot_eager", fullgraph=True) if traced \
        else _write_and_evict
    got = fn(lc, *args)
    for w, x in zip(want, got):
        assert torch.equal(w, x)
    assert lc.pos[2, 0, :].tolist() == [3, 7, 1, 9] or evict_when[2, 0]   # never overwritten


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_add_and_scalar_writes_equal_torch_scatter(dtype):
    """The eager `add` (a merge folding values into kept slots) and a scalar write equal torch's
    own `scatter_add_` / `scatter_` bit for bit; 2-byte floats take another route there (their
    CPU scatter passes over the whole buffer, flexkv.cache._BITS)."""
    from flexkv.cache import _scatter

    lc = _cache(1, dtype)
    slot = torch.tensor([[0, 2], [3, 1]]).expand(3, 2, 2)             # [B, H, m], distinct
    delta = torch.randn(3, 2, 2, 3, generator=torch.Generator().manual_seed(2))
    idx = slot[..., None].expand(-1, -1, -1, 3)
    want = lc.v.clone().scatter_add_(2, idx, delta.to(dtype))
    lc.add(lc.v, slot, delta)
    assert torch.equal(lc.v, want)
    one = slot[:, :, :1, None].expand(-1, -1, -1, 3)
    want = lc.k.clone().scatter_(2, one, 0.5)
    _scatter(lc.k, one, 0.5, None)
    assert torch.equal(lc.k, want)


def test_lowest_ties_protection_and_empty_slots():
    pos = torch.tensor([[[5, -1, 2, 9, 4]]])
    # the lowest valid score; a tie goes to the lower position; empty slots never count
    assert lowest(torch.tensor([[[1.0, -5.0, 3.0, 0.5, 0.5]]]), pos).item() == 4
    assert lowest(torch.tensor([[[1.0, -5.0, 1.0, 2.0, 1.0]]]), pos).item() == 2
    # every valid slot protected (+inf): the lowest position, still not the empty slot
    assert lowest(torch.full((1, 1, 5), INF), pos).item() == 2
    valid = pos >= 0
    s = torch.tensor([[[0.0, -9.0, 0.0, 0.0, 1.0]]])
    assert lowest(s, pos, valid).item() == lowest(s, pos).item() == 2
