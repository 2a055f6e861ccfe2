"""Generic property tests for every policy in tests/policy_cases.py.

- the static-shape implementation (what `compile=True` compiles) and the eager reference
  (`reference=True`, shared/METHODS.md transcribed) keep the same position set per
  (layer, batch row, KV head) after prefill and after each of 16 decode steps, and give the same
  logits (float64 model: tolerance 1e-8, so near-ties cannot make the comparison flaky);
- invariants: retained <= budget at every step, protected tokens (sinks, recent window) always
  kept, `budget >= prompt + new tokens` is exactly `full`, a random permutation of the slots after
  prefill changes nothing;
- zero recompiles across 50 compiled decode steps for every decode-time policy.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from torch._dynamo.utils import counters

import flexkv
from flexkv.generate import decode_one_token
from policy_cases import CASES, PROTECTED, VARIABLE_BUDGET

NEW = 17  # the prefill's token + 16 decode steps
SETTINGS = settings(max_examples=8, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def tiny64(tiny_llama_dir):
    model, _ = flexkv.load_model(tiny_llama_dir, dtype=torch.float64)
    return model


def pos_sets(cache):
    """[layer][b][g] -> frozenset of kept positions."""
    out = []
    for lc in cache.layers:
        P = lc.pos
        out.append([[frozenset(p for p in P[b, g].tolist() if p >= 0) for g in range(P.shape[1])]
                    for b in range(P.shape[0])])
    return out


def permute_slots(cache, seed: int) -> None:
    """Shuffle every head's slots (k, v, pos and statistics together), independently per head."""
    g = torch.Generator().manual_seed(seed)
    for lc in cache.layers:
        B, H, S = lc.pos.shape
        perm = torch.stack([torch.randperm(S, generator=g) for _ in range(B * H)]).view(B, H, S)
        for name in ("pos",) + lc.stat_names:
            buf = getattr(lc, name)
            buf.copy_(buf.gather(2, perm))
        for name in ("k", "v"):
            buf = getattr(lc, name)
            buf.copy_(buf.gather(2, perm[..., None].expand_as(buf)))


def run(model, ids, policy, kw, *, chunk=None, reference=False, mask=None, permute=None):
    snaps, retained = [], []

    def track(cache):
        if permute is not None and not snaps:
            permute_slots(cache, permute)
        snaps.append(pos_sets(cache))
        retained.append(cache.retained().clone())

    out = flexkv.generate(model, ids, max_new_tokens=NEW, policy=policy, prefill_chunk=chunk,
                          reference=reference, attention_mask=mask, cache_callback=track,
                          output_logits=True, **kw)
    return out, snaps, retained


@st.composite
def scenario(draw, name):
    T = draw(st.integers(8, 40))
    B = draw(st.integers(1, 2))
    pad = draw(st.integers(0, T // 2)) if B == 2 else 0
    chunk = draw(st.one_of(st.none(), st.integers(1, T)))
    seed = draw(st.integers(0, 2**16))
    kw = CASES[name](draw, T - pad)
    return T, B, pad, chunk, seed, kw


def prompt(T, B, pad, seed, vocab):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    mask = None
    if pad:
        mask = torch.ones(B, T, dtype=torch.long)
        mask[1, :pad] = 0
    return ids, mask


@pytest.mark.parametrize("name", sorted(CASES))
@SETTINGS
@given(data=st.data())
def test_static_equals_reference(tiny64, name, data):
    T, B, pad, chunk, seed, kw = data.draw(scenario(name))
    ids, mask = prompt(T, B, pad, seed, tiny64.args.vocab_size)
    a, sa, _ = run(tiny64, ids, name, kw, chunk=chunk, mask=mask)
    r, sr, _ = run(tiny64, ids, name, kw, chunk=chunk, mask=mask, reference=True)
    for step, (x, y) in enumerate(zip(sa, sr)):
        assert x == y, f"{name} {kw}: kept positions differ after step {step}"
    torch.testing.assert_close(a.logits, r.logits, atol=1e-8, rtol=0)
    assert torch.equal(a.tokens, r.tokens)


@pytest.mark.parametrize("name", sorted(CASES))
@settings(SETTINGS, max_examples=4)
@given(data=st.data())
def test_invariants(tiny64, name, data):
    T, B, pad, chunk, seed, kw = data.draw(scenario(name))
    ids, mask = prompt(T, B, 0, seed, tiny64.args.vocab_size)
    out, snaps, retained = run(tiny64, ids, name, kw, chunk=chunk)
    for ret in retained:
        budgets = torch.stack([lc.budget for lc in out.cache.layers])
        assert (ret <= budgets).all()
        if name not in VARIABLE_BUDGET:
            assert (ret <= kw["budget"]).all(), "retained more than the budget"
    if name in PROTECTED:
        for step, snap in enumerate(snaps):
            must = PROTECTED[name](kw, T - 1 + step)
            for layer in snap:
                for row in layer:
                    for kept in row:
                        assert must <= kept, f"protected {sorted(must - kept)} evicted at step {step}"
    # a permutation of the slots after prefill changes nothing
    p, psnaps, _ = run(tiny64, ids, name, kw, chunk=chunk, permute=seed)
    assert psnaps == snaps
    torch.testing.assert_close(p.logits, out.logits, atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_budget_holding_everything_is_full(tiny64, name):
    ids, _ = prompt(20, 2, 0, 1, tiny64.args.vocab_size)
    kw = CASES[name](_FixedDraw(), 20)
    if kw.get("budget") is not None:  # ("full+vam" takes no budget)
        kw["budget"] = 20 + NEW
    full = flexkv.generate(tiny64, ids, max_new_tokens=NEW, output_logits=True)
    out = flexkv.generate(tiny64, ids, max_new_tokens=NEW, policy=name, output_logits=True, **kw)
    assert torch.equal(out.tokens, full.tokens)
    torch.testing.assert_close(out.logits, full.logits, atol=1e-10, rtol=0)


class _FixedDraw:
    """A stand-in for hypothesis' draw that picks each strategy's simplest example."""

    def __call__(self, strategy):
        from hypothesis import find
        return find(strategy, lambda _: True)


DECODE_TIME = ["full"] + sorted(n for n in CASES if flexkv.policies.make_policy(
    n, **CASES[n](_FixedDraw(), 30)).decode_evicts)


@pytest.mark.slow
def test_zero_recompiles_compiled_equals_eager(tiny_llama):
    """Every decode-time policy: 50 compiled steps, one graph each, no recompiles, and the
    compiled tokens equal the eager static path's."""
    ids, _ = prompt(24, 2, 0, 3, tiny_llama.args.vocab_size)
    for name in DECODE_TIME:
        kw = {} if name == "full" else CASES[name](_FixedDraw(), 24)
        torch._dynamo.reset()
        eager = flexkv.generate(tiny_llama, ids, max_new_tokens=51, policy=name, **kw)
        counters.clear()
        comp = flexkv.generate(tiny_llama, ids, max_new_tokens=51, policy=name, compile=True, **kw)
        assert torch.equal(eager.tokens, comp.tokens), name
        assert len(_debug_get_cache_entry_list(decode_one_token.__code__)) == 1, name
        assert not counters["graph_break"], (name, dict(counters["graph_break"]))
        graphs = counters["stats"]["unique_graphs"]
        flexkv.generate(tiny_llama, ids.flip(0), max_new_tokens=51, policy=name, compile=True, **kw)
        assert len(_debug_get_cache_entry_list(decode_one_token.__code__)) == 1, name
        assert counters["stats"]["unique_graphs"] == graphs, name
