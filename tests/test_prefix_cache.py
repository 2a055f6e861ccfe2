"""The serving engine's prefix cache (`Engine(prefix_cache_memory=...)`) and the policies'
`prefix_key` contract it rests on.

- The contract (hypothesis, every policy and parameter variant of tests/policy_cases.py and
  `full`, float64 tiny model): two prompts share their first k chunks; when the policy's
  `prefix_key`s of the two requests are equal, the second one's prefill resumed from the first
  one's kept state at that boundary ends with the same positions, the same K, V and statistics
  in every held slot, every other buffer (budgets, policy-owned tables) and the last logits
  equal, bit for bit, to its prefill from scratch (chunked or padded as the compiled prefill runs it). Prompt
  lengths and `max_tokens` are drawn equal half of the time, so the policies whose key is the
  prompt's shape are checked too.
- The engine (hypothesis, every policy): requests whose prompts share prefixes arrive at
  different steps; each one's greedy tokens and its slot's kept positions equal its solo
  `flexkv.generate` run; a last request with the first one's shape and prefix must hit.
- Hits skip exactly the kept chunks; the memory bound and least-recently-used order; requests
  that want prompt logprobs run every chunk; the metrics; bad arguments.
"""
from __future__ import annotations

from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flexkv
from flexkv.generate import Prefill, prefill_one_chunk
from flexkv.policies import make_policy
from flexkv.serve import Engine, SamplingParams
from flexkv.serve.metrics import prometheus_text
from policy_cases import CASES
from test_serve_engine import MAX_NEW, MAX_PROMPT, SETTINGS, pos_sets, random_prompt, solo

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # many small eager prefills of a tiny model

POLICIES = sorted(CASES) + ["full"]
T_MAX = 24   # the contract test's prompts (in chunks of 2-6 tokens)


@pytest.fixture(scope="module")
def tiny64(tiny_llama_dir):
    model, _ = flexkv.load_model(tiny_llama_dir, dtype=torch.float64)
    return model


def run_prefill(model, policy, caps, prompt, max_new, chunk, pad, resume=None, keep_at=None):
    """Prefill `prompt` into a fresh one-row cache as the engine does; `resume`: (start, state)
    to resume from; `keep_at`: the boundary whose state is returned as well (`snapshot_row`,
    as the engine keeps it)."""
    cache = policy.build_cache(model, 1, len(prompt), max_new, capacities=caps)
    ids = torch.tensor([prompt])
    run = Prefill(model, cache, policy, ids, torch.arange(len(prompt))[None], chunk, max_new, pad=pad)
    if resume is not None:
        cache.restore_row(resume[1], 0)
        run.resume_at(resume[0])
    kept, logits = None, None
    while not run.done:
        logits = run.step()
        if run.start == keep_at:
            kept = cache.snapshot_row(0)
    return cache, logits, kept


@pytest.mark.parametrize("name", POLICIES)
@settings(SETTINGS, max_examples=60)   # prefills of at most T_MAX tokens, no decode
@given(data=st.data())
def test_equal_prefix_keys_mean_equal_caches(tiny64, name, data):
    d = data.draw
    V = tiny64.args.vocab_size
    chunk = d(st.integers(2, 6))
    k = d(st.integers(1, (T_MAX - 1) // chunk))
    shared = d(st.lists(st.integers(0, V - 1), min_size=k * chunk, max_size=k * chunk))
    T_a = d(st.integers(max(8, k * chunk + 1), T_MAX))
    kw = CASES[name](d, T_a) if name in CASES else {}   # budgets below or above this prompt
    policy = make_policy(name, **kw)
    N_a = d(st.integers(1, MAX_NEW))
    same_shape = d(st.booleans())
    T_b = T_a if same_shape else d(st.integers(k * chunk + 1, T_MAX))
    N_b = N_a if same_shape else d(st.integers(1, MAX_NEW))
    a = shared + d(st.lists(st.integers(0, V - 1), min_size=T_a - k * chunk, max_size=T_a - k * chunk))
    b = shared + d(st.lists(st.integers(0, V - 1), min_size=T_b - k * chunk, max_size=T_b - k * chunk))
    pad = d(st.booleans())
    if policy.prefix_key(T_a, N_a) != policy.prefix_key(T_b, N_b):
        return
    policy.validate(T_MAX, MAX_NEW, tiny64.args.num_hidden_layers)
    caps = policy.max_capacities(tiny64, T_MAX, MAX_NEW)
    _, _, state = run_prefill(tiny64, policy, caps, a, N_a, chunk, pad, keep_at=k * chunk)
    resumed, logits_r, _ = run_prefill(tiny64, policy, caps, b, N_b, chunk, pad, resume=(k * chunk, state))
    fresh, logits_f, _ = run_prefill(tiny64, policy, caps, b, N_b, chunk, pad)
    assert torch.equal(logits_r, logits_f), f"{name} {kw}: last logits"
    for l, (mine, theirs) in enumerate(zip(resumed.layers, fresh.layers)):
        held = theirs.pos >= 0   # an empty slot's K, V and statistics are never read (a write
        slot_bufs = mine.slot_buffers()  # resets them), and a resumed one has none left over
        for buf_name, buf in mine.named_buffers():
            want = getattr(theirs, buf_name)
            same = (torch.equal(buf[held], want[held]) and torch.equal(mine.pos, theirs.pos)
                    if buf_name in slot_bufs else torch.equal(buf, want))
            assert same, (f"{name} {kw}: layer {l} {buf_name} after resuming at {k * chunk} of "
                          f"{T_b} (from a {T_a}-token prompt)")


@st.composite
def shared_schedule(draw, name):
    kw = CASES[name](draw, draw(st.integers(8, 30))) if name in CASES else {}
    chunk = draw(st.integers(2, 8))
    n_prefixes = draw(st.integers(1, 2))
    reqs = []
    for _ in range(draw(st.integers(2, 5))):
        T = draw(st.integers(2, MAX_PROMPT))
        reqs.append(dict(T=T, prefix=draw(st.integers(0, n_prefixes - 1)),
                         shared=draw(st.integers(0, T - 1)), seed=draw(st.integers(0, 2**16)),
                         max_tokens=draw(st.integers(1, MAX_NEW)), at=draw(st.integers(0, 12))))
    return kw, chunk, reqs, draw(st.integers(1, 3)), draw(st.booleans())


@pytest.mark.parametrize("name", POLICIES)
@SETTINGS
@given(data=st.data())
def test_engine_with_a_prefix_cache_equals_solo_generate(tiny64, name, data):
    kw, chunk, reqs, slots, padded = data.draw(shared_schedule(name))
    V = tiny64.args.vocab_size
    with mock.patch("flexkv.serve.engine.compiled_prefill", lambda: prefill_one_chunk):
        eng = Engine(tiny64, None, name, max_slots=slots, max_new_tokens=MAX_NEW,
                     max_prompt_tokens=MAX_PROMPT, prefill_chunk=chunk, compile_prefill=padded,
                     prefix_cache_memory="1GiB", **kw)
    roots = [random_prompt(MAX_PROMPT, 1000 + i, V) for i in range(2)]
    prompts = [roots[r["prefix"]][:r["shared"]] + random_prompt(r["T"] - r["shared"], r["seed"], V)
               for r in reqs]
    # a last request with the first one's shape and its prompt but for the last token: its
    # chunks before the last are kept (the first request ran them), whatever the policy's key
    first = reqs[0]
    probe = prompts[0][:-1] + [(prompts[0][-1] + 1) % V]
    reqs.append(dict(first, at=max(r["at"] for r in reqs) + 1))
    prompts.append(probe)
    want = [solo(tiny64, p, r["max_tokens"], chunk, name, kw) for p, r in zip(prompts, reqs)]
    handles = [None] * len(reqs)
    hits_before_probe = None
    step = 0
    while step < 300 and (any(h is None for h in handles) or eng.has_work()):
        for i, r in enumerate(reqs):
            if handles[i] is None and r["at"] <= step and (i < len(reqs) - 1 or not eng.has_work()):
                if i == len(reqs) - 1:
                    hits_before_probe = eng.metrics()["prefix_cache_hits_total"]
                handles[i] = eng.submit(prompts[i], SamplingParams(max_tokens=r["max_tokens"]))
        eng.step()
        for slot in eng._decoding:
            h = eng._slots[slot].handle
            i = next(j for j, x in enumerate(handles) if x is h)
            assert pos_sets(eng.cache, slot) == want[i][1][len(h.tokens) - 1], \
                f"{name} {kw}: request {i} kept positions differ after {len(h.tokens)} tokens"
        step += 1
    for i, (h, (tokens, _)) in enumerate(zip(handles, want)):
        assert h.finish_reason == "length"
        assert h.tokens == tokens, f"{name} {kw}: request {i} {reqs[i]} differs from solo"
    m = eng.metrics()
    if first["T"] > chunk:   # the probe resumed from its first chunk boundary at least
        assert m["prefix_cache_hits_total"] > hits_before_probe
    assert m["prefix_cache_bytes"] <= 2**30


def test_a_hit_skips_the_kept_chunks(tiny64):
    V = tiny64.args.vocab_size
    doc = random_prompt(16, 1, V)
    p1, p2 = doc + random_prompt(5, 2, V), doc + random_prompt(9, 3, V)
    eng = Engine(tiny64, None, "h2o", budget=12, max_slots=2, max_new_tokens=MAX_NEW,
                 max_prompt_tokens=MAX_PROMPT, prefill_chunk=4, prefix_cache_memory="1GiB")
    out1 = eng.generate([p1], SamplingParams(max_tokens=6))
    m = eng.metrics()
    assert m["prefill_chunks_total"] == 6 and m["prefix_cache_hits_total"] == 0
    assert m["prefix_cache_entries"] == 5            # after 4, 8, 12, 16 and 20 tokens
    out2 = eng.generate([p2], SamplingParams(max_tokens=6))
    m = eng.metrics()
    assert m["prefill_chunks_total"] == 6 + 3        # 25 tokens from 16: 3 chunks, not 7
    assert m["prefix_cache_hits_total"] == 1 and m["prefix_cache_tokens_total"] == 16
    assert m["prompt_tokens_total"] == 21 + 25       # a hit still counts its whole prompt
    assert out1[0] == solo(tiny64, p1, 6, 4, "h2o", dict(budget=12))[0]
    assert out2[0] == solo(tiny64, p2, 6, 4, "h2o", dict(budget=12))[0]
    # a prompt that wants its logprobs runs every chunk (their logits are not kept)
    eng.generate([p2], SamplingParams(max_tokens=2, prompt_logprobs=1))
    assert eng.metrics()["prefill_chunks_total"] == 9 + 7
    text = prometheus_text(eng, "tiny", dict(queue_full=0, disconnects=0))
    assert "# TYPE flexkv_prefix_cache_hits_total counter" in text
    assert 'flexkv_prefix_cache_tokens_total{model="tiny"} 16' in text
    assert "# TYPE flexkv_prefix_cache_bytes gauge" in text


def test_the_memory_bound_drops_the_least_recently_used(tiny64):
    """streaming@4 in chunks of 4: every kept state holds 4 tokens, so every entry has one size."""
    V = tiny64.args.vocab_size
    eng = Engine(tiny64, None, "streaming", budget=4, n_sink=1, max_slots=1, max_new_tokens=4,
                 max_prompt_tokens=MAX_PROMPT, prefill_chunk=4, prefix_cache_memory=1)
    eng.generate([random_prompt(9, 1, V)], SamplingParams(max_tokens=1))
    assert eng.metrics()["prefix_cache_entries"] == 0  # an entry larger than the bound: not kept
    eng = Engine(tiny64, None, "streaming", budget=4, n_sink=1, max_slots=1, max_new_tokens=4,
                 max_prompt_tokens=MAX_PROMPT, prefill_chunk=4, prefix_cache_memory="1GiB")
    eng.generate([random_prompt(9, 1, V)], SamplingParams(max_tokens=1))
    m = eng.metrics()
    assert m["prefix_cache_entries"] == 2 and m["prefix_cache_bytes"] % 2 == 0
    size = m["prefix_cache_bytes"] // 2
    eng = Engine(tiny64, None, "streaming", budget=4, n_sink=1, max_slots=1, max_new_tokens=4,
                 max_prompt_tokens=MAX_PROMPT, prefill_chunk=4, prefix_cache_memory=2 * size + size // 2)
    a, b = random_prompt(9, 1, V), random_prompt(9, 2, V)
    eng.generate([a], SamplingParams(max_tokens=1))    # keeps a[:4], a[:8]
    eng.generate([b], SamplingParams(max_tokens=1))    # keeps b[:4] (a[:4] out), b[:8] (a[:8] out)
    m = eng.metrics()
    assert m["prefix_cache_entries"] == 2 and m["prefix_cache_bytes"] == 2 * size
    eng.generate([b[:4] + a[4:]], SamplingParams(max_tokens=1))   # hits b[:4]; keeps its own
    m = eng.metrics()                                             # [:8], dropping b[:8]
    assert m["prefix_cache_hits_total"] == 1 and m["prefix_cache_tokens_total"] == 4
    eng.generate([a], SamplingParams(max_tokens=1))    # a's entries are gone: no hit
    assert eng.metrics()["prefix_cache_hits_total"] == 1
    eng.generate([b[:4] + a[4:]], SamplingParams(max_tokens=1))   # a[:4], a[:8] pushed it out;
    assert eng.metrics()["prefix_cache_hits_total"] == 1          # kept again, they push a's
    eng.generate([b[:4] + a[4:8] + b[8:]], SamplingParams(max_tokens=1))   # its [:8]: 8 tokens
    m = eng.metrics()
    assert m["prefix_cache_hits_total"] == 2 and m["prefix_cache_tokens_total"] == 12
    assert m["prefix_cache_bytes"] <= 2 * size + size // 2


def test_a_kept_state_holds_only_its_prefix(tiny64):
    """`full` sized for 40-token prompts keeps a 4-token prefix's state in 4 slots per layer, not
    the slot's 50: the entries after 4, 8 and 12 tokens weigh as 4 + 8 + 12 slots (positions and
    K/V), whatever the slot capacity."""
    V = tiny64.args.vocab_size
    eng = Engine(tiny64, None, "full", max_slots=1, max_new_tokens=MAX_NEW, max_prompt_tokens=MAX_PROMPT,
                 prefill_chunk=4, prefix_cache_memory="1GiB")
    eng.generate([random_prompt(13, 1, V)], SamplingParams(max_tokens=1))
    a = tiny64.args
    per_slot = a.num_key_value_heads * (2 * a.head_dim * 8 + 8) * a.num_hidden_layers  # fp64 K, V; int64 pos
    budgets = a.num_key_value_heads * 8 * a.num_hidden_layers                          # [Hkv] int64 each
    m = eng.metrics()
    assert m["prefix_cache_entries"] == 3
    assert m["prefix_cache_bytes"] == (4 + 8 + 12) * per_slot + 3 * budgets
    assert eng.cache.layers[0].capacity == MAX_PROMPT + MAX_NEW


@pytest.mark.parametrize("kw, match", [
    (dict(prefix_cache_memory="lots"), "prefix_cache_memory must be a positive number of bytes"),
    (dict(prefix_cache_memory=0), "prefix_cache_memory must be a positive number of bytes"),
    (dict(prefix_cache_memory="1GiB", prefill_chunk=None), "prefix_cache_memory needs an int prefill_chunk"),
])
def test_bad_prefix_cache_arguments(tiny64, kw, match):
    with pytest.raises(ValueError, match=match):
        Engine(tiny64, None, "h2o", budget=8, max_slots=1, max_new_tokens=4,
               max_prompt_tokens=MAX_PROMPT, **{"prefill_chunk": 4, **kw})


def test_resume_at_needs_a_chunk_boundary(tiny64):
    policy = make_policy("full")
    cache = policy.build_cache(tiny64, 1, 10, 1)
    run = Prefill(tiny64, cache, policy, torch.zeros(1, 10, dtype=torch.long), torch.arange(10)[None], 4, 1)
    for bad in (0, 3, 10, 12):
        with pytest.raises(ValueError, match="multiple of the chunk"):
            run.resume_at(bad)
    run.resume_at(8)
    with pytest.raises(ValueError, match="before the first chunk"):
        run.resume_at(4)
