"""`vam` (a modifier over any policy): a hand-computed two-step example through the static hooks
and the reference, alpha = 0 is bit-identical to the base, `full+vam` changes only the values of
tokens written during decode, composition API (names, delegation, make_policy routing,
reference_for), a base that evicts the new token in the same step, bad input."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import flexkv
from flexkv.cache import LayerCache
from flexkv.policies import H2O, VAM, Full, SnapKV, make_policy
from flexkv.reference import reference_for
from flexkv.reference.engine import Head, Step
from helpers import canonical_cache, random_ids, NoCacheBuilt

F64 = torch.float64

# --------------------------------------------------------------------------- hand example
# One KV head with G = 2 query heads, D = 2, alpha = 0.5. The cache holds token 0: k0 = (1, 0),
# v0 = (4, 0). Step 1 appends token 1: k1 = (0, 0), v1 = (0, 4).
#   head 0: q = (0, 0)             -> logits (0, 0)              -> probs (1/2, 1/2) -> o0 = (2, 2)
#   head 1: q = (sqrt(2) ln 3, 0)  -> logits (ln 3, 0) (/sqrt 2) -> probs (3/4, 1/4) -> o1 = (3, 1)
#   mean o = (2.5, 1.5); v1 <- (0, 4) + 0.5 (2.5, 1.5) = (1.25, 4.75); the step's output used v1.
# Step 2 appends token 2: k2 = (0, 0), v2 = (0, 0), both queries (0, 0) (uniform over 3 tokens):
#   o = ((4 + 1.25 + 0) / 3, (0 + 4.75 + 0) / 3) = (1.75, 4.75 / 3)  (sees the updated v1)
#   v2 <- (0, 0) + 0.5 o = (0.875, 4.75 / 6).
Q1 = [[0., 0], [math.sqrt(2) * math.log(3), 0]]
STEPS = [  # (position, k, v, queries, expected outputs per query head, expected new v)
    (1, [0., 0], [0., 4], Q1, [[2., 2], [3, 1]], [1.25, 4.75]),
    (2, [0., 0], [0., 0], [[0., 0], [0, 0]], [[1.75, 4.75 / 3]] * 2, [0.875, 4.75 / 6]),
]


def test_hand_example_static():
    lc = LayerCache(1, 1, 3, 2, dtype=F64, device="cpu")
    lc.load(torch.tensor([[[[1., 0]]]], dtype=F64), torch.tensor([[[[4., 0]]]], dtype=F64),
            torch.tensor([[[0]]]))
    attn = SimpleNamespace(layer_idx=0, window=None)
    pol = VAM(base=Full(), alpha=0.5)
    for p, k, v, q, o_want, v_want in STEPS:
        t = lambda x: torch.tensor(x, dtype=F64)
        o = pol.decode_layer(attn, lc, t(q)[None, :, None], t([[k]])[None], t([[v]])[None],
                             torch.tensor([[p]]), torch.ones(1, dtype=torch.bool))
        torch.testing.assert_close(o[0, :, 0], t(o_want))
        slot = int((lc.pos[0, 0] == p).nonzero())
        torch.testing.assert_close(lc.v[0, 0, slot], t(v_want))
    torch.testing.assert_close(lc.v[0, 0, 0], torch.tensor([4., 0], dtype=F64))  # older untouched


def test_hand_example_reference():
    ref = reference_for(VAM(base=Full(), alpha=0.5))
    head = Head(torch.tensor([0]), torch.tensor([[1., 0]], dtype=F64), torch.tensor([[4., 0]], dtype=F64))
    for p, k, v, q, o_want, v_want in STEPS:
        head = Head(torch.cat([head.pos, torch.tensor([p])]), torch.cat([head.k, torch.tensor([k], dtype=F64)]),
                    torch.cat([head.v, torch.tensor([v], dtype=F64)]))
        out = torch.tensor(o_want, dtype=F64)  # the step's attention output per query head
        step = Step(torch.tensor(q, dtype=F64), p, None, out)
        head = ref.value_update(0, 0, ref.decode_update(0, 0, [head], [step], None), [step], None)[0]
        torch.testing.assert_close(head.v[-1], torch.tensor(v_want, dtype=F64))


# --------------------------------------------------------------------------- on the tiny model
@pytest.mark.parametrize("base,kw", [("h2o", dict(budget=10, recent=3)),
                                     ("streaming", dict(budget=10, n_sink=2)),
                                     ("snapkv", dict(budget=10, window=3)),
                                     ("full", {})])
def test_alpha_zero_is_bit_identical_to_base(tiny_llama, base, kw):
    ids = random_ids(2, 20, tiny_llama.args.vocab_size, seed=5)
    a = flexkv.generate(tiny_llama, ids, max_new_tokens=12, policy=base, output_logits=True, **kw)
    b = flexkv.generate(tiny_llama, ids, max_new_tokens=12, policy=base + "+vam", alpha=0.0,
                        output_logits=True, **kw)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logits, b.logits)
    for la, lb in zip(a.cache.layers, b.cache.layers):
        for (pa, ka, va), (pb, kb, vb) in zip(canonical_cache(la).values(), canonical_cache(lb).values()):
            assert torch.equal(pa, pb) and torch.equal(ka, kb) and torch.equal(va, vb)


def test_full_vam_changes_only_decoded_values(tiny_llama):
    """Same tokens fed back (forced): the prompt's k and v are bit-identical to full's in every
    layer, every value written during decode (positions T .. T+N-2) differs, and layer 0's keys
    (which depend only on token and position) are identical everywhere."""
    T, N = 16, 10
    ids = random_ids(2, T, tiny_llama.args.vocab_size, seed=6)
    forced = random_ids(2, N, tiny_llama.args.vocab_size, seed=7)
    full = flexkv.generate(tiny_llama, ids, max_new_tokens=N, forced_tokens=forced)
    vam = flexkv.generate(tiny_llama, ids, max_new_tokens=N, forced_tokens=forced,
                          policy="full+vam", alpha=0.35)
    for l, (lf, lv) in enumerate(zip(full.cache.layers, vam.cache.layers)):
        for (pf, kf, vf), (pv, kv, vv) in zip(canonical_cache(lf).values(), canonical_cache(lv).values()):
            assert torch.equal(pf, pv) and pf.tolist() == list(range(T + N - 1))
            assert torch.equal(kf[:T], kv[:T]) and torch.equal(vf[:T], vv[:T])
            assert (vf[T:] != vv[T:]).any(dim=-1).all()
            if l == 0:
                assert torch.equal(kf, kv)


@pytest.fixture(scope="module")
def tiny64(tiny_llama_dir):
    model, _ = flexkv.load_model(tiny_llama_dir, dtype=F64)
    return model


def test_new_token_evicted_in_the_same_step(tiny64):
    """tova keeps no recent window: with budget 2 the new token is often evicted in its own step
    (then nothing is written); static == reference on positions and logits."""
    ids = random_ids(1, 10, tiny64.args.vocab_size, seed=8)
    kw = dict(max_new_tokens=10, policy="tova+vam", budget=2, alpha=1.0, output_logits=True)
    steps = []
    a = flexkv.generate(tiny64, ids, cache_callback=lambda c: steps.append(c.layers[1].pos.clone()), **kw)
    r = flexkv.generate(tiny64, ids, reference=True, **kw)
    # decode step i (1..9) wrote position 9 + i
    assert any(9 + i not in s.flatten().tolist() for i, s in enumerate(steps) if i > 0)
    torch.testing.assert_close(a.logits, r.logits, atol=1e-8, rtol=0)
    assert torch.equal(a.tokens, r.tokens)


# --------------------------------------------------------------------------- composition
def test_composition_api():
    base = H2O(budget=8, recent=2)
    pol = VAM(base=base, alpha=0.5)
    assert pol.name == "h2o+vam" and pol.budget == 8 and pol.w == 2 and pol.decode_evicts
    assert pol.stats == base.stats and pol.capacity(0, 20, 5) == base.capacity(0, 20, 5) == 9
    assert "<policy>+vam" in flexkv.policies.available()
    made = make_policy("h2o+vam", budget=8, recent=2, alpha=0.5)
    assert made == pol and made.base == base
    assert make_policy("snapkv+vam", budget=8).base == SnapKV(budget=8)
    assert make_policy("full+vam").alpha == 0.35  # the default
    nested = make_policy("h2o+vam+vam", budget=8)
    assert nested.name == "h2o+vam+vam" and nested.base.base == H2O(budget=8)
    ref = reference_for(pol)
    assert type(ref).__name__ == "RefVAM" and type(ref.base).__name__ == "RefH2O"
    assert ref.stat_names == ("score",)


def test_policy_object_and_prefill_only_base(tiny_llama):
    ids = random_ids(1, 16, tiny_llama.args.vocab_size, seed=9)
    a = flexkv.generate(tiny_llama, ids, max_new_tokens=4, policy=VAM(base=H2O(budget=8)))
    b = flexkv.generate(tiny_llama, ids, max_new_tokens=4, policy="h2o+vam", budget=8)
    assert torch.equal(a.tokens, b.tokens)
    out = flexkv.generate(tiny_llama, ids, max_new_tokens=4, policy="kvmerger+vam", budget=8,
                          window=2, skip_layers=())
    assert (out.cache.retained() == 8 + 3).all()


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kw,match", [
    (dict(policy="h2o+vam", budget=8, alpha=-0.1), "alpha"),
    (dict(policy="h2o+vam", budget=8, alpha=float("nan")), "alpha"),
    (dict(policy="h2o+vam", budget=8, alpha=float("inf")), "alpha"),
    (dict(policy="h2o+vam", budget=8, alpha="0.3"), "alpha"),
    (dict(policy="h2o+vam", budget=0), "budget"),          # the base's validation
    (dict(policy="full+vam", budget=8), "budget"),
    (dict(policy="h2o+vam", budget=8, no_such=1), "no_such"),
    (dict(policy="h2o+vamm", budget=8), "modifier"),
])
def test_bad_input(tiny_llama, kw, match):
    ids = random_ids(1, 12, tiny_llama.args.vocab_size)
    with NoCacheBuilt(), pytest.raises(ValueError, match=match):
        flexkv.generate(tiny_llama, ids, max_new_tokens=2, **kw)


def test_base_must_be_a_policy():
    with pytest.raises(ValueError, match="base"):
        VAM(base="h2o")


def test_nonzero_alpha_changes_the_tokens(tiny_llama):
    """alpha = 0.35 changes what h2o generates (the compiled step with alpha = 0.35 is checked
    against the reference for every '+vam' base by tests/test_policies.py)."""
    ids = random_ids(2, 24, tiny_llama.args.vocab_size, seed=3)
    vam = flexkv.generate(tiny_llama, ids, max_new_tokens=40, policy="h2o+vam", budget=10,
                          alpha=0.35)
    base = flexkv.generate(tiny_llama, ids, max_new_tokens=40, policy="h2o", budget=10)
    assert not torch.equal(base.tokens, vam.tokens)


def test_modifier_prefixed_parameter_routes_to_vam():
    """`adakv` has its own `alpha`; `vam_alpha=` sets the modifier's explicitly."""
    from flexkv.policies import make_policy
    p = make_policy("adakv+vam", budget=64, alpha=0.3, vam_alpha=0.1)
    assert p.alpha == 0.1 and p.base.alpha == 0.3
    assert make_policy("h2o+vam", budget=64, alpha=0.2).alpha == 0.2
