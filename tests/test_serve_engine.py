"""The serving engine (flexkv.serve.Engine) against `flexkv.generate` run alone per request.

- Equivalence (hypothesis, every policy and parameter variant of tests/policy_cases.py, float64
  tiny model, exact): requests of different lengths arrive at different scheduler steps, share
  1-3 slots, are prefilled in chunks between decode steps, some are cancelled; each finished
  request's greedy tokens equal its solo `flexkv.generate` run, and after every step the kept
  positions of its slot equal those of the solo run at the same point; a cancelled request's
  tokens are a prefix of its solo run. Budgets are drawn both below and above the prompts, so
  eviction may start mid-decode.
- Isolation: a seeded sampled request gives the same tokens alone and in a busy batch; a
  reused slot behaves as a fresh engine; idle rows write nothing and no NaN reaches the cache; a
  row without a free slot never overwrites a kept token.
- Zero recompiles (one dynamo cache entry, no graph breaks) while 20+ requests come and go;
  the compiled step compiled and run in the engine's own thread (`start()`, as servers run it).
- Sizing (`kv_memory`), validation, the bounded queue, async iteration and cancellation.
"""
from __future__ import annotations

import asyncio
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flexkv
from flexkv.cache import LayerCache
from flexkv.generate import prefill_one_chunk
from flexkv.policies import H2O
from flexkv.serve import Engine, QueueFull, SamplingParams
from helpers import decode_graphs
from policy_cases import CASES

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # many small eager steps of a tiny model

SETTINGS = settings(max_examples=5, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large])
MAX_NEW, MAX_PROMPT = 10, 40


@pytest.fixture(scope="module")
def tiny64(tiny_llama_dir):
    model, _ = flexkv.load_model(tiny_llama_dir, dtype=torch.float64)
    return model


def pos_sets(cache, row):
    return [[frozenset(p for p in lc.pos[row, g].tolist() if p >= 0) for g in range(lc.pos.shape[1])]
            for lc in cache.layers]


def solo(model, prompt, max_tokens, chunk, policy, kw):
    snaps = []
    out = flexkv.generate(model, torch.tensor([prompt]), max_new_tokens=max_tokens, policy=policy,
                          prefill_chunk=chunk, cache_callback=lambda c: snaps.append(pos_sets(c, 0)),
                          **kw)
    return out.tokens[0, len(prompt):].tolist(), snaps


@st.composite
def schedule(draw, name):
    T_ref = draw(st.integers(8, 30))
    kw = CASES[name](draw, T_ref) if name in CASES else {}
    n = draw(st.integers(2, 5))
    reqs = []
    for _ in range(n):
        T = draw(st.integers(2, MAX_PROMPT))
        reqs.append(dict(T=T, max_tokens=draw(st.integers(1, MAX_NEW)), at=draw(st.integers(0, 8)),
                         seed=draw(st.integers(0, 2**16)),
                         cancel_at=draw(st.one_of(st.none(), st.integers(0, 12)))))
    slots = draw(st.integers(1, 3))
    padded = draw(st.booleans())   # the compiled prefill's chunks (run eagerly here)
    chunk = draw(st.integers(1, 12) if padded else st.one_of(st.none(), st.integers(1, 12)))
    return kw, reqs, slots, chunk, padded


def random_prompt(T, seed, vocab):
    return torch.randint(0, vocab, (T,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("name", sorted(CASES) + ["full"])
@SETTINGS
@given(data=st.data())
def test_engine_equals_solo_generate(tiny64, name, data):
    """`padded`: the engine as `compile_prefill=True` runs it (every chunk `chunk` tokens, the last
    one left-padded with position -1), the chunk function eager, so the tokens stay exact."""
    kw, reqs, slots, chunk, padded = data.draw(schedule(name))
    V = tiny64.args.vocab_size
    with mock.patch("flexkv.serve.engine.compiled_prefill", lambda: prefill_one_chunk):
        eng = Engine(tiny64, None, name, max_slots=slots, max_new_tokens=MAX_NEW,
                     max_prompt_tokens=MAX_PROMPT, prefill_chunk=chunk, compile_prefill=padded, **kw)
    prompts = [random_prompt(r["T"], r["seed"], V) for r in reqs]
    want = [solo(tiny64, p, r["max_tokens"], chunk, name, kw) for p, r in zip(prompts, reqs)]
    handles = [None] * len(reqs)
    step = 0
    while step < 200 and (any(h is None for h in handles) or eng.has_work()):
        for i, r in enumerate(reqs):
            if handles[i] is None and r["at"] == step:
                handles[i] = eng.submit(prompts[i], SamplingParams(max_tokens=r["max_tokens"]))
            if handles[i] is not None and r["cancel_at"] == step:
                handles[i].cancel()
        eng.step()
        for slot in eng._decoding:  # the slot's kept positions == the solo run's at this point
            h = eng._slots[slot].handle
            i = next(j for j, x in enumerate(handles) if x is h)
            assert pos_sets(eng.cache, slot) == want[i][1][len(h.tokens) - 1], \
                f"{name} {kw}: request {i} kept positions differ after {len(h.tokens)} tokens"
        step += 1
    assert not eng.has_work()
    for i, (h, (tokens, _)) in enumerate(zip(handles, want)):
        if h.finish_reason == "cancelled":
            assert h.tokens == tokens[:len(h.tokens)], f"{name}: cancelled request {i}"
        else:
            assert h.finish_reason == "length"
            assert h.tokens == tokens, f"{name} {kw}: request {i} {reqs[i]} differs from solo"
    m = eng.metrics()
    assert m["slots_used"] == 0 and m["running"] == 0 and m["waiting"] == 0
    for lc in eng.cache.layers:  # every slot freed and cleared
        assert (lc.pos == -1).all()


def test_seeded_sampling_is_batch_independent(tiny64):
    V = tiny64.args.vocab_size
    target = random_prompt(12, 1, V)
    sp = SamplingParams(max_tokens=8, temperature=0.9, top_k=20, top_p=0.9, seed=1234)
    alone = Engine(tiny64, None, "h2o", budget=6, max_slots=1, max_new_tokens=8,
                   max_prompt_tokens=32).generate([target], sp)[0]
    busy = Engine(tiny64, None, "h2o", budget=6, max_slots=3, max_new_tokens=8, max_prompt_tokens=32)
    others = [random_prompt(n, n, V) for n in (20, 5, 30)]
    outs = busy.generate(others[:2] + [target] + others[2:],
                         [SamplingParams(max_tokens=8, temperature=1.0, seed=s) for s in (1, 2)]
                         + [sp] + [SamplingParams(max_tokens=3)])
    assert outs[2] == alone
    # every request, sampled or greedy, equals its run alone; the greedy one (4th) takes the slot
    # a sampled request left, and the sampled ones run beside it (the engine samples only the
    # slots with temperature > 0 and takes the argmax for the others)
    params = [SamplingParams(max_tokens=8, temperature=1.0, seed=s) for s in (1, 2)] + [
        SamplingParams(max_tokens=3)]
    for prompt, p, got in zip(others, params, outs[:2] + outs[3:]):
        one = Engine(tiny64, None, "h2o", budget=6, max_slots=1, max_new_tokens=8, max_prompt_tokens=32)
        assert one.generate([prompt], p)[0] == got
    other_seed = Engine(tiny64, None, "h2o", budget=6, max_slots=1, max_new_tokens=8,
                        max_prompt_tokens=32).generate([target], SamplingParams(
                            max_tokens=8, temperature=0.9, top_k=20, top_p=0.9, seed=99))[0]
    assert other_seed != alone  # (8 draws over a 20-token support: equal by chance ~never)


def test_metrics_count_chunks_steps_and_the_time_in_each(tiny64):
    """The scheduler's counters: one prefill chunk per `prefill_chunk` tokens of each prompt, one
    decode step per token after the first, and the wall seconds in each phase (which the serving
    benchmark divides into ms per chunk / per step and the engine's busy share)."""
    import time
    V = tiny64.args.vocab_size
    eng = Engine(tiny64, None, "h2o", budget=6, max_slots=2, max_new_tokens=5, max_prompt_tokens=40,
                 prefill_chunk=8)
    m0 = eng.metrics()
    assert m0["prefill_seconds_total"] == m0["decode_seconds_total"] == 0.0
    t = time.perf_counter()
    outs = eng.generate([random_prompt(20, 1, V), random_prompt(9, 2, V)],
                        SamplingParams(max_tokens=5, ignore_eos=True))
    wall = time.perf_counter() - t
    m = eng.metrics()
    assert [len(o) for o in outs] == [5, 5]
    assert m["prefill_chunks_total"] == 3 + 2                   # ceil(20 / 8) + ceil(9 / 8)
    assert m["prompt_tokens_total"] == 29 and m["tokens_generated_total"] == 10
    # the second prompt's chunks run between the first request's decode steps; each request's
    # first token comes from its prefill, the other 4 from decode steps shared while both run
    assert 4 <= m["decode_steps_total"] <= 8
    assert m["prefill_seconds_total"] > 0 and m["decode_seconds_total"] > 0
    assert m["prefill_seconds_total"] + m["decode_seconds_total"] <= wall


def test_reused_slot_is_fresh_and_finishing_does_not_disturb_others(tiny64):
    V = tiny64.args.vocab_size
    prompts = [random_prompt(n, n + 7, V) for n in (9, 25, 14, 31)]
    params = [SamplingParams(max_tokens=m) for m in (2, 10, 3, 10)]
    kw = dict(budget=8, n_sink=2)
    fresh = [Engine(tiny64, None, "streaming", max_slots=1, max_new_tokens=10, max_prompt_tokens=40,
                    **kw).generate([p], sp)[0] for p, sp in zip(prompts, params)]
    eng = Engine(tiny64, None, "streaming", max_slots=2, max_new_tokens=10, max_prompt_tokens=40, **kw)
    assert eng.generate(prompts, params) == fresh  # short requests finish and their slots are reused


def test_idle_rows_change_nothing_and_no_nan(tiny64):
    """One busy row, one idle (empty) row, through the compiled-unit function directly."""
    from flexkv.generate import decode_one_token

    pol = H2O(budget=6)
    cache = pol.build_cache(tiny64, 2, 10, 4, capacities=[7, 7])
    cache.clear_rows(slice(None))
    eng = Engine(tiny64, None, "h2o", budget=6, max_slots=1, max_new_tokens=4, max_prompt_tokens=10)
    h = eng.submit(random_prompt(10, 3, tiny64.args.vocab_size), SamplingParams(max_tokens=4))
    while eng._prefilling or not eng._decoding:
        eng.step()
    cache.copy_row(eng.cache, 0, 0)
    before = {n: b.clone() for n, b in cache.named_buffers()}
    tok, pos = torch.tensor([[5], [7]]), torch.tensor([[10], [3]])
    active = torch.tensor([True, False])
    logits = decode_one_token(tiny64, cache, pol, tok, pos, active)
    assert torch.isfinite(logits).all()
    for n, b in cache.named_buffers():
        assert torch.isfinite(b.double()).all(), n
        assert torch.equal(b[1], before[n][1]), f"idle row changed {n}"
    assert any(not torch.equal(b[0], before[n][0]) for n, b in cache.named_buffers())
    h.cancel()


def test_full_row_never_overwrites_a_kept_token():
    lc = LayerCache(1, 1, 3, 2, dtype=torch.float64, device="cpu")
    lc.load(torch.ones(1, 1, 3, 2, dtype=torch.float64), torch.ones(1, 1, 3, 2, dtype=torch.float64),
            torch.tensor([[[0, 1, 2]]]))
    slot, has_free = lc.free_slot()
    assert not has_free.any()
    lc.write(slot, torch.zeros(1, 1, 1, 2, dtype=torch.float64), torch.zeros(1, 1, 1, 2, dtype=torch.float64),
             torch.tensor([[3]]), when=has_free)
    assert lc.pos.tolist() == [[[0, 1, 2]]] and (lc.k == 1).all() and (lc.v == 1).all()


@pytest.mark.slow
def test_zero_recompiles_while_requests_come_and_go(tiny_llama):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    V = tiny_llama.args.vocab_size
    eng = Engine(tiny_llama, None, "h2o", budget=8, max_slots=3, max_new_tokens=6, max_prompt_tokens=24,
                 prefill_chunk=8, compile=True)
    handles = []
    for i in range(22):  # arrivals spread over the steps; different sampling settings each
        handles.append(eng.submit(random_prompt(3 + i, i, V), SamplingParams(
            max_tokens=1 + i % 6, temperature=[0.0, 0.7, 1.3][i % 3], top_k=i % 4, top_p=[1.0, 0.8][i % 2],
            seed=i)))
        if i % 3 == 2:
            handles[i - 1].cancel()
        for _ in range(2):
            eng.step()
    while eng.has_work():
        eng.step()
    assert all(h.finished for h in handles)
    assert decode_graphs() == 1
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.slow
@pytest.mark.skipif(torch.version.cuda is not None and not torch.cuda.is_available(),
                    reason="a CUDA build of torch on a machine without a GPU segfaults compiling in "
                           "a second Python thread (bench/GPU.md; seen with torch 2.11)")
def test_compiled_decode_in_the_engine_thread(tiny64):
    """A server's engine compiles its decode step in its own thread (`start()`, as `flexkv serve
    --compile` runs it): the answers equal the eager engine's, from one graph."""
    V = tiny64.args.vocab_size
    prompts = [random_prompt(5 + 6 * i, 50 + i, V) for i in range(3)]
    params = [SamplingParams(max_tokens=4 + i) for i in range(3)]
    common = dict(budget=8, max_slots=2, max_new_tokens=MAX_NEW, max_prompt_tokens=MAX_PROMPT,
                  prefill_chunk=8)
    want = Engine(tiny64, None, "h2o", **common).generate(prompts, params)
    torch._dynamo.reset()
    eng = Engine(tiny64, None, "h2o", compile=True, **common).start()
    try:
        got = [h.result(timeout=600) for h in [eng.submit(p, sp) for p, sp in zip(prompts, params)]]
    finally:
        eng.shutdown()
    assert got == want
    assert decode_graphs() == 1


@pytest.mark.slow
def test_compiled_prefill_equals_eager_with_a_bounded_number_of_graphs(tiny64):
    """`compile_prefill=True`: the same greedy tokens as the eager engine, for a policy whose
    chunk reads the prompt length and decode room as well as `ChunkInfo.first` (snapkv); prompts
    of many lengths (shorter than a chunk, a multiple of it, and between) compile at most 3
    graphs (first chunk, later chunk, the prompt length made symbolic after its first change),
    and nothing breaks the graph. (Each graph costs ~15-20 s of CPU compile here, so one policy;
    h2o's compiled chunk, column sums inside the graph, is test_cuda's
    test_serving_engine_compiled_prefill, on the device compile_prefill is for.) A request with
    `prompt_logprobs` (every position's logits, the padded last chunk's padding left out) gets
    the eager engine's (to 1e-5: the compiled attention's sums differ from eager's at ~1e-7),
    at the cost of its own graphs."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    V = tiny64.args.vocab_size
    lengths = [3, 8, 11, 16, 21, 30, 37]
    prompts = [random_prompt(T, 100 + T, V) for T in lengths]
    params = [SamplingParams(max_tokens=2 + T % 5) for T in lengths]
    common = dict(max_slots=2, max_new_tokens=MAX_NEW, max_prompt_tokens=MAX_PROMPT,
                  prefill_chunk=8, budget=9, window=3)
    want = Engine(tiny64, None, "snapkv", **common).generate(prompts, params)
    before = counters["stats"]["unique_graphs"]
    got = Engine(tiny64, None, "snapkv", compile_prefill=True, **common).generate(prompts, params)
    assert got == want
    assert counters["stats"]["unique_graphs"] - before <= 3
    assert not counters["graph_break"], dict(counters["graph_break"])
    scored = SamplingParams(max_tokens=2, prompt_logprobs=1)
    handles = []
    for eng in (Engine(tiny64, None, "snapkv", **common),
                Engine(tiny64, None, "snapkv", compile_prefill=True, **common)):
        handles.append(eng.submit(prompts[4], scored))
        while eng.has_work():
            eng.step()
    want, got = handles
    assert got.tokens == want.tokens and len(got.prompt_logprobs) == lengths[4]
    for a, b in zip(got.prompt_logprobs[1:], want.prompt_logprobs[1:]):
        assert a[0] == pytest.approx(b[0], abs=1e-5) and [i for i, _ in a[1]] == [i for i, _ in b[1]]


@pytest.mark.parametrize("name, kw", [("adakv", dict(budget=10, window=2)),
                                      ("pyramidkv", dict(budget=10, window=2)),
                                      ("h2o", dict(budget=8)), ("full", {})])
def test_slot_capacities_hold_the_longest_request(tiny64, name, kw):
    """The engine's per-layer slots are at least what a solo run of the longest prompt uses
    (adakv's capacity depends on the KV-head count: the shape is bound before sizing)."""
    eng = Engine(tiny64, None, name, max_slots=1, max_new_tokens=8, max_prompt_tokens=40, **kw)
    solo = flexkv.policies.make_policy(name, **kw).build_cache(tiny64, 1, 40, 8)
    assert eng.capacities == [lc.capacity for lc in solo.layers] or name == "pyramidkv"
    assert all(e >= lc.capacity for e, lc in zip(eng.capacities, solo.layers))


def test_kv_memory_sizes_the_slots(tiny64):
    per_full = Engine(tiny64, None, "full", max_slots=1, max_new_tokens=8, max_prompt_tokens=56).slot_kv_bytes
    eng = Engine(tiny64, None, "full", kv_memory=3 * per_full + 5, max_new_tokens=8, max_prompt_tokens=56)
    assert eng.max_slots == 3 and eng.cache.layers[0].pos.shape[0] == 3
    comp = Engine(tiny64, None, "h2o", budget=8, kv_memory=3 * per_full, max_new_tokens=8,
                  max_prompt_tokens=56)
    assert comp.max_slots == 3 * per_full // comp.slot_kv_bytes > 3 * 5  # compression fits more slots
    assert comp.metrics()["kv_bytes_allocated"] == comp.max_slots * comp.slot_kv_bytes
    with pytest.raises(ValueError, match="holds no slot"):
        Engine(tiny64, None, "full", kv_memory=100, max_new_tokens=8, max_prompt_tokens=56)
    with pytest.raises(ValueError, match="kv_memory"):
        Engine(tiny64, None, "full", kv_memory="lots", max_new_tokens=8)
    assert Engine(tiny64, None, "h2o", budget=8, kv_memory="1MiB", max_new_tokens=8,
                  max_prompt_tokens=56).max_slots == 2**20 // comp.slot_kv_bytes


@pytest.mark.parametrize("kw, match", [
    (dict(max_slots=2, kv_memory="1MiB"), "not both"),
    (dict(max_slots=0), "max_slots"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=8, max_prompt_tokens=600), "max_prompt_tokens"),
    (dict(prefill_chunk=0), "prefill_chunk"),
    (dict(compile_prefill=1), "compile_prefill"),
    (dict(compile_prefill=True, prefill_chunk=None), "compile_prefill=True needs an int prefill_chunk"),
    (dict(policy="nope"), "unknown policy"),
    (dict(policy="h2o", budget=0), "budget"),
])
def test_bad_engine_arguments(tiny64, kw, match):
    kw = dict(dict(policy="full", max_new_tokens=8), **kw)
    with pytest.raises(ValueError, match=match):
        Engine(tiny64, None, **kw)


@pytest.mark.parametrize("prompt, params, match", [
    ([], SamplingParams(max_tokens=4), "at least one token"),
    ([1, 500], SamplingParams(max_tokens=4), r"\[0, 100\]"),
    (list(range(41)), SamplingParams(max_tokens=4), "max_prompt_tokens=40"),
    ([1, 2], SamplingParams(max_tokens=11), r"max_tokens must be an int in \[0, 10\]"),
    ([1, 2], SamplingParams(max_tokens=-1), "max_tokens"),
    ([1, 2], SamplingParams(max_tokens=4, temperature=-1), "temperature"),
    ([1, 2], SamplingParams(max_tokens=4, top_p=0), "top_p"),
    ([1, 2], SamplingParams(max_tokens=4, top_k=-1), "top_k"),
    ([1, 2], SamplingParams(max_tokens=4, seed=-3), "seed"),
    ([1, 2], SamplingParams(max_tokens=4, stop_token_ids=(101,)), "stop_token_ids"),
    ("hello", SamplingParams(max_tokens=4), "list of token ids"),
])
def test_bad_requests(tiny64, prompt, params, match):
    eng = Engine(tiny64, None, "full", max_slots=1, max_new_tokens=MAX_NEW, max_prompt_tokens=MAX_PROMPT)
    with pytest.raises(ValueError, match=match):
        eng.submit(prompt, params)
    assert eng.metrics()["waiting"] == 0


def test_queue_full_and_stop_tokens(tiny64):
    eng = Engine(tiny64, None, "full", max_slots=1, max_new_tokens=6, max_prompt_tokens=20, max_waiting=2)
    p = random_prompt(6, 0, tiny64.args.vocab_size)
    greedy = eng.generate([p], SamplingParams(max_tokens=6))[0]
    a, b = eng.submit(p, SamplingParams(max_tokens=6)), eng.submit(p, SamplingParams(max_tokens=6))
    with pytest.raises(QueueFull, match="max_waiting=2"):
        eng.submit(p, SamplingParams(max_tokens=2))
    a.cancel()
    b.cancel()
    eng.step()
    assert a.finish_reason == b.finish_reason == "cancelled" and eng.metrics()["waiting"] == 0
    stop = greedy[2]
    h = eng.submit(p, SamplingParams(max_tokens=6, stop_token_ids=(stop,)))
    while eng.has_work():
        eng.step()
    cut = greedy.index(stop)
    assert h.tokens == greedy[:cut] and h.finish_reason == "stop"  # the stop token is not included


def test_submit_many_queues_all_or_none(tiny64):
    """A batch is validated whole and queued under one lock: a bad prompt (named by its index)
    or a queue without room for every prompt queues nothing; a batch that fits answers each
    prompt as `generate` does."""
    V = tiny64.args.vocab_size
    eng = Engine(tiny64, None, "h2o", budget=6, max_slots=2, max_new_tokens=6, max_prompt_tokens=20,
                 max_waiting=3)
    prompts = [random_prompt(5 + i, i, V) for i in range(3)]
    sp = SamplingParams(max_tokens=5)
    want = eng.generate(prompts, sp)
    submitted = eng.metrics()["requests_submitted_total"]
    with pytest.raises(ValueError, match=r"\[0, 100\] \(prompt 1 of the 2\)"):
        eng.submit_many([prompts[0], [1, 500]], sp)
    with pytest.raises(ValueError, match=r"max_tokens.*\(prompt 0 of the 2\)"):
        eng.submit_many(prompts[:2], [SamplingParams(max_tokens=7), sp])
    with pytest.raises(ValueError, match="one SamplingParams per prompt"):
        eng.submit_many(prompts[:2], [sp])
    with pytest.raises(ValueError, match=r"4 prompts at once are more than the 3 .*max_waiting"):
        eng.submit_many(prompts + prompts[:1], sp)
    with pytest.raises(ValueError, match="at least one prompt"):
        eng.submit_many([], sp)
    first = eng.submit(prompts[0], sp)
    with pytest.raises(QueueFull, match="1 requests are already waiting and 3 more do not fit"):
        eng.submit_many(prompts, sp)
    m = eng.metrics()
    assert m["waiting"] == 1 and m["requests_submitted_total"] == submitted + 1
    handles = eng.submit_many(prompts[1:], [sp, SamplingParams(max_tokens=3)])
    while eng.has_work():
        eng.step()
    assert first.tokens == want[0] and handles[0].tokens == want[1]
    assert handles[1].tokens == want[2][:3] and handles[1].finish_reason == "length"


def test_logprobs_are_the_models_log_softmax(tiny64):
    """`SamplingParams(logprobs=k)`: each emitted token's logprob and the k most likely tokens'
    are the log-softmax of the logits `flexkv.generate` computes for that prompt alone (fp64,
    exact), greedy or sampled (raw: before temperature); requests without it get none; the stop
    token (not emitted) has no entry."""
    V = tiny64.args.vocab_size
    eng = Engine(tiny64, None, "h2o", budget=6, max_slots=3, max_new_tokens=8, max_prompt_tokens=40)
    prompts = [random_prompt(9 + 4 * i, 10 + i, V) for i in range(3)]
    params = [SamplingParams(max_tokens=6, logprobs=3),
              SamplingParams(max_tokens=5, temperature=1.3, seed=5, logprobs=0),
              SamplingParams(max_tokens=6)]
    hs = eng.submit_many(prompts, params)
    while eng.has_work():
        eng.step()
    assert hs[2].logprobs is None
    for h, p, sp in zip(hs[:2], prompts, params):
        out = flexkv.generate(tiny64, torch.tensor([p]), max_new_tokens=sp.max_tokens, policy="h2o",
                              budget=6, forced_tokens=torch.tensor([h.tokens]), output_logits=True)
        ref = torch.log_softmax(out.logits[0], dim=-1)                  # [N, V]
        assert len(h.logprobs) == len(h.tokens) == sp.max_tokens
        for i, (tok, (lp, top)) in enumerate(zip(h.tokens, h.logprobs)):
            assert lp == pytest.approx(ref[i, tok].item(), abs=1e-12)
            want = ref[i].topk(sp.logprobs)
            assert [t for t, _ in top] == want.indices.tolist()
            assert [v for _, v in top] == pytest.approx(want.values.tolist(), abs=1e-12)
        if sp.temperature == 0:
            assert all(top[0][0] == tok for tok, (_, top) in zip(h.tokens, h.logprobs))
    greedy = eng.generate([prompts[0]], SamplingParams(max_tokens=6))[0]
    h = eng.submit(prompts[0], SamplingParams(max_tokens=6, stop_token_ids=(greedy[3],), logprobs=1))
    while eng.has_work():
        eng.step()
    cut = greedy.index(greedy[3])
    assert h.tokens == greedy[:cut] and len(h.logprobs) == cut and h.finish_reason == "stop"
    with pytest.raises(ValueError, match=r"logprobs must be None or an int in \[0, 20\]"):
        eng.submit(prompts[0], SamplingParams(max_tokens=2, logprobs=21))


@pytest.mark.parametrize("policy, chunk", [("full", 4), ("h2o", None), ("h2o", 4), ("tova", 5)])
def test_prompt_logprobs_are_the_prefills(tiny64, policy, chunk):
    """`SamplingParams(prompt_logprobs=k)`: prompt token i's entry is the log-softmax, at token
    i, of the logits the prefill computed at position i - 1 (none for token 0). Unchunked, or
    with the full cache, they are the plain causal forward's (fp64, exact); chunked under a
    compressing policy, those of the policy's eager reference (flexkv.reference) run through the
    same chunks. `max_tokens=0` scores the prompt and generates nothing."""
    from flexkv.generate import Prefill
    from flexkv.policies import make_policy
    from flexkv.reference import reference_for

    V = tiny64.args.vocab_size
    budget = None if policy == "full" else 6
    eng = Engine(tiny64, None, policy, budget=budget, max_slots=2, max_new_tokens=6,
                 max_prompt_tokens=40, prefill_chunk=chunk)
    prompts = [random_prompt(13, 3, V), random_prompt(9, 4, V)]
    hs = eng.submit_many(prompts, [SamplingParams(max_tokens=3, prompt_logprobs=2),
                                   SamplingParams(max_tokens=0, prompt_logprobs=0)])
    plain = eng.submit(prompts[0], SamplingParams(max_tokens=3))
    while eng.has_work():
        eng.step()
    assert plain.prompt_logprobs is None and hs[0].tokens == plain.tokens
    assert hs[1].tokens == [] and hs[1].finish_reason == "length"
    for h, p in zip(hs, prompts):
        ids = torch.tensor([p])
        if chunk is None or policy == "full":
            logits = tiny64(ids)[0]                                    # [T, V]
        else:
            ref = reference_for(make_policy(policy, budget=budget))
            cache = ref.build_cache(tiny64, 1, len(p), h.params.max_tokens)
            parts = []
            run = Prefill(tiny64, cache, ref, ids, torch.arange(len(p))[None], chunk,
                          h.params.max_tokens, chunk_logits=lambda lg, s: parts.append(lg[0]))
            while not run.done:
                run.step()
            logits = torch.cat(parts)
        want = torch.log_softmax(logits.double(), dim=-1)
        k = h.params.prompt_logprobs
        assert h.prompt_logprobs[0] is None and len(h.prompt_logprobs) == len(p)
        for i, (lp, top) in enumerate(h.prompt_logprobs[1:], start=1):
            assert lp == pytest.approx(want[i - 1, p[i]].item(), abs=1e-10)
            t = want[i - 1].topk(k)
            assert [j for j, _ in top] == t.indices.tolist()
            assert [v for _, v in top] == pytest.approx(t.values.tolist(), abs=1e-10)
    with pytest.raises(ValueError, match=r"prompt_logprobs must be None or an int in \[0, 20\]"):
        eng.submit(prompts[0], SamplingParams(max_tokens=1, prompt_logprobs=21))


@pytest.mark.parametrize("slots", [1, 3])
def test_requests_with_one_prompt_share_its_prefill(tiny64, slots):
    """Waiting requests with the prompt being (or just) prefilled, and the same max_tokens and
    prompt_logprobs (`n` choices, best_of's candidates, repeats), take its cache row, last
    logits and prompt logprobs instead of prefilling again; a request behind them with another
    prompt starts meanwhile. Each request's tokens and prompt logprobs equal its run alone."""
    V = tiny64.args.vocab_size
    p, q = random_prompt(13, 5, V), random_prompt(11, 6, V)
    kw = dict(budget=6, max_new_tokens=6, max_prompt_tokens=40, prefill_chunk=4)
    eng = Engine(tiny64, None, "h2o", max_slots=slots, **kw)
    params = [SamplingParams(max_tokens=5, temperature=1.0, seed=s, prompt_logprobs=1) for s in range(3)]
    params += [SamplingParams(max_tokens=5, prompt_logprobs=1),
               SamplingParams(max_tokens=4, prompt_logprobs=1),
               SamplingParams(max_tokens=5, prompt_logprobs=1)]
    prompts = [p, p, p, q, p, p]      # the 5th differs in max_tokens (a policy may read it): its own
    hs = eng.submit_many(prompts, params)
    while eng.has_work():
        eng.step()
    m = eng.metrics()
    assert m["prefills_shared_total"] == 3                      # 2nd, 3rd and 6th
    assert m["prefill_chunks_total"] == 4 + 3 + 4               # p, q, p (5th): 4, 3, 4 chunks
    assert eng._shared is None                                  # nothing left waiting for it
    for h, prompt, sp in zip(hs, prompts, params):
        one = Engine(tiny64, None, "h2o", max_slots=1, **kw)
        alone = one.submit(prompt, sp)
        while one.has_work():
            one.step()
        assert h.tokens == alone.tokens and h.prompt_logprobs == alone.prompt_logprobs
    assert len({tuple(h.tokens) for h in hs[:3]}) > 1          # the seeds differ


def test_background_thread_async_iteration_and_cancel(tiny64):
    V = tiny64.args.vocab_size
    eng = Engine(tiny64, None, "h2o", budget=6, max_slots=2, max_new_tokens=10, max_prompt_tokens=40)
    prompts = [random_prompt(n, n, V) for n in (7, 19, 11)]
    want = Engine(tiny64, None, "h2o", budget=6, max_slots=2, max_new_tokens=10,
                  max_prompt_tokens=40).generate(prompts, SamplingParams(max_tokens=10))
    eng.start()
    try:
        async def consume(p):
            h = eng.submit(p, SamplingParams(max_tokens=10))
            return [t async for t in h], h.finish_reason

        async def main():
            return await asyncio.gather(*(consume(p) for p in prompts))

        got = asyncio.run(main())
        assert [t for t, _ in got] == want and all(r == "length" for _, r in got)
        assert eng.generate(prompts, SamplingParams(max_tokens=10)) == want  # with the thread running
        h = eng.submit(prompts[1], SamplingParams(max_tokens=10))
        it = iter(h)
        next(it)
        h.cancel()
        h.result(timeout=30)
        assert h.finish_reason in ("cancelled", "length")
        for _ in range(100):
            if eng.metrics()["slots_used"] == 0:
                break
            import time
            time.sleep(0.05)
        assert eng.metrics()["slots_used"] == 0
    finally:
        eng.shutdown()


def test_cuda_graph_state_in_the_engine_thread():
    """The engine's thread gets CUDA-graph trees' per-thread state before its first compiled
    step: on torch 2.11 a thread other than the one that imported `cudagraph_trees` failed an
    assertion there (pytorch/pytorch#123177). Device-free: `get_container` only builds an
    object; the CUDA run of the engine's thread is in test_cuda.py."""
    import threading

    from torch._inductor import cudagraph_trees as trees  # imported here, in the main thread

    from flexkv.generate import cuda_graph_thread_state

    got, errors = [], []

    def engine_thread():
        try:
            cuda_graph_thread_state()
            got.append(trees.get_container(0))
            cuda_graph_thread_state()  # a second call changes nothing
            got.append(trees.get_container(0))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=engine_thread)
    t.start()
    t.join()
    assert not errors, errors
    assert got[0] is got[1]
    assert trees.get_container(0) is not got[0]  # the thread's own, not the main thread's


def test_histogram_buckets_are_cumulative_and_inclusive():
    from flexkv.serve.metrics import Histogram

    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 1.0, 3.0):          # a value on a bound counts in that bucket
        h.observe(v)
    snap = h.snapshot()
    assert snap["buckets"] == [(0.1, 2), (1.0, 4), ("+Inf", 5)]
    assert snap["count"] == 5 and snap["sum"] == pytest.approx(4.65)
