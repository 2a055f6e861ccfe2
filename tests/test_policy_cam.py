"""cam: hand-worked merges (decode and prefill, expectation and Bernoulli gate), the merged values
equal the reference's, reproducible gates from an explicit generator, bad input."""
from __future__ import annotations

import pytest
import torch

from types import SimpleNamespace

import flexkv
from flexkv.policies import CaM
from flexkv.policies.base import DecodeContext, lowest
from test_policy_weightedkv import (F64, assert_same_values, by_pos, decode_step, one_head_cache,
                                    prefill_store, snapshots, tiny64)  # noqa: F401 (fixture)


# ----------------------------------------------------------------------------- hand-worked
@pytest.mark.parametrize("u,expected_add",
                         [(None, [1.0, 2.0]), (0.4, [2.0, 4.0]), (0.6, [0.0, 0.0])])
def test_hand_worked_decode_merge(u, expected_add):
    # budget 3, n_sink 1, merge_tokens 2; positions 0, 1, 2 and the new token 3. The oldest
    # non-sink, position 1, leaves; receivers = the next 2 kept positions, 2 and 3.
    # S = [5, 0.15, 0.4, 0.2]: p = clamp(0.15 / mean(0.4, 0.2), 0, 1) = 0.5.
    # Expectation: v_i += v_1 * p / m = [4, 8] * 0.5 / 2 = [1, 2].
    # Bernoulli gate: u_1 = 0.4 < 0.5 merges, v_i += v_1 / 2 = [2, 4]; u_1 = 0.6 does not.
    # log_mass: merged_1 = 1 (mass 2), so each receiver gains gate / m * 2.
    pol = CaM(budget=3, n_sink=1, merge_tokens=2, bias="log_mass", stochastic=u is not None,
              gate_generator=None if u is None else torch.Generator())
    v = torch.tensor([[9.0, 9.0], [4.0, 8.0], [0.0, 0.0], [1.0, 1.0]], dtype=F64)
    lc = one_head_cache([0, 1, 2, 3], v, [5.0, 0.15, 0.4, 0.2], stats=("score", "merged"))
    lc.budget.fill_(3)
    lc.merged[0, 0, 1] = 1.0
    if u is not None:
        lc.register_buffer("gate_u", torch.tensor([[[0.9, u, 0.9, 0.9]]], dtype=F64))
    decode_step(pol, lc, 3)
    kept = by_pos(lc)
    add = torch.tensor(expected_add, dtype=F64)
    assert sorted(kept) == [0, 2, 3]
    torch.testing.assert_close(kept[0], v[0])
    torch.testing.assert_close(kept[2], v[2] + add)
    torch.testing.assert_close(kept[3], v[3] + add)
    gate = float(add[0]) / 4 * 2  # p (or the 0/1 gate): add = v_1[0] * gate / 2
    merged = {p: float(x) for p, x in by_pos(lc, "merged").items()}
    assert merged == pytest.approx({0: 0.0, 2: gate / 2 * 2, 3: gate / 2 * 2})


@pytest.mark.parametrize("stochastic", [False, True])
def test_hand_worked_prefill_batch_merge(stochastic):
    # 6 tokens at positions 0..5, budget 3, n_sink 1: keep 0 (sink) and the newest 2, i.e. 4, 5.
    # Evicted 1, 2, 3 all merge into the next kept tokens: merge_tokens = 5 is capped at the 2
    # later kept tokens, so m = 2 and the receivers are 4 and 5 for every evicted token.
    # S = [9, 0.1, 0.3, 0.05, 0.3, 0.1]: mean(S_4, S_5) = 0.2, p = [0.5, 1 (1.5 clamped), 0.25].
    # Expectation: v_4, v_5 += (0.5 e1 + 1 e2 + 0.25 e3) / 2.
    # Gate with u = [., 0.6, 0.2, 0.1, ., .]: token 1 (0.6 >= 0.5) stays out, 2 and 3 merge:
    # v_4, v_5 += (e2 + e3) / 2.
    eye = torch.eye(6, dtype=F64)
    S = [9.0, 0.1, 0.3, 0.05, 0.3, 0.1]
    buffers = {}
    if stochastic:
        buffers["gate_u"] = torch.tensor([[[0.9, 0.6, 0.2, 0.1, 0.9, 0.9]]], dtype=F64)
    pol = CaM(budget=3, n_sink=1, merge_tokens=5, stochastic=stochastic,
              gate_generator=torch.Generator() if stochastic else None)
    lc = prefill_store(pol, list(range(6)), eye, S, budget=3, capacity=4, buffers=buffers)
    gates = torch.tensor([0, 0, 1, 1, 0, 0] if stochastic else [0, .5, 1, .25, 0, 0], dtype=F64)
    kept = by_pos(lc)
    assert sorted(kept) == [0, 4, 5]
    torch.testing.assert_close(kept[0], eye[0])
    torch.testing.assert_close(kept[4], eye[4] + gates / 2)
    torch.testing.assert_close(kept[5], eye[5] + gates / 2)


def test_hand_worked_decode_merge_max_denominator():
    # denominator="max" (the authors' QA code): p = A_e / max over the kept tokens of A, with A
    # this step's attention. Budget 3, n_sink 1, merge_tokens 2, positions 0, 1, 2 and the new 3;
    # the victim is 1. A = [0.5, 0.1, 0.15, 0.25]: max over {0, 2, 3} = 0.5, p = 0.2, so
    # v_2, v_3 += v_1 * 0.2 / 2 = [0.4, 0.8]. (The cumulative S = [5, .15, .4, .2] would give
    # p = 0.5 with the paper's mean denominator.)
    pol = CaM(budget=3, n_sink=1, merge_tokens=2, denominator="max")
    v = torch.tensor([[9.0, 9.0], [4.0, 8.0], [0.0, 0.0], [1.0, 1.0]], dtype=F64)
    lc = one_head_cache([0, 1, 2, 3], v, [5.0, 0.15, 0.4, 0.2])
    lc.budget.fill_(3)
    probs = torch.tensor([0.5, 0.1, 0.15, 0.25], dtype=F64).view(1, 1, 1, 4)
    ctx = DecodeContext(0, lc, None, None, probs, None, torch.tensor([[3]]),
                        SimpleNamespace(window=None), torch.ones(1, dtype=torch.bool))
    pol.decode_evict(ctx, lowest(pol.decode_victim_score(ctx), lc.pos), lc.retained() > lc.budget)
    kept = by_pos(lc)
    add = torch.tensor([0.4, 0.8], dtype=F64)
    assert sorted(kept) == [0, 2, 3]
    torch.testing.assert_close(kept[0], v[0])
    torch.testing.assert_close(kept[2], v[2] + add)
    torch.testing.assert_close(kept[3], v[3] + add)


def test_hand_worked_prefill_merge_max_denominator():
    # 6 tokens, budget 3, n_sink 1: keep 0, 4, 5; 1, 2, 3 merge into 4 and 5 (m = 2). The chunk's
    # column sums A = [0.8, 0.1, 0.3, 0.05, 0.2, 0.4]: max over the kept {0, 4, 5} = 0.8, so
    # p = [.125, .375, .0625] and v_4, v_5 += (.125 e1 + .375 e2 + .0625 e3) / 2.
    eye = torch.eye(6, dtype=F64)
    A = torch.tensor([0.8, 0.1, 0.3, 0.05, 0.2, 0.4], dtype=F64)
    pol = CaM(budget=3, n_sink=1, merge_tokens=5, denominator="max")
    lc = prefill_store(pol, list(range(6)), eye, (A * 7).tolist(), budget=3, capacity=4,
                       stats={"step": A[None, None]})
    kept = by_pos(lc)
    gates = torch.tensor([0, .125, .375, .0625, 0, 0], dtype=F64)
    assert sorted(kept) == [0, 4, 5]
    torch.testing.assert_close(kept[4], eye[4] + gates / 2)
    torch.testing.assert_close(kept[5], eye[5] + gates / 2)


def test_additive_merge_grows_values(tiny64):
    """The paper's additive merge (v_i += v_e p / m) is not a convex combination: a value that
    keeps receiving merges grows along a long stream (documented; shown in the benchmark)."""
    ids = torch.randint(0, tiny64.args.vocab_size, (1, 8), generator=gen(2))
    norms = {}
    for name, kw in [("streaming", {}), ("cam", dict(merge_tokens=4))]:
        out = flexkv.generate(tiny64, ids, max_new_tokens=120, policy=name, budget=8, n_sink=2, **kw)
        lc = out.cache.layers[0]
        norms[name] = float(lc.v[lc.pos >= 0].norm(dim=-1).mean())
    assert norms["cam"] > 1.3 * norms["streaming"]  # measured 11.7 vs 7.3


# ----------------------------------------------------------------------------- vs reference
def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("kw,chunk,pad", [
    (dict(budget=9, n_sink=2, merge_tokens=3), None, 0),
    (dict(budget=7, n_sink=1, merge_tokens=32, bias="log_mass", stochastic=True,
          gate_generator=gen(3)), 5, 0),
    (dict(budget=9, n_sink=2, merge_tokens=3, denominator="max", bias="log_mass"), 4, 6),
    (dict(budget=8, n_sink=4, merge_tokens=2, stochastic=True, gate_generator=gen(4)), None, 6),
])
def test_merged_values_equal_reference(tiny64, kw, chunk, pad):
    ids = torch.randint(0, tiny64.args.vocab_size, (2, 24), generator=gen(5))
    mask = None
    if pad:
        mask = torch.ones_like(ids)
        mask[1, :pad] = 0
    common = dict(max_new_tokens=17, policy="cam", prefill_chunk=chunk, attention_mask=mask, **kw)
    a, sa = snapshots(tiny64, ids, **common)
    r, sr = snapshots(tiny64, ids, reference=True, **common)
    assert_same_values(sa, sr)
    torch.testing.assert_close(a.logits, r.logits, atol=1e-8, rtol=0)


def test_stochastic_gate_is_reproducible(tiny_llama):
    ids = torch.randint(0, tiny_llama.args.vocab_size, (2, 30), generator=gen(1))
    kw = dict(max_new_tokens=12, policy="cam", budget=8, n_sink=2, merge_tokens=4, stochastic=True)

    def run(g):
        out = flexkv.generate(tiny_llama, ids, gate_generator=g, **kw)
        return out.tokens, [lc.v.clone() for lc in out.cache.layers]

    g0 = gen(0)
    state = g0.get_state()
    t1, v1 = run(g0)
    assert torch.equal(g0.get_state(), state)  # the generator is read, not advanced
    t2, v2 = run(gen(0))
    assert torch.equal(t1, t2) and all(torch.equal(a, b) for a, b in zip(v1, v2))
    _, v3 = run(gen(1))
    assert any(not torch.equal(a, b) for a, b in zip(v1, v3))


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kw,match", [
    (dict(budget=8, merge_tokens=0), "merge_tokens must be an int >= 1"),
    (dict(budget=8, n_sink=-1), "n_sink must be an int >= 0"),
    (dict(budget=4, n_sink=4), "budget must be >= 5"),
    (dict(budget=8, stochastic=True), "gate_generator .* is required"),
    (dict(budget=8, stochastic=True, gate_generator=3), "gate_generator must be a torch.Generator"),
    (dict(budget=8, stochastic="yes"), "stochastic must be True or False"),
    (dict(budget=8, bias="mass"), "bias must be one of"),
    (dict(budget=8, denominator="sum"), "denominator must be one of \\('mean', 'max'\\)"),
])
def test_bad_input(tiny_llama, kw, match):
    with pytest.raises(ValueError, match=match):
        flexkv.generate(tiny_llama, torch.zeros(1, 12, dtype=torch.long), 4, policy="cam", **kw)
