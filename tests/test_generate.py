"""`flexkv.generate` with the `full` policy on tiny random models: greedy equals transformers'
greedy `generate`; chunked prefill equals one-shot; the compiled decode step equals the eager one
with zero recompiles; left padding; sampling; stop tokens."""
from __future__ import annotations

import importlib

import pytest
import torch

import flexkv
from helpers import assert_same_cache, decode_graphs, hf_greedy, hf_model, make_checkpoint, random_ids

V = 101  # helpers.TINY vocab
WINDOW = 8


@pytest.fixture(scope="module")
def tiny_mistral_dir(tmp_path_factory):
    """Mistral with a sliding window (8) far shorter than prompt + new tokens."""
    return make_checkpoint(tmp_path_factory.mktemp("tiny-mistral"), "mistral", seed=1,
                           sliding_window=WINDOW, num_key_value_heads=1, rope_theta=1e6)


@pytest.fixture(scope="module")
def tiny_mistral(tiny_mistral_dir):
    model, _ = flexkv.load_model(tiny_mistral_dir)
    assert model.args.sliding_window == WINDOW
    return model


@pytest.fixture(params=["llama", "mistral"])
def model_and_dir(request):
    if request.param == "llama":
        return request.getfixturevalue("tiny_llama"), request.getfixturevalue("tiny_llama_dir")
    return request.getfixturevalue("tiny_mistral"), request.getfixturevalue("tiny_mistral_dir")


def _greedy(model, ids, n, **kw):
    return flexkv.generate(model, ids, max_new_tokens=n, policy="full", **kw)


# --------------------------------------------------------------------------- vs transformers
@pytest.mark.parametrize("which", ["llama", "mistral"])
def test_full_greedy_equals_transformers(which, request):
    if which == "llama":
        model, path = request.getfixturevalue("tiny_llama"), request.getfixturevalue("tiny_llama_dir")
        ids = random_ids(2, 21, V, seed=11)
    else:
        model, path = request.getfixturevalue("tiny_mistral"), request.getfixturevalue("tiny_mistral_dir")
        ids = random_ids(2, 13, V, seed=12)  # 13 + 40 tokens >> window 8
    n = 40
    ref = hf_greedy(hf_model(path), ids, n)
    out = _greedy(model, ids, n)
    assert out.tokens.shape == (2, ids.shape[1] + n) and out.new_tokens == n and out.prompt_len == ids.shape[1]
    assert torch.equal(out.tokens, ref), (out.tokens[:, ids.shape[1]:], ref[:, ids.shape[1]:])
    # the random model does not just repeat one token (the comparison has teeth)
    assert len(set(out.tokens[0, ids.shape[1]:].tolist())) > 5
    # full keeps every position that went through the model (the last sampled token never did)
    for lc in out.cache.layers:
        assert torch.equal(lc.retained(), torch.full_like(lc.retained(), ids.shape[1] + n - 1))


def test_1d_prompt_is_a_batch_of_one(tiny_llama):
    ids = random_ids(1, 9, V, seed=13)
    a = _greedy(tiny_llama, ids[0], 8).tokens
    b = _greedy(tiny_llama, ids, 8).tokens
    assert torch.equal(a.reshape(b.shape), b)


# --------------------------------------------------------------------------- chunked prefill
@pytest.mark.parametrize("chunk", [1, 4, 7, 64])  # T = 23: 4 and 7 do not divide it, 64 > T
def test_chunked_prefill_equals_one_shot(model_and_dir, chunk):
    model, _ = model_and_dir
    ids = random_ids(2, 23, V, seed=21)
    n = 12
    one = _greedy(model, ids, n)
    chunked = _greedy(model, ids, n, prefill_chunk=chunk)
    assert torch.equal(chunked.tokens, one.tokens)
    assert_same_cache(chunked.cache, one.cache)
    # `full` fills slots in order, so here even the sorted-by-pos layout matches slot for slot
    for a, b in zip(chunked.cache.layers, one.cache.layers):
        assert torch.equal(a.pos.sort(-1).values, b.pos.sort(-1).values)


def test_prefill_runs_the_last_layers_mlp_on_the_last_position_only(tiny_llama):
    """Only the last position's logits leave a prefill chunk: the last layer's o_proj and MLP
    see that one token (every other layer, and every cache, the whole chunk), and the logits are
    those of the plain forward's last position."""
    from flexkv.generate import prefill
    from flexkv.policies import make_policy

    ids = random_ids(2, 11, V, seed=5)
    pos = torch.arange(11).expand(2, 11)
    seen = []
    hooks = [layer.mlp.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
             for layer in tiny_llama.layers]
    try:
        pol = make_policy("full")
        cache = pol.build_cache(tiny_llama, 2, 11, 0)
        with torch.no_grad():
            last = prefill(tiny_llama, cache, pol, ids, pos)
            plain = tiny_llama(ids)[:, -1]
    finally:
        for h in hooks:
            h.remove()
    L = len(tiny_llama.layers)
    assert seen[:L] == [11] * (L - 1) + [1]
    assert all(lc.retained().eq(11).all() for lc in cache.layers)
    torch.testing.assert_close(last, plain, atol=1e-5, rtol=0)  # fp32


# --------------------------------------------------------------------------- compiled decode
def test_decode_compile_options(monkeypatch):
    """What the decode step compiles with: CUDA graphs and coordinate-descent tuning (batch-1
    matmuls as tuned reductions, gpt-fast's setting) on CUDA only, `reorder_for_locality` off
    everywhere; FLEXKV_COORDINATE_DESCENT=0's switch turns the tuning off, and the cached compiled
    step follows it."""
    gen = importlib.import_module("flexkv.generate")  # `flexkv.generate` is also a function

    cpu, cuda = gen.decode_compile_options("cpu"), gen.decode_compile_options("cuda")
    assert cuda["triton.cudagraphs"] and cuda["coordinate_descent_tuning"] is True
    assert not cpu.get("triton.cudagraphs") and "coordinate_descent_tuning" not in cpu
    assert cpu["reorder_for_locality"] is False and cuda["reorder_for_locality"] is False
    tuned = gen.compiled_decode("cuda")
    monkeypatch.setattr(gen, "COORDINATE_DESCENT", False)
    assert "coordinate_descent_tuning" not in gen.decode_compile_options("cuda")
    assert gen.decode_compile_options("cuda")["triton.cudagraphs"]
    assert gen.compiled_decode("cuda") is not tuned
    monkeypatch.setattr(gen, "COORDINATE_DESCENT", True)
    assert gen.compiled_decode("cuda") is tuned


@pytest.mark.slow
def test_compiled_decode_equals_eager_without_recompiles(tiny_llama):
    """The only `compile=True` test: tiny model, batch 2, 60 tokens; the compiled decode step is
    one graph with no graph break, and a second call (new prompt, same shapes, new cache and
    policy object) reuses it."""
    from torch._dynamo.utils import counters

    n = 60
    ids1, ids2 = random_ids(2, 10, V, seed=31), random_ids(2, 10, V, seed=32)
    eager1 = _greedy(tiny_llama, ids1, n).tokens
    eager2 = _greedy(tiny_llama, ids2, n).tokens
    assert not torch.equal(eager1, eager2)

    torch._dynamo.reset()
    counters.clear()
    # Eager FlexAttention (the prefill on CPU) runs through torch's own internal
    # `torch.compile(backend="eager")` wrapper, which dynamo counts as a graph too: warm it up
    # at the same shapes first, so the count below is the compiled decode step's alone.
    _greedy(tiny_llama, ids1, 2)
    base = counters["stats"]["unique_graphs"]

    out1 = _greedy(tiny_llama, ids1, n, compile=True)
    assert torch.equal(out1.tokens, eager1)
    assert counters["stats"]["unique_graphs"] == base + 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert decode_graphs() == 1

    out2 = _greedy(tiny_llama, ids2, n, compile=True)
    assert torch.equal(out2.tokens, eager2)
    assert counters["stats"]["unique_graphs"] == base + 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert decode_graphs() == 1


# --------------------------------------------------------------------------- left padding
def test_left_padded_batch_equals_rows_alone(model_and_dir):
    model, _ = model_and_dir
    lens = [5, 14, 9, 1]
    T, n = max(lens), 20
    rows = [random_ids(1, L, V, seed=40 + i) for i, L in enumerate(lens)]
    ids = torch.zeros(len(lens), T, dtype=torch.long)
    mask = torch.zeros(len(lens), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - r.shape[1]:] = r[0]
        mask[i, T - r.shape[1]:] = 1
    batch = _greedy(model, ids, n, attention_mask=mask)
    assert batch.tokens.shape == (len(lens), T + n)
    assert torch.equal(batch.tokens[:, :T], ids)
    for i, r in enumerate(rows):
        alone = _greedy(model, r, n)
        assert torch.equal(batch.tokens[i, T:], alone.tokens[0, r.shape[1]:]), f"row {i} (len {lens[i]})"


def test_all_ones_mask_equals_no_mask(tiny_llama):
    ids = random_ids(2, 11, V, seed=45)
    a = _greedy(tiny_llama, ids, 10).tokens
    b = _greedy(tiny_llama, ids, 10, attention_mask=torch.ones_like(ids)).tokens
    assert torch.equal(a, b)


@pytest.mark.parametrize("policy, chunk", [("full", None), ("h2o", 5), ("snapkv", None)])
def test_generate_under_inference_mode(tiny_llama, policy, chunk):
    """`torch.inference_mode()` around `generate` (as many callers wrap inference) changes
    nothing: its tensors have no version counter, which the prefill's range check once read."""
    ids = random_ids(2, 40, V, seed=46)
    kw = dict(policy=policy, budget=None if policy == "full" else 34, prefill_chunk=chunk)
    ref = flexkv.generate(tiny_llama, ids, max_new_tokens=6, **kw)
    with torch.inference_mode():
        out = flexkv.generate(tiny_llama, ids, max_new_tokens=6, **kw)
    assert torch.equal(out.tokens, ref.tokens)


def test_eager_generate_returns_normal_tensors(tiny_llama):
    """The eager loop runs under inference mode, yet the tokens and logits it returns can go
    into autograd (an inference tensor cannot be saved for backward); the cache is inference."""
    ids = random_ids(1, 12, V, seed=47)
    out = flexkv.generate(tiny_llama, ids, max_new_tokens=4, output_logits=True)
    assert not out.tokens.is_inference() and not out.logits.is_inference()
    assert out.cache.layers[0].k.is_inference()
    w = torch.ones(V, requires_grad=True)
    (tiny_llama.model.embed_tokens(out.tokens).sum() + (out.logits * w).sum()).backward()
    assert w.grad is not None


# --------------------------------------------------------------------------- sampling
PROMPT_SEED, N_SAMPLE = 50, 40


@pytest.fixture(scope="module")
def sample_prompt():
    return random_ids(2, 8, V, seed=PROMPT_SEED)


def _sample(model, ids, seed, **kw):
    g = torch.Generator().manual_seed(seed)
    return flexkv.generate(model, ids, max_new_tokens=N_SAMPLE, policy="full", generator=g,
                           **kw).tokens


def test_sampling_same_seed_same_tokens(tiny_llama, sample_prompt):
    a = _sample(tiny_llama, sample_prompt, 1, temperature=1.0)
    b = _sample(tiny_llama, sample_prompt, 1, temperature=1.0)
    assert torch.equal(a, b)
    c = _sample(tiny_llama, sample_prompt, 2, temperature=1.0)
    T = sample_prompt.shape[1]
    # 80 sampled tokens at temperature 1 over a spread-out distribution: two seeds agreeing on
    # all of them is (fixed seeds aside) astronomically unlikely
    assert not torch.equal(a[:, T:], c[:, T:])
    greedy = _greedy(tiny_llama, sample_prompt, N_SAMPLE).tokens
    assert not torch.equal(a, greedy)


@pytest.mark.parametrize("kw", [dict(temperature=1.0, top_k=1), dict(temperature=1.0, top_p=1e-6),
                                dict(temperature=0.7, top_k=1, top_p=0.5)],
                         ids=["top_k=1", "top_p=1e-6", "top_k=1+top_p"])
def test_degenerate_sampling_equals_greedy(tiny_llama, sample_prompt, kw):
    greedy = _greedy(tiny_llama, sample_prompt, N_SAMPLE).tokens
    assert torch.equal(_sample(tiny_llama, sample_prompt, 3, **kw), greedy)


def _step_logits(model, tokens, T):
    """Teacher-forced logits that produced tokens[:, T:]: [B, N, V]."""
    with torch.no_grad():
        return model(tokens[:, :-1])[:, T - 1:]


def test_top_k_samples_within_top_k(tiny_llama, sample_prompt):
    T, k = sample_prompt.shape[1], 3
    toks = _sample(tiny_llama, sample_prompt, 4, temperature=2.0, top_k=k)
    logits = _step_logits(tiny_llama, toks, T)
    rank = (logits > logits.gather(-1, toks[:, T:, None])).sum(-1)  # 0 = the argmax
    assert int(rank.max()) < k
    assert int(rank.max()) > 0  # at temperature 2 it does not always take the argmax


def test_top_p_samples_within_nucleus(tiny_llama, sample_prompt):
    T, p = sample_prompt.shape[1], 0.5
    toks = _sample(tiny_llama, sample_prompt, 5, temperature=1.0, top_p=p)
    probs = _step_logits(tiny_llama, toks, T).softmax(-1)
    chosen = probs.gather(-1, toks[:, T:, None])
    # mass strictly above the chosen token is < p (it belongs to the smallest prefix reaching p)
    above = (probs * (probs > chosen)).sum(-1)
    assert float(above.max()) < p + 1e-5


# --------------------------------------------------------------------------- stop tokens
def test_eos_stops_and_pads(tiny_llama):
    ids = random_ids(2, 12, V, seed=60)
    T, n = ids.shape[1], 48
    greedy = _greedy(tiny_llama, ids, n).tokens
    gen0 = greedy[0, T:].tolist()
    eos = gen0[5]
    out = _greedy(tiny_llama, ids, n, eos_token_id=eos).tokens
    for row in range(2):
        g = greedy[row, T:].tolist()
        stop = g.index(eos) if eos in g else None
        got = out[row, T:].tolist()
        if stop is None:
            assert got == g[:len(got)]
        else:
            assert got[:stop + 1] == g[:stop + 1], f"row {row}"
            assert all(t == eos for t in got[stop + 1:]), f"row {row}: tokens after eos are not eos"
    assert out.shape[0] == 2 and out.shape[1] <= T + n


def test_all_rows_stop_early(tiny_llama):
    ids = random_ids(2, 12, V, seed=61)
    T, n = ids.shape[1], 64
    greedy = _greedy(tiny_llama, ids, n).tokens
    k = 3
    eos = sorted({int(greedy[0, T + k]), int(greedy[1, T + k])})  # both rows stop by step k
    out = flexkv.generate(tiny_llama, ids, max_new_tokens=n, policy="full", eos_token_id=eos)
    toks = out.tokens
    assert toks.shape[1] < T + n, "generation did not stop once every row had emitted eos"
    assert out.new_tokens == toks.shape[1] - T
    for row in range(2):
        g = greedy[row, T:].tolist()
        stop = min(g.index(e) for e in eos if e in g)
        assert stop <= k
        got = toks[row, T:].tolist()
        assert got[:stop + 1] == g[:stop + 1], f"row {row}"
        assert all(t in eos for t in got[stop + 1:]), f"row {row}: tokens after eos are not eos"


def test_eos_at_first_token(tiny_llama):
    ids = random_ids(1, 7, V, seed=62)
    first = int(_greedy(tiny_llama, ids, 1).tokens[0, -1])
    out = flexkv.generate(tiny_llama, ids, max_new_tokens=40, policy="full", eos_token_id=first)
    assert out.tokens.shape[1] < 7 + 40
    assert (out.tokens[0, 7:] == first).all()
