"""CUDA checks (marker `cuda`; the whole module is skipped without CUDA). `bash bench/gpu.sh OUT
tests` runs them on the GPU machine:

- the models equal transformers on CUDA (fp32 logits within 1e-4; bf16 greedy agreement along
  transformers' own greedy continuation);
- compiled flex prefill equals the SDPA path (o and LSE, windows, bias, padding, cached slots);
- every `DECODE_PROBS` path equals fp64 dense attention on CUDA (fp32 and bf16), eager and
  inside a compiled `reduce-overhead` step;
- for every policy: the compiled `reduce-overhead` decode equals the eager reference (fp32:
  kept positions after each of 16 steps, tokens, logits), then across 100 steps: one dynamo
  graph (no recompiles), no graph breaks, zero CUDA-graph skips (inductor's
  `counters["inductor"]["cudagraph_skips"]`, and `triton.cudagraph_or_error` turns a skip into
  an error naming its reason where this torch has it), the step replays a CUDA graph (counted
  at `torch.cuda.CUDAGraph.replay`, which cudagraph trees call for every replay), and a second
  run of the same shapes makes no host sync (`torch.cuda.set_sync_debug_mode("error")` from its
  5th step on); the same for `tova` with `prefill_only=True`, and for a few policies with the
  step's layers as nested compile regions
  (`flexkv.models.llama.LAYER_REGIONS="on"`, which CUDA leaves off by default until this passes);
- the merging and a few evicting policies' compiled step at a budget of 1024 (kernels of many
  thread blocks) equals the eager step;
- the compiled decode step writes the cache in place: inductor's code for this device allocates
  no temporary of a layer's K/V shape (a `scatter_` write made it copy every buffer each step);
- the serving engine's step replays a CUDA graph with one dynamo graph and no skips, and its
  tokens equal `flexkv.generate` run alone on each request; its token choice (logit
  adjustments and the sampler) gives the CPU's tokens for the same logits without a host sync;
  structured output (JSON mode, a JSON Schema) with its masks on the device gives valid values;
- the speed tables' per-kernel breakdown (bench/kernel_profile.py) sees the kernels replayed
  from a CUDA graph, without a recompile or a skip.

`FLEXKV_CUDA_TESTS_ON_CPU=1` runs this module on CPU instead (a dry run of the test logic; the
CUDA-only checks are skipped); `FLEXKV_CUDA_TESTS_POLICIES=h2o,streaming` restricts the
per-policy tests (CPU compiles are slow).
"""
from __future__ import annotations

import importlib
import inspect
import json
import math
import os

import pytest
import torch
from hypothesis import find
from hypothesis import strategies as st
from torch._dynamo.utils import counters

import flexkv
from flexkv import attention
from flexkv.policies import scores
from helpers import (LLAMA3_SCALING, decode_graphs, decode_step_code, hf_greedy, hf_model,
                     kv_sized_temporaries, make_checkpoint, random_ids)
from policy_cases import CASES

if torch.cuda.is_available():
    DEVICE = "cuda"
elif os.environ.get("FLEXKV_CUDA_TESTS_ON_CPU") == "1":
    DEVICE = "cpu"
else:
    DEVICE = None
CUDA = DEVICE == "cuda"

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(DEVICE is None, reason="needs CUDA (FLEXKV_CUDA_TESTS_ON_CPU=1 "
                                                        "dry-runs the logic on CPU)")]

POLICIES = ["full"] + sorted(CASES)
if os.environ.get("FLEXKV_CUDA_TESTS_POLICIES"):
    POLICIES = [p for p in os.environ["FLEXKV_CUDA_TESTS_POLICIES"].split(",") if p]
PROMPT, BATCH = 24, 2
EQ_STEPS = 17      # states compared with the reference: after the prefill, then 16 decode steps
N_STEPS = 100      # decode steps checked for recompiles, CUDA-graph skips, replays, host syncs
SYNC_FROM = 5      # the guarded run raises on a host sync from its 5th token on (after re-record)


# ------------------------------------------------------------------------------------ helpers
class GraphReplays:
    """Counts CUDA-graph replays: cudagraph trees replay every recorded graph through
    `torch.cuda.CUDAGraph.replay` (torch/_inductor/cudagraph_trees.py, `run_graph`)."""

    def __enter__(self):
        self.n = 0
        self._orig = torch.cuda.CUDAGraph.replay
        outer = self

        def replay(graph, *args, **kwargs):
            outer.n += 1
            return outer._orig(graph, *args, **kwargs)

        torch.cuda.CUDAGraph.replay = replay
        return self

    def __exit__(self, *exc):
        torch.cuda.CUDAGraph.replay = self._orig


class SyncGuard:
    """`generate(callback=guard)`: CUDA sync debug mode "error" from the `start`-th token on, so
    any host sync in the decode loop raises. generate's own timing `torch.cuda.synchronize()`
    after the loop turns it off first (patched through `monkeypatch`)."""

    def __init__(self, monkeypatch, start: int = SYNC_FROM):
        self.i, self.start = 0, start
        self.synced_while_on = 0  # explicit synchronize() calls met while guarding
        orig = torch.cuda.synchronize

        def synchronize(*args, **kwargs):
            if torch.cuda.get_sync_debug_mode() != 0:
                self.synced_while_on += 1
            torch.cuda.set_sync_debug_mode(0)
            return orig(*args, **kwargs)

        monkeypatch.setattr(torch.cuda, "synchronize", synchronize)

    def __call__(self, tok):
        self.i += 1
        if self.i == self.start:
            torch.cuda.set_sync_debug_mode("error")

    def close(self):
        torch.cuda.set_sync_debug_mode(0)


def cudagraph_skips() -> int:
    return counters["inductor"]["cudagraph_skips"]


def cudagraph_or_error():
    """A config patch turning an inductor CUDA-graph skip into an error that names its reason
    (`triton.cudagraph_or_error`; a no-op on a torch without it or off CUDA)."""
    import contextlib

    import torch._inductor.config as icfg
    if CUDA and hasattr(icfg.triton, "cudagraph_or_error"):
        return icfg.patch({"triton.cudagraph_or_error": True})
    return contextlib.nullcontext()


def pos_sets(cache):
    """[layer][b][kv head] -> frozenset of kept positions."""
    out = []
    for lc in cache.layers:
        P = lc.pos
        out.append([[frozenset(p for p in P[b, g].tolist() if p >= 0) for g in range(P.shape[1])]
                    for b in range(P.shape[0])])
    return out


def watch_cache(model, fn):
    """generate() kwargs calling `fn(cache)` after the prefill and after every step: through
    `cache_callback` where generate has it, else `callback` reading the model's attached cache."""
    if "cache_callback" in inspect.signature(flexkv.generate).parameters:
        return {"cache_callback": fn}
    return {"callback": lambda tok: fn(model.cache)}


def policy_kw(name: str, T: int) -> dict:
    """The simplest parameters of tests/policy_cases.py with a budget of at least 8 (and a
    non-zero VAM alpha: alpha 0 is the base policy)."""
    if name == "full":
        return {}
    strat = st.composite(lambda draw: CASES[name](draw, T))()
    return find(strat, lambda kw: (kw.get("budget") is None or kw["budget"] >= 8)
                and kw.get("alpha", 1.0) != 0)


def dense_attention(q, k, v, q_pos, k_pos, window=None, bias=None):
    """fp64 dense reference. q [B,H,Tq,D], k/v [B,Hkv,N,D], q_pos [B,Tq], k_pos [B,Hkv,N].
    Returns o [B,H,Tq,D], probs [B,H,Tq,N], lse [B,H,Tq] (fp64)."""
    q, k, v = q.double(), k.double(), v.double()
    G = q.shape[1] // k.shape[1]
    k, v, kp = (x.repeat_interleave(G, dim=1) for x in (k, v, k_pos))
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        s = s + bias.double().repeat_interleave(G, dim=1)[:, :, None, :]
    ok = (kp[:, :, None, :] >= 0) & (kp[:, :, None, :] <= q_pos[:, None, :, None])
    if window is not None:
        ok &= q_pos[:, None, :, None] - kp[:, :, None, :] < window
    s = s.masked_fill(~ok, -math.inf)
    p = torch.nan_to_num(s.softmax(-1), nan=0.0)
    return p @ v, p, torch.logsumexp(s, dim=-1)


@pytest.fixture(scope="module")
def dev():
    return torch.device(DEVICE)


@pytest.fixture(scope="module")
def model32(tiny_llama_dir):
    model, _ = flexkv.load_model(tiny_llama_dir, device=DEVICE)
    return model


# ------------------------------------------------------------------------------------ models
@pytest.mark.parametrize("model_type,cfg", [
    ("llama", dict(num_key_value_heads=1, num_attention_heads=4, head_dim=64, hidden_size=64,
                   tie_word_embeddings=True, rope_theta=500000.0, rope_scaling=LLAMA3_SCALING)),
    ("llama", dict(num_key_value_heads=2, num_attention_heads=4, head_dim=32, hidden_size=96)),
    ("mistral", dict(num_key_value_heads=2, num_attention_heads=4, head_dim=32, sliding_window=7)),
], ids=["llama3-rope-tied-gqa4", "llama-gqa2", "mistral-window7"])
def test_logits_equal_transformers_fp32(tmp_path, dev, model_type, cfg):
    path = make_checkpoint(tmp_path / "ckpt", model_type, seed=11, **cfg)
    model, _ = flexkv.load_model(path, device=DEVICE)
    ref = hf_model(path).to(dev)
    ids = random_ids(2, 33, 101, seed=11).to(dev)
    with torch.no_grad():
        ours, theirs = model(ids), ref(ids).logits
    assert ours.device.type == dev.type and ours.shape == theirs.shape
    diff = (ours - theirs).abs().max().item()
    assert diff <= 1e-4, f"{model_type} {cfg}: max abs logit diff {diff:.3g} > 1e-4"


def test_bf16_greedy_agrees_with_transformers(tiny_llama_dir, dev):
    """flexkv bf16 (compiled decode) fed transformers' bf16 greedy continuation predicts the same
    next token at >= 90% of the steps, and at every step where its own top-2 margin is clear of
    bf16 rounding."""
    model, _ = flexkv.load_model(tiny_llama_dir, device=DEVICE, dtype=torch.bfloat16)
    hf = hf_model(tiny_llama_dir).to(device=dev, dtype=torch.bfloat16)
    T, N = 24, 32
    ids = random_ids(2, T, 101, seed=5).to(dev)
    theirs = hf_greedy(hf, ids, N)[:, T:]
    out = flexkv.generate(model, ids, max_new_tokens=N, compile=True, forced_tokens=theirs,
                          output_logits=True)
    logits = out.logits.float()
    pred = logits.argmax(-1)
    agree = (pred == theirs).float().mean().item()
    top2 = logits.topk(2, dim=-1).values
    margin = top2[..., 0] - top2[..., 1]
    clear = margin > max(0.5, 0.02 * logits.abs().max().item())
    assert agree >= 0.9, f"bf16 greedy agreement {agree:.2f} < 0.9"
    assert torch.equal(pred[clear], theirs[clear]), "disagreement where flexkv's margin is clear"


# ------------------------------------------------------------------------------------ attention
PREFILL_CASES = [  # B, n_kv, G, Tq, cached, D, window, bias, pad
    (1, 8, 4, 300, 0, 128, None, False, 0),
    (2, 2, 2, 77, 0, 64, 20, False, 5),
    (2, 2, 4, 33, 40, 64, None, True, 0),
    (1, 1, 1, 129, 17, 32, 50, True, 0),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compiled_flex_prefill_equals_sdpa(dev, dtype):
    """`flex_prefill_attention` (compiled FlexAttention on CUDA) equals the SDPA path and fp64
    dense attention: o, and the LSE (rows with at least one key); so do the column sums from
    that LSE."""
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for case in PREFILL_CASES:
        B, n_kv, G, Tq, cached, D, window, with_bias, pad = case
        g = torch.Generator().manual_seed(Tq)
        N = cached + Tq
        q = torch.randn(B, n_kv * G, Tq, D, generator=g)
        k, v = (torch.randn(B, n_kv, N, D, generator=g) for _ in range(2))
        q_pos = (cached + torch.arange(Tq)).expand(B, Tq).clone()
        if pad:
            q_pos[-1] = torch.where(torch.arange(Tq) < pad, -1, torch.arange(Tq) - pad)
        old = torch.randint(-1, cached, (B, n_kv, cached), generator=g) if cached else \
            torch.empty(B, n_kv, 0, dtype=torch.long)
        k_pos = torch.cat([old, q_pos[:, None, :].expand(B, n_kv, Tq)], dim=2)
        bias = torch.rand(B, n_kv, N, generator=g).log() if with_bias else None
        q, k, v = (x.to(dev, dtype) for x in (q, k, v))
        q_pos, k_pos = q_pos.to(dev), k_pos.to(dev)
        bias = None if bias is None else bias.to(dev)
        o_d = attention.dense_prefill_attention(q, k, v, q_pos, k_pos, window, False, bias)
        o_r, p_r, lse_r = dense_attention(q, k, v, q_pos, k_pos, window, bias)
        # both block masks: create_block_mask's, and the chunk structure the model's prefill uses
        # (the keys here are [cached | the chunk's tokens], as there)
        for structural in (False, True):
            o_f, lse_f = attention.flex_prefill_attention(q, k, v, q_pos, k_pos, window, True, bias,
                                                          keys_end_with_queries=structural)
            msg = f"case {case} {dtype} chunk_block_mask={structural}"
            torch.testing.assert_close(o_f.float(), o_d.float(), **tol, msg=lambda m: f"{msg}: {m}")
            torch.testing.assert_close(o_f.double(), o_r, **tol, msg=lambda m: f"{msg}: {m}")
            if lse_f is not None:
                rows = lse_r.isfinite()
                torch.testing.assert_close(lse_f.double()[rows], lse_r[rows], atol=1e-3, rtol=1e-4,
                                           msg=lambda m: f"{msg}: lse: {m}")
        if window is not None:  # two cases (one-shot with 8B's heads, a chunk with a bias):
            continue            # each is one more flex compile in a time-boxed GPU stage
        # h2o's column sums from that LSE (on CUDA: one transposed flex pass)
        cs_r = p_r.sum(dim=2).view(B, n_kv, G, N).mean(dim=2)
        cs = scores.column_sums(q, k, q_pos, k_pos, lse_f, window, bias=bias,
                                keys_end_with_queries=True)
        cs_tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.05, rtol=0.03)
        torch.testing.assert_close(cs.double(), cs_r, **cs_tol,
                                   msg=lambda m: f"case {case} {dtype}: column sums: {m}")


DECODE_CASES = [  # B, n_kv, G, S, D, window, bias
    (1, 8, 4, 4097, 128, None, False),   # Llama-3.1-8B heads, budget 4096 + 1
    (2, 2, 4, 300, 64, 50, True),
    (2, 1, 8, 33, 16, None, True),
    (1, 4, 1, 513, 128, None, False),    # one query head per KV head (MHA, Llama-2-7B)
]


def _decode_inputs(case, dtype, dev, seed=0):
    B, n_kv, G, S, D, window, with_bias = case
    g = torch.Generator().manual_seed(seed + S)
    q = torch.randn(B, n_kv * G, 1, D, generator=g)
    k, v = (torch.randn(B, n_kv, S, D, generator=g) for _ in range(2))
    k_pos = torch.randint(-1, S, (B, n_kv, S), generator=g)
    k_pos[..., 0] = S  # the new token
    q_pos = torch.full((B, 1), S)
    bias = torch.rand(B, n_kv, S, generator=g).log() if with_bias else None
    q, k, v = (x.to(dev, dtype) for x in (q, k, v))
    return q, k, v, k_pos.to(dev), q_pos.to(dev), window, None if bias is None else bias.to(dev)


def _check_decode(o, p, inputs, what):
    q, k, v, k_pos, q_pos, window, bias = inputs
    B, H, _, D = q.shape
    o_r, p_r, _ = dense_attention(q, k, v, q_pos, k_pos, window, bias)
    assert o.dtype == q.dtype and o.shape == q.shape, what
    # probabilities: fp32 accumulation over the cache's own values, so fp32-accurate even for
    # bf16 (scores rounded to bf16 would be off by ~2e-3 relative)
    rtol = 1e-5 if q.dtype == torch.float32 else 1e-4
    torch.testing.assert_close(p.double().reshape(p_r.shape), p_r, atol=1e-7, rtol=rtol,
                               msg=lambda m: f"{what}: probs: {m}")
    atol = 2e-5 if q.dtype == torch.float32 else 2e-2  # bf16: P and o rounded to bf16
    torch.testing.assert_close(o.double(), o_r, atol=atol, rtol=0,
                               msg=lambda m: f"{what}: o: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_probs_paths_on_device(dev, dtype):
    """Every `DECODE_PROBS` path (the Triton kernel included, on CUDA) equals fp64 dense
    attention, eager; bf16 probabilities within fp32 accumulation error."""
    for case in DECODE_CASES:
        inputs = _decode_inputs(case, dtype, dev)
        for name, fn in attention.DECODE_PATHS.items():
            o, p = fn(*inputs)
            _check_decode(o, p, inputs, f"{name} {case} {dtype}")


@pytest.mark.parametrize("path", attention.DECODE_PROBS_PATHS)
def test_decode_probs_paths_compiled(dev, monkeypatch, path):
    """Each path inside a step compiled as `generate` compiles it (fullgraph, reduce-overhead and
    coordinate-descent tuning on CUDA), bf16, at the 8B head shape and with one query head per
    KV head (where that tuning turns a one-row bmm into a reduction that dropped `out_dtype`):
    equal to dense attention with fp32-accurate probabilities, no CUDA-graph skip."""
    from flexkv.generate import decode_compile_options

    monkeypatch.setattr(attention, "DECODE_PROBS", path)

    def step(q, k, v, k_pos, q_pos, window, bias):
        o, p = attention.decode_attention(q, k, v, k_pos, q_pos, window, bias, need_probs=True)
        return o.clone(), p.clone()

    for case in (DECODE_CASES[0], DECODE_CASES[-1]):
        inputs = _decode_inputs(case, torch.bfloat16, dev)
        torch._dynamo.reset()
        counters.clear()
        f = torch.compile(step, fullgraph=True, options=decode_compile_options(DEVICE))
        with cudagraph_or_error():
            for _ in range(3):  # warm-up, record, replay
                o, p = f(*inputs)
                o, p = o.clone(), p.clone()
        _check_decode(o, p, inputs, f"compiled {path} {case}")
        assert cudagraph_skips() == 0, dict(counters["inductor"])


# ------------------------------------------------------------------------------------ policies
@pytest.mark.parametrize("name", POLICIES)
def test_policy_compiled_on_device(model32, dev, monkeypatch, name):
    """Compiled (reduce-overhead) decode == eager reference for 16 steps (kept positions, tokens,
    logits); across 100 steps one graph, no graph break, no CUDA-graph skip, graph replays; a
    second run of the same shapes is token-identical, replays, recompiles nothing and never
    syncs the host."""
    _check_policy_compiled(model32, dev, monkeypatch, name)


@pytest.mark.parametrize("name", [p for p in ("tova",) if p in POLICIES])
def test_policy_prefill_only_compiled_on_device(model32, dev, monkeypatch, name):
    """The same checks with `prefill_only=True` (the prompt compressed, then decode appends
    without probabilities): tova's step then has no eviction and no probabilities pass."""
    _check_policy_compiled(model32, dev, monkeypatch, name, prefill_only=True)


# torch 2.11 on CUDA (the H200 run of 2026-12-04): compiling streaming's and kvmerger's layer
# regions failed in AOT autograd's functionalisation of the nested region (`invoke_subgraph` ->
# `auto_functionalized_v2` -> "layer.key() == TransformType::Vmap INTERNAL ASSERT FAILED",
# functorch/init.cpp:288; tova's and cam's compiled, their checks then stopped at the reference,
# since fixed), so "auto" keeps regions off on CUDA. Strict: a torch that fixes it turns these into
# failures (XPASS), the signal to make "auto" mean on there too (bench/GPU.md, lease 2).
_REGIONS_BROKEN = CUDA and torch.__version__ < (2, 12)  # TorchVersion, as torch_fixes compares
_REGIONS_XFAIL = pytest.mark.xfail(_REGIONS_BROKEN, raises=RuntimeError, strict=True,
                                   reason="torch 2.11 CUDA: Vmap internal assert in a layer region")


@pytest.mark.parametrize("name", [
    pytest.param(p, marks=[_REGIONS_XFAIL] if p in ("streaming", "kvmerger") else [])
    for p in ("streaming", "tova", "cam", "kvmerger") if p in POLICIES])
def test_policy_compiled_with_layer_regions(model32, dev, monkeypatch, name):
    """The same checks with the decode step's layers as nested compile regions
    (`LAYER_REGIONS="on"`; on CUDA the default "auto" leaves them off: see `_REGIONS_BROKEN`)."""
    from flexkv.models import llama
    monkeypatch.setattr(llama, "LAYER_REGIONS", "on")
    _check_policy_compiled(model32, dev, monkeypatch, name)


# a cache where every kernel over a layer's buffers spans many thread blocks on the GPU
SCALE_MODEL = dict(num_key_value_heads=8, num_attention_heads=16, head_dim=128, hidden_size=256,
                   num_hidden_layers=1, intermediate_size=512, max_position_embeddings=2048)
SCALE_PROMPT, SCALE_BUDGET, SCALE_STEPS = 1100, 1024, 8


@pytest.fixture(scope="module")
def model_scale(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("scale"), "llama", seed=1, **SCALE_MODEL)
    return flexkv.load_model(path, device=DEVICE)[0]


@pytest.mark.parametrize("name", [p for p in ("h2o", "tova", "weightedkv", "cam", "kvmerger",
                                              "h2o+vam") if p in POLICIES])
def test_policy_compiled_at_scale(model_scale, dev, name):
    """The compiled `reduce-overhead` step at a budget of 1024 (2 rows x 8 KV heads x 1025 slots
    x 128: K and V 2.1 M entries a layer, the statistics 16 K) equals the eager step, which the
    property tests hold to the reference: kept positions after the prefill and each of 8 evicting
    steps, tokens, logits. The checks above run a tiny model, whose kernels fit one thread block;
    inductor bugs that only show across blocks would pass them (pytorch/pytorch#198270: an
    `index_put_` then an in-place update reading other positions, right on CUDA at small shapes
    and wrong at large ones)."""
    kw = policy_kw(name, SCALE_PROMPT)
    kw["budget"] = SCALE_BUDGET
    ids = random_ids(BATCH, SCALE_PROMPT, model_scale.args.vocab_size, seed=5).to(dev)
    runs = {}
    torch._dynamo.reset()
    counters.clear()
    with cudagraph_or_error():
        for compiled in (True, False):
            snaps = []
            out = flexkv.generate(model_scale, ids, max_new_tokens=SCALE_STEPS + 1, policy=name,
                                  compile=compiled, output_logits=True,
                                  **watch_cache(model_scale, lambda c: snaps.append(pos_sets(c))),
                                  **kw)
            runs[compiled] = out, snaps
    (comp, cs), (eager, es) = runs[True], runs[False]
    assert len(cs) == len(es) == SCALE_STEPS + 1
    for step, (x, y) in enumerate(zip(cs, es)):
        assert x == y, f"{name} {kw}: kept positions differ from the eager step after step {step}"
    assert all(len(h) == SCALE_BUDGET for row in es[0][0] for h in row), "the prefill kept the budget"
    assert torch.equal(comp.tokens, eager.tokens), f"{name}: tokens"
    torch.testing.assert_close(comp.logits, eager.logits, atol=1e-4, rtol=1e-4)
    assert decode_graphs() == 1 and not counters["graph_break"], name
    if CUDA:
        assert cudagraph_skips() == 0, (name, dict(counters["inductor"]))


@pytest.mark.parametrize("name, params", [("full", {}), ("h2o+vam", dict(budget=12, recent=3))])
def test_compiled_step_writes_the_cache_in_place(dev, name, params):
    """Inductor's code for the compiled decode step on this device allocates no temporary of a
    layer's K/V shape: the one-slot writes are in place (on CPU: tests/test_compiled_writes.py)."""
    assert kv_sized_temporaries(name, params, device=DEVICE) == [], name



@pytest.mark.skipif(not CUDA, reason="coordinate-descent tuning is CUDA's (decode_compile_options)")
def test_batch1_decode_projections_are_reductions_not_cublas(dev, monkeypatch):
    """At batch 1, with the decode step's coordinate-descent tuning, inductor computes every
    projection and the LM head as its own (tuned, fused) reduction: the generated code calls no
    cuBLAS matmul. With the tuning off (FLEXKV_COORDINATE_DESCENT=0) it calls cuBLAS, so the
    check sees what the option changes."""
    import re

    from flexkv.models import llama
    gen = importlib.import_module("flexkv.generate")  # `flexkv.generate` is also a function

    monkeypatch.setattr(llama, "LAYER_REGIONS", "off")  # every layer's calls in the code
    extern = re.compile(r"extern_kernels\.(?:mm|addmm|bmm)\(")
    code, _ = decode_step_code("full", {}, DEVICE, batch=1, dtype=torch.bfloat16)
    assert not extern.findall(code), extern.findall(code)
    monkeypatch.setattr(gen, "COORDINATE_DESCENT", False)
    code, _ = decode_step_code("full", {}, DEVICE, batch=1, dtype=torch.bfloat16)
    assert len(extern.findall(code)) >= 2 * 4 + 1  # per layer q/k/v, o, gate/up, down; the head

def _check_policy_compiled(model32, dev, monkeypatch, name, **extra):
    model = model32
    ids = random_ids(BATCH, PROMPT, model.args.vocab_size, seed=3).to(dev)
    kw = dict(policy_kw(name, PROMPT), **extra)
    N = N_STEPS + 1
    torch._dynamo.reset()
    counters.clear()

    snaps = []
    with GraphReplays() as r1, cudagraph_or_error():
        comp = flexkv.generate(model, ids, max_new_tokens=N, policy=name, compile=True,
                               output_logits=True,
                               **watch_cache(model, lambda c: len(snaps) < EQ_STEPS
                                             and snaps.append(pos_sets(c))), **kw)
    rsnaps = []
    ref = flexkv.generate(model, ids, max_new_tokens=EQ_STEPS, policy=name, reference=True,
                          output_logits=True,
                          **watch_cache(model, lambda c: rsnaps.append(pos_sets(c))), **kw)
    for step, (x, y) in enumerate(zip(snaps, rsnaps)):
        assert x == y, f"{name} {kw}: kept positions differ from the reference after step {step}"
    assert len(snaps) == len(rsnaps) == EQ_STEPS
    assert torch.equal(comp.tokens[:, :PROMPT + EQ_STEPS], ref.tokens), f"{name}: tokens"
    torch.testing.assert_close(comp.logits[:, :EQ_STEPS], ref.logits, atol=1e-4, rtol=1e-4)

    assert comp.new_tokens == N
    assert decode_graphs() == 1, f"{name}: recompiled ({decode_graphs()} graphs)"
    assert not counters["graph_break"], (name, dict(counters["graph_break"]))
    if CUDA:
        assert cudagraph_skips() == 0, (name, dict(counters["inductor"]))
        assert r1.n >= N_STEPS - 4, f"{name}: {r1.n} CUDA-graph replays in {N_STEPS} steps"

    # the same shapes again: no recompile, replays, no host sync in the loop
    unique = counters["stats"]["unique_graphs"]
    guard = SyncGuard(monkeypatch) if CUDA else None
    try:
        with GraphReplays() as r2:
            again = flexkv.generate(model, ids, max_new_tokens=N, policy=name, compile=True,
                                    callback=guard, **kw)
    finally:
        if guard is not None:
            guard.close()
    if guard is not None:  # only generate's own timing sync after the loop, nothing inside it
        assert guard.synced_while_on <= 1, f"{name}: synchronize() inside the decode loop"
    assert torch.equal(again.tokens, comp.tokens), f"{name}: second run differs"
    assert decode_graphs() == 1 and counters["stats"]["unique_graphs"] == unique, name
    if CUDA:
        assert cudagraph_skips() == 0, (name, dict(counters["inductor"]))
        assert r2.n >= N_STEPS - 4, f"{name}: {r2.n} CUDA-graph replays in {N_STEPS} steps"


@pytest.mark.parametrize("path", attention.DECODE_PROBS_PATHS)
def test_h2o_bf16_each_decode_probs_path(tiny_llama_dir, dev, monkeypatch, path):
    """h2o on a bf16 model with each `DECODE_PROBS` path compiled into the whole step (the Triton
    kernel inside the CUDA graph): no skip, one graph, replays, and next-token predictions along
    the explicit path's tokens agree with it at >= 90% of the steps (bf16 rounding may move an
    eviction, so not all)."""
    model, _ = flexkv.load_model(tiny_llama_dir, device=DEVICE, dtype=torch.bfloat16)
    ids = random_ids(BATCH, PROMPT, model.args.vocab_size, seed=7).to(dev)
    N = 41
    monkeypatch.setattr(attention, "DECODE_PROBS", "explicit")
    base = flexkv.generate(model, ids, max_new_tokens=N, policy="h2o", budget=12,
                           output_logits=True)
    monkeypatch.setattr(attention, "DECODE_PROBS", path)
    torch._dynamo.reset()
    counters.clear()
    with GraphReplays() as r, cudagraph_or_error():
        out = flexkv.generate(model, ids, max_new_tokens=N, policy="h2o", budget=12,
                              compile=True, forced_tokens=base.tokens[:, PROMPT:],
                              output_logits=True)
    agree = (out.logits.argmax(-1) == base.logits.argmax(-1)).float().mean().item()
    assert agree >= 0.9, f"{path}: agreement with the explicit path {agree:.2f}"
    assert decode_graphs() == 1
    if CUDA:
        assert cudagraph_skips() == 0, dict(counters["inductor"])
        assert r.n >= N - 6, f"{path}: {r.n} replays"


# ------------------------------------------------------------------------------------ serving
def _check_engine_tokens(model, dev, prompts, outs, n_new, policy="h2o", **kw):
    """Each request's greedy tokens equal its solo `flexkv.generate` run up to the end, or up to a
    step where the solo run's top-2 logit margin is below fp32 noise (a batch may round
    differently from a batch of 1)."""
    kw = kw or dict(budget=16)
    for p, got in zip(prompts, outs):
        ids = torch.tensor([p], device=dev)
        solo = flexkv.generate(model, ids, max_new_tokens=n_new, policy=policy, prefill_chunk=8,
                               output_logits=True, **kw)
        want = solo.tokens[0, len(p):].tolist()
        assert len(got) == n_new
        differ = [i for i, (a, b) in enumerate(zip(got, want)) if a != b]
        if differ:
            top2 = solo.logits[0, differ[0]].float().topk(2).values
            margin = (top2[0] - top2[1]).item()
            assert margin < 1e-3, (f"engine tokens differ from the solo run at step {differ[0]} "
                                   f"where the solo top-2 margin is {margin:.3g}")


def test_serving_engine_step_replays_a_cuda_graph(model32, dev):
    """The engine's decode step (compiled with CUDA graphs, its default on CUDA) while 3 requests
    of different lengths come and go on 2 slots: one dynamo graph, zero CUDA-graph skips, a
    replay per step, tokens equal to the solo runs. Then an engine of 3 slots run by its own
    thread (`start()`, as the server does), which compiles and records its step there: on
    torch 2.11 that thread needs `cuda_graph_thread_state` (pytorch/pytorch#123177)."""
    from flexkv import serve
    model = model32
    prompts = [random_ids(1, L, model.args.vocab_size, seed=20 + L)[0].tolist()
               for L in (20, 31, 12)]
    n_new = 40
    torch._dynamo.reset()
    params = serve.SamplingParams(max_tokens=n_new, temperature=0)
    eng = serve.Engine(model, None, policy="h2o", budget=16, max_slots=2,
                       max_new_tokens=n_new, prefill_chunk=8)
    try:
        eng.generate(prompts[:1], serve.SamplingParams(max_tokens=4, temperature=0))  # compile
        counters.clear()
        with GraphReplays() as r, cudagraph_or_error():
            outs = eng.generate(prompts, params)
    finally:
        eng.shutdown()
    if CUDA:
        assert decode_graphs() == 1, f"engine: recompiled ({decode_graphs()} graphs)"
        assert cudagraph_skips() == 0, dict(counters["inductor"])
        # 3 requests x 40 tokens on 2 slots: at least 60 decode steps, all replays
        assert r.n >= n_new * 3 // 2 - 4, f"engine: {r.n} CUDA-graph replays"
    _check_engine_tokens(model, dev, prompts, outs, n_new)

    threaded = serve.Engine(model, None, policy="h2o", budget=16, max_slots=3,
                            max_new_tokens=n_new, prefill_chunk=8)
    outs, replays = _run_in_engine_thread(threaded, prompts, params)
    if CUDA:
        assert cudagraph_skips() == 0, dict(counters["inductor"])
        assert replays >= n_new - 8, f"engine thread: {replays} CUDA-graph replays"
    _check_engine_tokens(model, dev, prompts, outs, n_new)


def _run_in_engine_thread(engine, prompts, params) -> tuple[list, int]:
    """`engine.start()` (its own thread, as the server runs it), every prompt submitted, all
    answered to the end (else the engine thread's errors); -> (tokens, CUDA-graph replays)."""
    engine.start()
    try:
        counters.clear()
        with GraphReplays() as r, cudagraph_or_error():
            handles = [engine.submit(p, params) for p in prompts]
            outs = [h.result(timeout=600) for h in handles]
    finally:
        engine.shutdown()
    assert [h.finish_reason for h in handles] == ["length"] * len(prompts), \
        [h.error for h in handles]  # the engine thread's traceback
    return outs, r.n


@pytest.mark.parametrize("name, kw", [("h2o", dict(budget=16)),
                                      ("snapkv", dict(budget=16, window=4))])
def test_serving_engine_compiled_prefill(model32, dev, name, kw):
    """`compile_prefill=True` in the engine's own thread (as the server runs it): compiled
    FlexAttention inside the compiled chunk, padded last chunks, the prompt length symbolic for
    snapkv; the tokens equal the solo runs, and the decode step still replays its CUDA graph
    with no skip (the prefill's graphs are not CUDA graphs)."""
    from flexkv import serve
    if name not in POLICIES:
        pytest.skip(f"{name} not in FLEXKV_CUDA_TESTS_POLICIES")
    model = model32
    prompts = [random_ids(1, L, model.args.vocab_size, seed=30 + L)[0].tolist()
               for L in (20, 31, 12, 8)]
    n_new = 24
    params = serve.SamplingParams(max_tokens=n_new, temperature=0)
    eng = serve.Engine(model, None, policy=name, max_slots=2, max_new_tokens=n_new,
                       prefill_chunk=8, compile_prefill=True, **kw)
    outs, replays = _run_in_engine_thread(eng, prompts, params)
    assert not counters["graph_break"], dict(counters["graph_break"])
    if CUDA:
        assert cudagraph_skips() == 0, dict(counters["inductor"])
        assert replays >= n_new * 2 - 8, f"{replays} CUDA-graph replays"
    _check_engine_tokens(model, dev, prompts, outs, n_new, policy=name, **kw)


def test_serving_engine_prefix_cache_on_device(model32, dev):
    """The prefix cache on the device, with the compiled prefill, in the engine's thread: three
    prompts share a 24-token document; the two later ones resume from its kept chunk states, and
    every request's tokens equal its solo run; the decode step replays with no skip."""
    from flexkv import serve
    model = model32
    V = model.args.vocab_size
    doc = random_ids(1, 24, V, seed=40)[0].tolist()
    prompts = [doc + random_ids(1, L, V, seed=41 + L)[0].tolist() for L in (3, 9, 5)]
    n_new = 16
    eng = serve.Engine(model, None, policy="h2o", budget=16, max_slots=2, max_new_tokens=n_new,
                       prefill_chunk=8, compile_prefill=True, prefix_cache_memory="256MiB")
    outs, replays = _run_in_engine_thread(eng, prompts, serve.SamplingParams(max_tokens=n_new,
                                                                             temperature=0))
    m = eng.metrics()
    assert m["prefix_cache_hits_total"] == 2 and m["prefix_cache_tokens_total"] == 2 * 24, m
    if CUDA:
        assert cudagraph_skips() == 0, dict(counters["inductor"])
    _check_engine_tokens(model, dev, prompts, outs, n_new)


def test_serving_engine_structured_output_on_device(tmp_path, dev):
    """JSON mode and a JSON Schema (a pattern, bounded integers, an enum) on the device, in the
    engine's thread: the masks live on the device; each answer is a valid value (a valid
    beginning where `max_tokens` cut it); the plain request beside them equals its solo run;
    the decode step replays with no skip."""
    from flexkv import serve
    from flexkv.serve.json_mode import JsonRequest
    from flexkv.serve.json_schema import JSON_OBJECT, compile_schema
    from test_serve_json import ByteTokenizer
    path = make_checkpoint(tmp_path / "bytes", "llama", seed=3, vocab_size=258, eos_token_id=256,
                           bos_token_id=257)
    model, _ = flexkv.load_model(path, device=DEVICE)
    schema = {"type": "object", "required": ["id", "n"], "properties": {
        "id": {"type": "string", "pattern": "^[a-z]{2}-\\d{2}$"},
        "n": {"type": "integer", "minimum": -3, "maximum": 250}, "ok": {"enum": [True, "x"]}}}
    n_new = 24
    push = {ord("}"): 3.0, ord('"'): 2.0, 256: 8.0}     # toward finishing values, then eos
    reqs = [(JSON_OBJECT, serve.SamplingParams(max_tokens=n_new, response_format="json_object",
                                               logit_bias=push)),
            (compile_schema(schema), serve.SamplingParams(
                max_tokens=n_new, response_format="json_schema", json_schema=schema, logit_bias=push)),
            (None, serve.SamplingParams(max_tokens=n_new, temperature=0, ignore_eos=True))]
    prompts = [random_ids(1, L, 258, seed=50 + L)[0].tolist() for L in (9, 14, 11)]
    eng = serve.Engine(model, ByteTokenizer(), policy="h2o", budget=16, max_slots=3,
                       max_new_tokens=n_new, prefill_chunk=8)
    eng.start()
    try:
        counters.clear()
        handles = [eng.submit(p, sp) for p, (_, sp) in zip(prompts, reqs)]
        outs = [h.result(timeout=600) for h in handles]
    finally:
        eng.shutdown()
    assert eng._adjust._state["allow"].device.type == torch.device(DEVICE).type
    for (grammar, _), h, out in zip(reqs[:2], handles, outs):
        req = JsonRequest(grammar)
        assert all(t < 256 for t in out) and req.advance(bytes(out)), bytes(out)
        if h.finish_reason == "stop":
            assert req.done and json.loads(bytes(out)) is not None
    if CUDA:
        assert cudagraph_skips() == 0, dict(counters["inductor"])
    _check_engine_tokens(model, dev, prompts[2:], outs[2:], n_new)


def test_token_choice_on_device_equals_cpu_without_a_host_sync(dev):
    """The engine's token choice outside the compiled step: the logit adjustments
    (`SlotAdjustments`: penalties, logit_bias, min_tokens) and the sampler (`sample_slots` with
    the engine's `candidates` hint: no cut, top-k, top-p alone) give on the device the tokens
    they give on CPU for the same logits, over 40 steps of 6 slots, and the steps after the
    first make no host sync (sync debug mode "error")."""
    from flexkv.serve import SamplingParams
    from flexkv.serve.penalties import SlotAdjustments
    from flexkv.serve.sampling import cut_hint, sample_slots
    S, V, steps = 6, 1000, 40
    params = [SamplingParams(max_tokens=64, temperature=1.0, seed=1),
              SamplingParams(max_tokens=64, temperature=0.7, top_k=20, top_p=0.9, seed=2,
                             frequency_penalty=0.5, presence_penalty=0.3),
              SamplingParams(max_tokens=64, temperature=1.2, top_k=5, seed=3, repetition_penalty=1.3,
                             logit_bias={7: 5.0, 8: -100}),
              SamplingParams(max_tokens=64, temperature=0.9, top_p=0.8, seed=4, min_tokens=10),
              SamplingParams(max_tokens=64, seed=5, logit_bias={3: 2.0}),
              SamplingParams(max_tokens=64, temperature=1.0, seed=6)]
    groups = [[0, 5], [1, 2], [3]]           # the engine's hint per group of rows
    logits = torch.randn(steps, S, V, generator=torch.Generator().manual_seed(0)) * 3

    def run(device, guard: bool):
        adj = SlotAdjustments(S, V, device)
        for s, p in enumerate(params):
            adj.admit(s, p, list(range(30 + s)), {0, 1})
        vec = lambda name, dt: torch.tensor([getattr(p, name) for p in params], dtype=dt,  # noqa: E731
                                            device=device)
        t, k, tp, seed = (vec("temperature", torch.float32), vec("top_k", torch.long),
                          vec("top_p", torch.float32), vec("seed", torch.long))
        rows = [torch.tensor(g, device=device) for g in groups]
        hints = [cut_hint([params[i] for i in g]) for g in groups]
        step = torch.zeros(S, dtype=torch.long, device=device)
        x = logits.to(device)
        out = []
        try:
            for i in range(steps):
                if guard and i == 1 and device.type == "cuda":
                    torch.cuda.set_sync_debug_mode("error")
                choose = adj.choose_logits(x[i])
                nxt = choose.argmax(dim=-1)
                for r, h in zip(rows, hints):
                    nxt[r] = sample_slots(choose[r], t[r], k[r], tp[r], seed[r], step[r], hint=h)
                adj.record(nxt)
                step += 1
                for s in range(S):
                    adj.produced(s, i + 1)
                out.append(nxt)
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode(0)
        return torch.stack(out).cpu()

    cpu = run(torch.device("cpu"), guard=False)
    got = run(dev, guard=True)
    differ = (got != cpu).sum().item()
    assert differ == 0, f"{differ} of {cpu.numel()} tokens differ between {dev} and the CPU"


def test_kernel_profile_sees_the_replayed_graphs_kernels(model32, dev):
    """bench/kernel_profile.py (the speed tables' per-kernel breakdown) on a compiled
    `reduce-overhead` decode: the profiled run recompiles nothing, skips no CUDA graph, replays,
    and CUPTI's records include the kernels replayed from the graph (several distinct ones,
    each step's attention among them). Runs in `bench/gpu.sh ... tests`, before the speed stages
    rely on it (FLEXKV_NO_PROFILE=1 turns the breakdown off there)."""
    from helpers import load_bench
    kp = load_bench("kernel_profile")
    ids = random_ids(1, PROMPT, model32.args.vocab_size, seed=5).to(dev)
    n_new = 24

    def run(callback=None):
        return flexkv.generate(model32, ids, max_new_tokens=n_new, policy="h2o", budget=16,
                               compile=True, **({"callback": callback} if callback else {}))

    torch._dynamo.reset()
    run()  # compile and record
    counters.clear()
    with GraphReplays() as r:
        b = kp.profile_decode(run, n_new, dev, skip=4, max_active=10)
    assert decode_graphs() == 1 and not counters["graph_break"]
    assert b is not None and b["steps"] == 10, b
    assert b["kernel_ms"] > 0 and b["kernels"] >= 3, b
    if CUDA:
        assert cudagraph_skips() == 0, dict(counters["inductor"])
        assert r.n >= n_new - 6, f"{r.n} CUDA-graph replays"
        assert b["source"] == "CUPTI kernels"
        assert b["classes"]["attention"] + b["classes"]["gemm"] > 0, b
        # every kernel of every step, not one record per replay: at least an attention and a
        # GEMM per layer
        assert b["launches"] >= 2 * model32.args.num_hidden_layers, b
