"""`tova`: hand-computed selections (static hooks and the reference), one token set per layer at
every step (also with chunked prefill and left padding), padded rows independent, bad input."""
from __future__ import annotations

import pytest
import torch

import flexkv
from flexkv.cache import LayerCache
from flexkv.policies import TOVA
from flexkv.policies.base import DecodeContext, PrefillContext, lowest
from flexkv.reference import reference_for
from flexkv.reference.engine import Chunk, Head

F64 = torch.float64


def _prefill_example(reverse_head1: bool):
    """B=1, Hkv=2, G=1, D=1, 4 tokens (positions 0..3). With D=1 and the query q=1 the logits are
    the keys themselves, so keys ln(w) give the last query the attention w / sum(w):
      head 0: keys ln[1, 2, 3, 4]  -> probs [0.1, 0.2, 0.3, 0.4]
      head 1: keys ln[4, 1, 1, 4]  -> probs [0.4, 0.1, 0.1, 0.4]
    layer mean over the 2 query heads:  [0.25, 0.15, 0.20, 0.40].
    Budget 2 keeps positions {0, 3} in BOTH heads (per-head top-2 would have kept {2, 3} in head 0).
    `reverse_head1` stores head 1's tokens in reversed slot order (slot layouts may differ)."""
    k = torch.log(torch.tensor([[1., 2, 3, 4], [4, 1, 1, 4]], dtype=F64))[None, :, :, None]
    pos = torch.arange(4).expand(1, 2, 4).clone()
    if reverse_head1:
        k[0, 1] = k[0, 1].flip(0)
        pos[0, 1] = pos[0, 1].flip(0)
    q = torch.ones(1, 2, 4, 1, dtype=F64)
    q_pos = torch.arange(4)[None]
    budget = torch.full((1, 2), 2)
    return PrefillContext(0, q, k, torch.zeros_like(k), pos, q_pos, None, {}, None, None, True, budget)


def kept(lc):
    return [sorted(p for p in lc.pos[0, g].tolist() if p >= 0) for g in range(lc.pos.shape[1])]


@pytest.mark.parametrize("reverse_head1", [False, True])
def test_prefill_hand_example(reverse_head1):
    ctx = _prefill_example(reverse_head1)
    prio = TOVA(budget=2).prefill_priority(ctx)
    expect = torch.tensor([0.25, 0.15, 0.20, 0.40], dtype=F64)
    torch.testing.assert_close(prio[0, 0], expect)
    torch.testing.assert_close(prio[0, 1], expect.flip(0) if reverse_head1 else expect)
    lc = LayerCache(1, 2, 3, 1, dtype=F64, device="cpu", budget=2)
    TOVA(budget=2).store(lc, ctx)
    assert kept(lc) == [[0, 3], [0, 3]]


def test_reference_prefill_hand_example():
    ctx = _prefill_example(False)
    heads = [Head(ctx.pos[0, g], ctx.k[0, g], ctx.v[0, g]) for g in range(2)]
    # only the last query matters: its probs over the 4 tokens are softmax(1 * keys) = w / sum(w)
    chunks = [Chunk(ctx.q[0, g:g + 1, 3:], ctx.q_pos[0, 3:],
                    torch.softmax(ctx.k[0, g, :, 0], dim=-1)[None, None], True) for g in range(2)]
    out = reference_for(TOVA(budget=2)).prefill_select(0, 0, heads, chunks, None)
    assert [sorted(h.pos.tolist()) for h in out] == [[0, 3], [0, 3]]


def test_decode_hand_example():
    """Kept {0, 3}, new token 4. Slot layouts differ: head 0 holds positions (0, 3, 4), head 1
    holds (4, 0, 3). Given probabilities: head 0 [0.5, 0.2, 0.3], head 1 [0.1, 0.2, 0.7].
    Per position, mean over the 2 query heads: pos 0: (0.5+0.2)/2 = 0.35, pos 3: (0.2+0.7)/2 = 0.45,
    pos 4: (0.3+0.1)/2 = 0.20 -> both heads evict position 4 (per-head argmin: 3 in head 0)."""
    lc = LayerCache(1, 2, 3, 1, dtype=F64, device="cpu", budget=2)
    lc.pos.copy_(torch.tensor([[[0, 3, 4], [4, 0, 3]]]))
    probs = torch.tensor([[[[0.5, 0.2, 0.3]], [[0.1, 0.2, 0.7]]]], dtype=F64)  # [B, Hkv, G, S]
    ctx = DecodeContext(0, lc, None, None, probs, None, torch.tensor([[4]]), None,
                            torch.ones(1, dtype=torch.bool))
    score = TOVA(budget=2).decode_victim_score(ctx)
    torch.testing.assert_close(score, torch.tensor([[[0.35, 0.45, 0.2], [0.2, 0.35, 0.45]]], dtype=F64))
    victim = lowest(score, lc.pos)
    lc.evict(victim, lc.retained() > lc.budget)
    assert kept(lc) == [[0, 3], [0, 3]]
    # a tie is broken toward the lower position, in every head alike
    lc.pos.copy_(torch.tensor([[[0, 3, 4], [4, 0, 3]]]))
    ctx.probs = torch.tensor([[[[0.2, 0.2, 0.6]], [[0.6, 0.2, 0.2]]]], dtype=F64)
    assert lc.pos.gather(2, lowest(TOVA(budget=2).decode_victim_score(ctx), lc.pos)[..., None]).tolist() == [[[0], [0]]]


def _same_set_per_layer(cache):
    for lc in cache.layers:
        P = lc.pos
        for b in range(P.shape[0]):
            sets = [frozenset(p for p in P[b, g].tolist() if p >= 0) for g in range(P.shape[1])]
            assert all(s == sets[0] for s in sets), f"heads of a layer hold different tokens: {sets}"


@pytest.mark.parametrize("chunk", [None, 5])
def test_one_token_set_per_layer_every_step(tiny_llama, chunk):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, tiny_llama.args.vocab_size, (2, 24), generator=g)
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, :7] = 0
    steps = []

    def check(cache):
        _same_set_per_layer(cache)
        steps.append(cache.retained().clone())

    flexkv.generate(tiny_llama, ids, max_new_tokens=12, policy="tova", budget=6, prefill_chunk=chunk,
                    attention_mask=mask, cache_callback=check)
    assert len(steps) == 12 and all((r == 6).all() for r in steps)


def test_padded_rows_are_independent(tiny_llama_dir):
    model, _ = flexkv.load_model(tiny_llama_dir, dtype=F64)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.args.vocab_size, (2, 20), generator=g)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :6] = 0
    snaps = []
    both = flexkv.generate(model, ids, max_new_tokens=8, policy="tova", budget=5, attention_mask=mask,
                           output_logits=True, cache_callback=lambda c: snaps.append(
                               [lc.pos[1].clone() for lc in c.layers]))
    alone_snaps = []
    alone = flexkv.generate(model, ids[1:, 6:], max_new_tokens=8, policy="tova", budget=5,
                            output_logits=True, cache_callback=lambda c: alone_snaps.append(
                                [lc.pos[0].clone() for lc in c.layers]))
    assert torch.equal(both.tokens[1, 20:], alone.tokens[0, 14:])
    torch.testing.assert_close(both.logits[1], alone.logits[0], atol=1e-10, rtol=0)
    for x, y in zip(snaps, alone_snaps):
        for px, py in zip(x, y):
            assert [set(r.tolist()) - {-1} for r in px] == [set(r.tolist()) - {-1} for r in py]


def test_flags():
    assert TOVA.decode_evicts and TOVA.needs_decode_probs and not TOVA.needs_lse


@pytest.mark.parametrize("kw, match", [
    (dict(budget=None), "budget"), (dict(budget=0), "budget"), (dict(budget=2.5), "budget"),
    (dict(budget=4, window=2), "unknown parameter"), (dict(budget=4, n_sink=1), "unknown parameter"),
])
def test_bad_input(tiny_llama, kw, match):
    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match=match):
        flexkv.generate(tiny_llama, ids, max_new_tokens=2, policy="tova", **kw)
