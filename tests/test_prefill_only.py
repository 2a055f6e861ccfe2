"""`prefill_only=True`: a decode-time policy compresses the prompt, then decode appends.

The generic property tests (tests/test_policies.py, tests/policy_cases.py) draw `prefill_only`
for every decode-time policy, so the static path equals the eager reference there and decode
appends exactly one token per head per step. Here: the prompt keeps what the policy keeps
without the flag, one-shot and chunked; decode computes no probabilities and no statistics; the
cache is sized for appending; bad values are refused before work starts (API and CLI).
"""
from __future__ import annotations

import pytest
import torch

import flexkv
from flexkv import attention
from flexkv.policies import make_policy

T, NEW, BUDGET = 40, 6, 12
DECODE_TIME = {
    "streaming": dict(n_sink=2),
    "h2o": dict(recent=3),
    "tova": {},
    "keydiff": dict(window=2),
    "weightedkv": dict(n_sink=1, window=2, bias="log_mass"),
    "cam": dict(n_sink=2, merge_tokens=3, bias="log_mass"),
}


def _kept(cache) -> list[list[list[set]]]:
    """Positions held per (layer, row, KV head)."""
    return [[[set(p[p >= 0].tolist()) for p in row] for row in lc.pos] for lc in cache.layers]


def _run(model, ids, policy, **kw):
    snaps = []
    out = flexkv.generate(model, ids, max_new_tokens=NEW, policy=policy, budget=BUDGET,
                          cache_callback=lambda c: snaps.append((_kept(c), c.layers[0].v.clone())),
                          **kw)
    return out, snaps


@pytest.mark.parametrize("chunk", [None, 16])
@pytest.mark.parametrize("policy", sorted(DECODE_TIME))
def test_prompt_kept_as_without_the_flag_then_decode_appends(tiny_llama, policy, chunk):
    ids = torch.randint(0, 101, (2, T), generator=torch.Generator().manual_seed(1))
    kw = dict(DECODE_TIME[policy], prefill_chunk=chunk)
    evicting, ev_snaps = _run(tiny_llama, ids, policy, **kw)
    once, snaps = _run(tiny_llama, ids, policy, prefill_only=True, **kw)
    assert snaps[0][0] == ev_snaps[0][0], "the prompt's selection changed"
    # the merging policies folded the same values into the survivors (slot order is the same;
    # fp32 sums over the cache's other length round differently)
    torch.testing.assert_close(snaps[0][1][:, :, :BUDGET], ev_snaps[0][1][:, :, :BUDGET])
    assert torch.equal(once.tokens[:, T], evicting.tokens[:, T])  # the prefill's token
    for step in range(1, NEW):
        for layer, layer0 in zip(snaps[step][0], snaps[0][0]):
            for row, row0 in zip(layer, layer0):
                for held, held0 in zip(row, row0):
                    assert held == held0 | set(range(T, T + step)), (step, held, held0)
    caps = [lc.capacity for lc in once.cache.layers]
    assert caps == [BUDGET + NEW] * len(caps)      # min(budget, T) + new tokens: room to append
    assert [lc.capacity for lc in evicting.cache.layers] == [BUDGET + 1] * len(caps)


def test_decode_computes_no_probabilities_or_statistics(tiny_llama, monkeypatch):
    """tova needs each step's attention probabilities to evict; h2o accumulates them. With
    `prefill_only` decode asks for none and leaves the statistics as the prompt left them."""
    asked = []
    real = attention.decode_attention

    def spy(*a, need_probs=False, **k):
        asked.append(need_probs)
        return real(*a, need_probs=need_probs, **k)

    monkeypatch.setattr(attention, "decode_attention", spy)
    ids = torch.randint(0, 101, (1, T), generator=torch.Generator().manual_seed(2))
    flexkv.generate(tiny_llama, ids, max_new_tokens=3, policy="tova", budget=BUDGET)
    assert asked and all(asked)
    asked.clear()
    snaps = []
    flexkv.generate(tiny_llama, ids, max_new_tokens=4, policy="h2o", budget=BUDGET,
                    prefill_only=True, cache_callback=lambda c: snaps.append(
                        (c.layers[1].score.clone(), c.layers[1].pos.clone())))
    assert asked and not any(asked)
    score0, pos0 = snaps[0]
    for score, pos in snaps[1:]:  # the prompt's statistic unchanged, the appended tokens' 0
        held = pos0 >= 0
        torch.testing.assert_close(score[held], score0[held], rtol=0, atol=0)
        assert (score[(pos >= T)] == 0).all() and (pos >= T).sum() > 0


def test_compositions_and_the_policy_object():
    pol = make_policy("h2o+vam", budget=8, prefill_only=True, alpha=0.5)
    assert pol.base.prefill_only and not pol.evicts_at_decode and pol.decode_evicts
    assert pol.capacity(0, 20, 5) == 8 + 5
    assert make_policy("tova", budget=8).evicts_at_decode
    assert not make_policy("snapkv", budget=8).evicts_at_decode
    assert "prefill_only" in make_policy("tova", budget=8).param_names()
    h2o = flexkv.policies.H2O(8, 3)  # keyword-only: positional parameters keep their meaning
    assert (h2o.budget, h2o.recent, h2o.prefill_only) == (8, 3, False)


@pytest.mark.parametrize("policy, kw, match", [
    ("snapkv", dict(budget=8, prefill_only=True), "evicts nothing at decode already"),
    ("pyramidkv", dict(budget=8, prefill_only=True), "evicts nothing at decode already"),
    ("full", dict(prefill_only=True), "evicts nothing at decode already"),
    ("tova", dict(budget=8, prefill_only=1), "prefill_only must be True or False"),
    ("h2o+vam", dict(budget=8, prefill_only="yes"), "prefill_only must be True or False"),
])
def test_bad_values_are_refused_before_work(tiny_llama, policy, kw, match):
    ids = torch.randint(0, 101, (1, 10))
    with pytest.raises(ValueError, match=match):
        flexkv.generate(tiny_llama, ids, max_new_tokens=2, policy=policy, **kw)


def test_cli_refuses_it_with_exit_2(tmp_path, capsys):
    from flexkv.cli import main

    # refused before the model is loaded: the directory does not even exist
    rc = main(["generate", "--model", str(tmp_path / "none"), "--prompt", "hi", "--policy",
               "snapkv", "--budget", "8", "--param", "prefill_only=true"])
    cap = capsys.readouterr()
    assert rc == 2 and "prefill_only" in cap.err and "Traceback" not in cap.err
