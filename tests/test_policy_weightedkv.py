"""weightedkv: hand-worked merges (decode and prefill), convex weights, the merged values equal the
reference's, mass conservation under log_mass, bad input."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import flexkv
from flexkv.cache import LayerCache
from flexkv.policies import WeightedKV
from flexkv.policies.base import DecodeContext, PrefillContext, lowest

F64 = torch.float64


# ----------------------------------------------------------------------------- shared helpers
def kept_values(cache) -> dict:
    """{(layer, b, g): {pos: v}} of a static KVCache or a reference RefCache."""
    out = {}
    for l, lc in enumerate(cache.layers):
        if hasattr(lc, "heads"):  # reference: per-head token lists
            for b, row in enumerate(lc.heads):
                for g, h in enumerate(row):
                    out[l, b, g] = {int(p): h.v[i].clone() for i, p in enumerate(h.pos)}
        else:
            B, H, _ = lc.pos.shape
            for b in range(B):
                for g in range(H):
                    out[l, b, g] = {int(p): lc.v[b, g, i].clone()
                                    for i, p in enumerate(lc.pos[b, g]) if p >= 0}
    return out


def snapshots(model, ids, **kw):
    """kept_values after prefill and after each decode step (callback = once per new token)."""
    snaps = []
    out = flexkv.generate(model, ids, cache_callback=lambda c: snaps.append(kept_values(c)),
                          output_logits=True, **kw)
    return out, snaps


def assert_same_values(sa, sr, atol=1e-8):
    assert len(sa) == len(sr)
    for step, (a, r) in enumerate(zip(sa, sr)):
        assert a.keys() == r.keys()
        for key in a:
            assert a[key].keys() == r[key].keys(), f"step {step} {key}: kept positions differ"
            for p in a[key]:
                torch.testing.assert_close(a[key][p].to(F64), r[key][p], atol=atol, rtol=0,
                                           msg=lambda m: f"step {step} {key} pos {p}: {m}")


@pytest.fixture(scope="module")
def tiny64(tiny_llama_dir):
    model, _ = flexkv.load_model(tiny_llama_dir, dtype=F64)
    return model


def one_head_cache(pos, v, score, capacity=None, stats=("score",)):
    """A LayerCache with B = Hkv = 1 holding the given tokens (float64)."""
    n, D = v.shape
    lc = LayerCache(1, 1, capacity or n, D, dtype=F64, device="cpu", stats={s: F64 for s in stats})
    lc.load(torch.zeros(1, 1, n, D, dtype=F64), v[None, None], torch.tensor(pos)[None, None],
            {"score": torch.tensor(score, dtype=F64)[None, None]})
    return lc


def decode_step(policy, lc, q_pos):
    """The eviction half of a decode step (the statistics are set by hand instead of attention)."""
    ctx = DecodeContext(0, lc, None, None, None, None, torch.tensor([[q_pos]]),
                        SimpleNamespace(window=None), torch.ones(1, dtype=torch.bool))
    victim = lowest(policy.decode_victim_score(ctx), lc.pos)
    policy.decode_evict(ctx, victim, lc.retained() > lc.budget)


def prefill_store(policy, pos, v, score, budget, capacity, stats=None, buffers=None):
    """`policy.store` on one head's tokens (pos, v [N, D], score) with hand-set statistics."""
    N, D = v.shape
    lc = LayerCache(1, 1, capacity, D, dtype=F64, device="cpu",
                    stats={n: F64 for n in policy.stats}, budget=budget)
    for name, buf in (buffers or {}).items():
        lc.register_buffer(name, buf)
    stats = {"score": torch.tensor(score, dtype=F64)[None, None], **(stats or {})}
    pos_t = torch.tensor(pos)[None, None]
    ctx = PrefillContext(0, None, torch.zeros(1, 1, N, D, dtype=F64), v[None, None], pos_t,
                         pos_t[:, 0], None, stats, None, None, True, lc.budget)
    policy.store(lc, ctx)
    return lc


def by_pos(lc, name="v"):
    buf = getattr(lc, name)[0, 0]
    return {int(p): buf[i] for i, p in enumerate(lc.pos[0, 0]) if p >= 0}


# ----------------------------------------------------------------------------- hand-worked
def test_hand_worked_decode_merge():
    # budget 3, window 1, no sinks; tokens at positions 0, 1, 2 and the new token 3 (4 slots).
    # c_j = q_pos - pos_j + 1 = [4, 3, 2, 1]; S = [0.8, 0.3, 1.0, 0.5] -> a = [0.2, 0.1, 0.5, 0.5].
    # Position 3 is the protected window; argmin a over {0, 1, 2} is position 1 (a = 0.1). Its
    # neighbour is the next larger kept position, 2 (a = 0.5):
    # v_2 <- (0.1 [1, 0] + 0.5 [0, 1]) / 0.6 = [1/6, 5/6]; the others are untouched.
    pol = WeightedKV(budget=3, window=1)
    v = torch.tensor([[7.0, 7.0], [1.0, 0.0], [0.0, 1.0], [3.0, -3.0]], dtype=F64)
    lc = one_head_cache([0, 1, 2, 3], v, [0.8, 0.3, 1.0, 0.5])
    lc.budget.fill_(3)
    decode_step(pol, lc, 3)
    kept = by_pos(lc)
    assert sorted(kept) == [0, 2, 3]
    torch.testing.assert_close(kept[2], torch.tensor([1 / 6, 5 / 6], dtype=F64))
    torch.testing.assert_close(kept[0], v[0])
    torch.testing.assert_close(kept[3], v[3])
    assert by_pos(lc, "score")[2] == 1.0  # S_m unchanged


def test_hand_worked_prefill_batch_merge():
    # 6 tokens at positions 0..5, budget 3, window 1, n_sink 1: positions 0 (sink) and 5 (window)
    # are protected, one more survives. c_j = 5 - pos_j + 1 = [6, 5, 4, 3, 2, 1];
    # S = c * [0.1, 0.2, 0.05, 0.3, 0.1, 0.4] so a = [0.1, 0.2, 0.05, 0.3, 0.1, 0.4].
    # Top a among positions 1..4 is position 3 (0.3). Evicted 1, 2 -> next kept 3; 4 -> 5.
    # v_3 <- (0.2 e1 + 0.05 e2 + 0.3 e3) / 0.55, v_5 <- (0.1 e4 + 0.4 e5) / 0.5, v_0 = e0.
    a = torch.tensor([0.1, 0.2, 0.05, 0.3, 0.1, 0.4], dtype=F64)
    S = (a * torch.tensor([6.0, 5, 4, 3, 2, 1], dtype=F64)).tolist()
    eye = torch.eye(6, dtype=F64)
    pol = WeightedKV(budget=3, window=1, n_sink=1, bias="log_mass")
    lc = prefill_store(pol, list(range(6)), eye, S, budget=3, capacity=4,
                       stats={"merged": torch.zeros(1, 1, 6, dtype=F64)})
    kept = by_pos(lc)
    assert sorted(kept) == [0, 3, 5]
    torch.testing.assert_close(kept[0], eye[0])
    torch.testing.assert_close(kept[3], torch.tensor([0, .2, .05, .3, 0, 0], dtype=F64) / .55)
    torch.testing.assert_close(kept[5], torch.tensor([0, 0, 0, 0, .1, .4], dtype=F64) / .5)
    # log_mass: position 3 absorbed 2 tokens (mass 3), position 5 one (mass 2)
    assert {p: float(m) for p, m in by_pos(lc, "merged").items()} == {0: 0.0, 3: 2.0, 5: 1.0}
    bias = pol.decode_bias(lc)[0, 0]
    assert {int(p): float(b) for p, b in zip(lc.pos[0, 0], bias) if p >= 0} == pytest.approx(
        {0: 0.0, 3: torch.tensor(3.0).log().item(), 5: torch.tensor(2.0).log().item()})


def test_merged_value_is_convex_combination():
    # Random stats and values; solve v_m' = W [v_j*; v_m] for the weights: they are >= 0, sum to 1
    # and equal a_j / (a_j + a_m).
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        v = torch.randn(4, 2, generator=g, dtype=F64)  # D = 2: the 2 weights are determined
        score = (torch.rand(4, generator=g, dtype=F64) + 0.01).tolist()
        lc = one_head_cache([0, 1, 2, 3], v, score)
        lc.budget.fill_(3)
        avg = torch.tensor(score, dtype=F64) / torch.tensor([4.0, 3, 2, 1], dtype=F64)
        decode_step(WeightedKV(budget=3, window=1), lc, 3)
        kept = by_pos(lc)
        (j,) = {0, 1, 2} - set(kept)
        m = j + 1
        w = torch.linalg.solve(torch.stack([v[j], v[m]], dim=1), kept[m])
        assert (w >= 0).all() and float(w.sum()) == pytest.approx(1.0)
        torch.testing.assert_close(w, torch.stack([avg[j], avg[m]]) / (avg[j] + avg[m]))


# ----------------------------------------------------------------------------- vs reference
@pytest.mark.parametrize("kw,chunk,pad", [
    (dict(budget=9, window=3, n_sink=1), None, 0),
    (dict(budget=7, window=2, n_sink=0, bias="log_mass"), 5, 0),
    (dict(budget=8, window=4, n_sink=2, bias="log_mass"), None, 6),
])
def test_merged_values_equal_reference(tiny64, kw, chunk, pad):
    ids = torch.randint(0, tiny64.args.vocab_size, (2, 24),
                        generator=torch.Generator().manual_seed(5))
    mask = None
    if pad:
        mask = torch.ones_like(ids)
        mask[1, :pad] = 0
    common = dict(max_new_tokens=17, policy="weightedkv", prefill_chunk=chunk,
                  attention_mask=mask, **kw)
    a, sa = snapshots(tiny64, ids, **common)
    r, sr = snapshots(tiny64, ids, reference=True, **common)
    assert_same_values(sa, sr)
    torch.testing.assert_close(a.logits, r.logits, atol=1e-8, rtol=0)


def test_sliding_window_counts_equal_reference(tmp_path):
    # Mistral's window W = 6: c_j = min(W, last - pos_j + 1) (static, derived) equals the
    # reference's literal count of the queries that attended to j.
    from helpers import make_checkpoint

    model, _ = flexkv.load_model(make_checkpoint(tmp_path, "mistral", sliding_window=6), dtype=F64)
    ids = torch.randint(0, model.args.vocab_size, (1, 20),
                        generator=torch.Generator().manual_seed(7))
    common = dict(max_new_tokens=10, policy="weightedkv", budget=8, window=2, n_sink=1,
                  bias="log_mass", prefill_chunk=6)
    a, sa = snapshots(model, ids, **common)
    r, sr = snapshots(model, ids, reference=True, **common)
    assert_same_values(sa, sr)
    torch.testing.assert_close(a.logits, r.logits, atol=1e-8, rtol=0)


def test_log_mass_conserves_tokens(tiny64):
    # Every evicted token's mass moves to a survivor: sum of masses = tokens seen, per head.
    ids = torch.randint(0, tiny64.args.vocab_size, (1, 20),
                        generator=torch.Generator().manual_seed(2))
    seen = []
    kw = dict(max_new_tokens=6, policy="weightedkv", budget=6, window=2, prefill_chunk=7,
              output_logits=True)
    out = flexkv.generate(tiny64, ids, bias="log_mass", **kw,
                          cache_callback=lambda c: seen.append([((lc.pos >= 0) * (1 + lc.merged)).sum(-1)
                                                          for lc in c.layers]))
    for step, masses in enumerate(seen):
        for m in masses:
            assert torch.equal(m, torch.full_like(m, 20.0 + step))  # T + decode steps so far
    assert out.cache.layers[0].merged.max() > 0
    # the bias is used: the same run without it gives other logits
    plain = flexkv.generate(tiny64, ids, **kw)
    assert (plain.logits - out.logits).abs().max() > 1e-3


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kw,match", [
    (dict(budget=8, window=8), "window must be < budget - n_sink"),
    (dict(budget=8, window=4, n_sink=4), "window must be < budget - n_sink"),
    (dict(budget=8, window=0), "window must be an int >= 1"),
    (dict(budget=8, window=2, n_sink=-1), "n_sink must be an int >= 0"),
    (dict(budget=8, window=2, bias="log"), "bias must be one of"),
    (dict(budget=0, window=2), "budget"),
])
def test_bad_input(tiny_llama, kw, match):
    with pytest.raises(ValueError, match=match):
        flexkv.generate(tiny_llama, torch.zeros(1, 12, dtype=torch.long), 4,
                        policy="weightedkv", **kw)
