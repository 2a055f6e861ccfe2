"""flexkv's property suite as a kit: the guarantees flexkv checks on its own policies, for yours.

    from hypothesis import strategies as st
    from flexkv.testing import check_policy

    check_policy(MyPolicy, MyReference, budget=st.integers(1, 30))

`check_policy` draws, with hypothesis, a tiny random float64 model (`models()`: a few LLaMA shapes,
GQA or not, 1-3 layers), a prompt (`prompts()`: 8-40 tokens, batch 1-2, the second row left-padded
or not, down to 4 real tokens: rows at different fill levels), a chunking (`chunkings(T)`: one-shot
or chunks of 1..T tokens), a number of new tokens (`decode_lengths()`) and the policy's parameters
(the default budget, `budgets(T)`, lies below the shortest row's length T, so the prefill
compresses, or at or above it, so eviction starts during decode), then checks the properties
named in `properties` (all by default but "compiled"):

- "reference": the static-shape implementation (what `compile=True` compiles, run eagerly) and
  the eager reference (`reference=True`) keep the same position set per (layer, row, KV head)
  after the prefill and after every decode step, generate the same tokens, and give the same
  logits (tolerance 1e-8 on a float64 model, so near-ties cannot make it flaky);
- "budget": the policy's declared budget holds at every step. A policy that evicts at decode
  (`evicts_at_decode`: `decode_evicts` and not `prefill_only`): every head retains at most
  `budget`. One that selects at prefill only: decode appends exactly one token per head per step
  (evicting nothing), and a head retains at most `budget` + the tokens decoded so far, or, with
  `varying_budgets=True` (layers or heads get different shares of the budget: pyramidkv, adakv,
  laprox), a row's mean over layers and KV heads does. With `protected(kw, last_pos)` (the
  positions a policy must always keep, given the newest position) those are always kept;
- "permutation": shuffling every head's slots after the prefill changes nothing (slot order
  carries no meaning);
- "batch": the first row of a batch (its neighbour left-padded or not) equals that prompt run
  alone: same tokens, kept positions and logits (batch invariance; a padded row's budgets may
  legitimately depend on the padded length, e.g. pyramidkv's, so it is covered by "reference");
- "full": a budget holding the whole prompt and every new token is exactly `policy="full"` (once,
  with the simplest parameters);
- "compiled" (opt-in: it compiles, 1-20 s on a CPU; "recompile" is its earlier name): the
  compiled decode step (`compile=True`) equals the eager reference (kept positions after every
  step, tokens, logits to 1e-4: the model's RoPE and norms run in fp32, which the compiler rounds
  differently) over `max_examples` batches of two 24-token rows, the second left-padded by 0-23
  tokens (it may hold fewer tokens than `budget` and start evicting mid-decode), one-shot or
  chunked, 32 new tokens each, with the simplest parameters (pass the budget to compile for,
  e.g. `budget=12`) and the simplest model of `model_strategy` (default: 2 layers, 4 query and 2
  KV heads): all of it one graph, without graph breaks or recompiles.

Parameters: `params` is a function `(draw, T) -> dict` (T = the shortest row's real prompt
length, >= 4: a budget below T really compresses) or None; keyword arguments add or override
parameters, as hypothesis strategies or constants (`budget=st.integers(2, 30)`, `window=4`);
without any `budget` the kit draws one with `budgets(T)`. `exempt(kw)` names properties that do
not apply to a draw (e.g. cam's Bernoulli gate draws one uniform per row index, so it is not
batch-invariant: `exempt=lambda kw: {"batch"} if kw["stochastic"] else ()`). The checks run on
one torch thread (restored afterwards): tiny models are faster so, by ~50x on a busy 2-core CPU.

`policy` is a Policy subclass or a registered name ("h2o", "snapkv+vam"); `reference` a
`flexkv.reference.RefPolicy` subclass (registered under the policy's name while checking) or None
for the registered one. Needs hypothesis (`pip install 'flexkv[test]'`).
"""
from __future__ import annotations

import functools
import os
from typing import Callable, Iterable

import torch

try:
    from hypothesis import HealthCheck, find, given, settings as hsettings
    from hypothesis import strategies as st
except ImportError as e:  # pragma: no cover - hypothesis is a test dependency
    raise ImportError("flexkv.testing needs hypothesis (a test dependency): "
                      "pip install hypothesis, or pip install 'flexkv[test]'") from e

import flexkv
from flexkv.policies.registry import make_policy

PROPERTIES = ("reference", "budget", "permutation", "batch", "full", "compiled", "recompile")
DEFAULT_PROPERTIES = ("reference", "budget", "permutation", "batch", "full")
VOCAB = 101
# (layers, query heads, KV heads, head dim): GQA 2, 1 layer with G = 2, and plain multi-head
MODEL_SHAPES = ((2, 4, 2, 16), (1, 2, 1, 16), (3, 4, 4, 8))


# ------------------------------------------------------------------------------------ models
@functools.lru_cache(maxsize=None)
def tiny_model(n_layers: int = 2, n_heads: int = 4, n_kv_heads: int = 2, head_dim: int = 16,
               dtype: torch.dtype = torch.float64, seed: int = 0):
    """A random LLaMA (vocab 101, context 512), weights ~ N(0, 0.2^2) and RMSNorm gains
    1 + N(0, 0.3^2): logits spread over several units, so greedy decoding has clear winners.
    Cached per arguments; treat it as read-only."""
    from flexkv.models.llama import ModelArgs, Transformer, rope_inv_freq

    args = ModelArgs(vocab_size=VOCAB, hidden_size=n_heads * head_dim,
                     intermediate_size=2 * n_heads * head_dim, num_hidden_layers=n_layers,
                     num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
                     head_dim=head_dim, rms_norm_eps=1e-6, max_position_embeddings=512)
    model = Transformer(args)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.3 * noise if name.endswith("norm.weight") else 0.2 * noise)
    model = model.to(dtype).eval()
    model.inv_freq = rope_inv_freq(args)  # RoPE frequencies stay fp32 (as load_model)
    return model


def models(shapes=MODEL_SHAPES, dtype: torch.dtype = torch.float64):
    """Strategy: one of the tiny random models (`tiny_model(*shape)`)."""
    return st.sampled_from(list(shapes)).map(lambda s: tiny_model(*s, dtype=dtype))


# ----------------------------------------------------------------------------- strategies
@st.composite
def prompts(draw, vocab: int = VOCAB, min_len: int = 8, max_len: int = 40, max_batch: int = 2):
    """Strategy: (input_ids [B, T], attention_mask or None, pad): row 1 (if any) may be
    left-padded, keeping at least min(4, T // 2) real tokens (rows at different fill levels)."""
    T = draw(st.integers(min_len, max_len))
    B = draw(st.integers(1, max_batch))
    pad = draw(st.integers(0, T - min(4, T // 2))) if B > 1 else 0
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    ids = torch.randint(0, vocab, (B, T), generator=g)
    mask = None
    if pad:
        mask = torch.ones(B, T, dtype=torch.long)
        mask[1, :pad] = 0
    return ids, mask, pad


def chunkings(T: int):
    """Strategy: None (one-shot prefill) or a chunk size in [1, T]."""
    return st.one_of(st.none(), st.integers(1, T))


def decode_lengths(max_new: int = 17):
    """Strategy: new tokens to generate (the prefill's token + decode steps)."""
    return st.integers(1, max_new)


def budgets(T: int, low: int = 1, beyond: int = 8):
    """Strategy: a budget in [low, T - 1], which compresses a T-token prompt at prefill, or in
    [T, T + beyond], which holds the prompt: eviction starts during decode (and a longer row of
    the batch is compressed while this one is not)."""
    above = st.integers(max(low, T), max(low, T) + beyond)
    return above if low >= T else st.one_of(st.integers(low, T - 1), above)


def _param_fn(params, fixed: dict):
    def draw_kw(draw, T):
        kw = dict(params(draw, T)) if params is not None else {}
        for name, value in fixed.items():
            kw[name] = draw(value) if isinstance(value, st.SearchStrategy) else value
        if "budget" not in kw and params is None:
            kw["budget"] = draw(budgets(T))
        return kw
    return draw_kw


@st.composite
def scenarios(draw, params, model_strategy=None, max_new: int = 17):
    """Strategy: a dict(model, ids, mask, pad, chunk, new, kw, seed) for `params(draw, T)`."""
    model = draw(model_strategy if model_strategy is not None else models())
    ids, mask, pad = draw(prompts(vocab=model.args.vocab_size))
    T = ids.shape[1]
    return dict(model=model, ids=ids, mask=mask, pad=pad, chunk=draw(chunkings(T)),
                new=draw(decode_lengths(max_new)), kw=params(draw, T - pad),
                seed=draw(st.integers(0, 2**16)))


# ------------------------------------------------------------------------------ running
def pos_sets(cache):
    """[layer][b][g] -> frozenset of kept positions."""
    return [[[frozenset(p for p in row.tolist() if p >= 0) for row in P] for P in lc.pos]
            for lc in cache.layers]


def permute_slots(cache, seed: int) -> None:
    """Shuffle every head's slots (k, v, pos and statistics together), independently per head."""
    g = torch.Generator().manual_seed(seed)
    for lc in cache.layers:
        B, H, S = lc.pos.shape
        perm = torch.stack([torch.randperm(S, generator=g) for _ in range(B * H)]).view(B, H, S)
        for name in ("pos",) + tuple(lc.stat_names):
            buf = getattr(lc, name)
            buf.copy_(buf.gather(2, perm))
        for name in ("k", "v"):
            buf = getattr(lc, name)
            buf.copy_(buf.gather(2, perm[..., None].expand_as(buf)))


def _policy(policy, kw):
    """A fresh policy object per run (policies record the model's shape when building caches)."""
    return make_policy(policy, **kw) if isinstance(policy, str) else policy(**kw)


def run(model, ids, policy, kw, *, new=17, chunk=None, reference=False, mask=None, permute=None,
        compile=False):
    """generate with a cache snapshot after the prefill and each decode step:
    -> (output, [pos_sets per step], [retained per step])."""
    snaps, retained = [], []

    def track(cache):
        if permute is not None and not snaps:
            permute_slots(cache, permute)
        snaps.append(pos_sets(cache))
        retained.append(cache.retained().clone())

    out = flexkv.generate(model, ids, max_new_tokens=new, policy=_policy(policy, kw),
                          prefill_chunk=chunk, reference=reference, attention_mask=mask,
                          cache_callback=track, output_logits=True, compile=compile)
    return out, snaps, retained


class _FixedDraw:
    """A stand-in for hypothesis' draw that picks each strategy's simplest example."""

    def __call__(self, strategy):
        return find(strategy, lambda _: True)


def simplest(params, T: int) -> dict:
    """The simplest parameters `params` draws for a T-token prompt."""
    return params(_FixedDraw(), T)


# ------------------------------------------------------------------------------ checks
def _check_reference(s, policy, kw):
    a, sa, _ = run(s["model"], s["ids"], policy, kw, new=s["new"], chunk=s["chunk"], mask=s["mask"])
    _same_as_reference(s, policy, kw, a, sa, "the static path", atol=1e-8)


def _same_as_reference(s, policy, kw, out, snaps, what, atol):
    r, sr, _ = run(s["model"], s["ids"], policy, kw, new=s["new"], chunk=s["chunk"], mask=s["mask"],
                   reference=True)
    for step, (x, y) in enumerate(zip(snaps, sr)):
        assert x == y, f"{kw}: {what}'s kept positions differ from the reference after step {step}"
    torch.testing.assert_close(out.logits, r.logits, atol=atol, rtol=0)
    assert torch.equal(out.tokens, r.tokens), f"{kw}: {what}'s tokens differ from the reference"


def _check_budget(s, policy, kw, protected, varying, snaps, retained):
    """The declared budget (not the cache's capacity, which no policy can exceed)."""
    evicts = _policy(policy, kw).evicts_at_decode
    budget = kw.get("budget")
    for step, ret in enumerate(retained):  # ret: [L, B, Hkv]
        if not evicts:  # a prefill-only selection: decode appends every token, evicts nothing
            assert torch.equal(ret, retained[0] + step), \
                f"{kw}: decode did not append exactly one token per head at step {step}"
        if budget is None:
            continue
        allowed = budget if evicts else budget + step
        if varying and not evicts:
            mean = ret.double().mean(dim=(0, 2))  # [B]: per row, over layers and KV heads
            assert (mean <= allowed).all(), \
                f"{kw}: a row retained {mean.tolist()} per head on average > {allowed} at step {step}"
        else:
            assert (ret <= allowed).all(), \
                f"{kw}: retained more than the budget ({int(ret.max())} > {allowed}) at step {step}"
    if protected is None:
        return
    T = s["ids"].shape[1]
    for step, snap in enumerate(snaps):
        for b in range(s["ids"].shape[0]):
            must = set(protected(kw, T - 1 - (s["pad"] if b == 1 else 0) + step))
            for layer in snap:
                for kept in layer[b]:
                    assert must <= kept, f"{kw}: protected {sorted(must - kept)} evicted at step {step}"


def _check_permutation(s, policy, kw, out, snaps):
    p, psnaps, _ = run(s["model"], s["ids"], policy, kw, new=s["new"], chunk=s["chunk"],
                       mask=s["mask"], permute=s["seed"])
    assert psnaps == snaps, f"{kw}: a permutation of the slots changed the kept positions"
    torch.testing.assert_close(p.logits, out.logits, atol=1e-10, rtol=0)


def _check_batch(s, policy, kw, out, snaps):
    alone, asnaps, _ = run(s["model"], s["ids"][:1], policy, kw, new=s["new"], chunk=s["chunk"])
    assert torch.equal(alone.tokens[0], out.tokens[0]), f"{kw}: row 0 differs from its solo run"
    for step, (x, y) in enumerate(zip(snaps, asnaps)):
        assert [layer[0] for layer in x] == [layer[0] for layer in y], \
            f"{kw}: row 0's kept positions differ from its solo run after step {step}"
    torch.testing.assert_close(out.logits[:1], alone.logits, atol=1e-8, rtol=0)


def _check_full(model, policy, params):
    T, new = 20, 17
    ids = torch.randint(0, model.args.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))
    kw = simplest(params, T)
    if kw.get("budget") is not None:
        kw["budget"] = T + new
    full = flexkv.generate(model, ids, max_new_tokens=new, output_logits=True)
    out = flexkv.generate(model, ids, max_new_tokens=new, policy=_policy(policy, kw),
                          output_logits=True)
    assert torch.equal(out.tokens, full.tokens), f"{kw}: a budget holding everything is not full"
    torch.testing.assert_close(out.logits, full.logits, atol=1e-10, rtol=0)


COMPILED_T, COMPILED_NEW = 24, 32  # the "compiled" property's prompt length and new tokens


def _check_compiled(policy, params, max_examples, model_strategy, user_settings):
    """One compiled graph (fixed shapes and parameters) over `max_examples` drawn batches."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from torch._dynamo.utils import counters

    from flexkv.generate import decode_one_token

    model = tiny_model() if model_strategy is None else find(model_strategy, lambda _: True)
    T = COMPILED_T
    kw = simplest(params, T)
    torch._dynamo.reset()
    counters.clear()
    graphs = []

    @_settings(user_settings, max_examples)
    @given(seed=st.integers(0, 2**16), pad=st.integers(0, T - 1), chunk=chunkings(T))
    def check(seed, pad, chunk):
        ids = torch.randint(0, model.args.vocab_size, (2, T),
                            generator=torch.Generator().manual_seed(seed))
        mask = None
        if pad:
            mask = torch.ones(2, T, dtype=torch.long)
            mask[1, :pad] = 0
        s = dict(model=model, ids=ids, mask=mask, pad=pad, chunk=chunk, new=COMPILED_NEW)
        out, snaps, _ = run(model, ids, policy, kw, new=COMPILED_NEW, chunk=chunk, mask=mask,
                            compile=True)
        assert len(_debug_get_cache_entry_list(decode_one_token.__code__)) == 1, f"{kw}: recompiled"
        assert not counters["graph_break"], (kw, dict(counters["graph_break"]))
        graphs.append(counters["stats"]["unique_graphs"])
        assert graphs[-1] == graphs[0], f"{kw}: a new graph on a later call"
        _same_as_reference(s, policy, kw, out, snaps, "the compiled step", atol=1e-4)

    check()


def check_policy(policy, reference=None, params: Callable | None = None, *,
                 properties: Iterable[str] = DEFAULT_PROPERTIES,
                 protected: Callable | None = None, exempt: Callable | None = None,
                 varying_budgets: bool = False, max_examples: int = 8, model_strategy=None,
                 settings=None, **fixed) -> None:
    """Check `policy` (a Policy subclass or a registered name) on hypothesis-drawn scenarios;
    raises AssertionError (with hypothesis' falsifying example) on the first violation.
    See the module docstring for the properties and the parameter conventions.
    `varying_budgets`: the policy gives layers or KV heads different shares of `budget` (the
    "budget" property then holds a row's mean over them to it, not every head).
    `model_strategy`: the models to draw (default `models()`); `settings`: a hypothesis
    `settings` object to start from (default: no deadline, no example database, derandomized
    only when the environment variable CI is set, so local runs keep exploring new examples),
    whose `max_examples` is replaced by `max_examples`."""
    props = tuple(properties)
    unknown = sorted(set(props) - set(PROPERTIES))
    if unknown:
        raise ValueError(f"properties: unknown {unknown}; allowed: {list(PROPERTIES)}")
    if not (isinstance(policy, str) or (isinstance(policy, type) and hasattr(policy, "name"))):
        raise ValueError(f"policy must be a Policy subclass or a registered name, got {policy!r}")
    draw_kw = _param_fn(params, fixed)
    from flexkv.reference import _REFS

    name = policy.rsplit("+", 1)[-1] if isinstance(policy, str) else policy.name
    saved = _REFS.get(name)
    if reference is not None:
        _REFS[name] = reference
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster (measured ~50x on a busy CPU)
    try:
        if "full" in props:
            _check_full(tiny_model(), policy, draw_kw)
        if "compiled" in props or "recompile" in props:
            _check_compiled(policy, draw_kw, max_examples, model_strategy, settings)
        per_draw = [p for p in props if p not in ("full", "compiled", "recompile")]
        if per_draw:
            _given(policy, draw_kw, per_draw, protected, exempt, varying_budgets, max_examples,
                   model_strategy, settings)
    finally:
        torch.set_num_threads(threads)
        if reference is not None:
            if saved is None:
                _REFS.pop(name, None)
            else:
                _REFS[name] = saved


def _settings(user_settings, max_examples):
    base = user_settings or hsettings(deadline=None, derandomize=bool(os.environ.get("CI")),
                                      database=None)
    return hsettings(base, max_examples=max_examples, suppress_health_check=[
        HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


def _given(policy, draw_kw, props, protected, exempt, varying, max_examples, model_strategy,
           user_settings):
    @_settings(user_settings, max_examples)
    @given(s=scenarios(draw_kw, model_strategy))
    def check(s):
        kw = s["kw"]
        skip = set(exempt(kw)) if exempt is not None else set()
        todo = [p for p in props if p not in skip]
        if "reference" in todo:
            _check_reference(s, policy, kw)
        if not {"budget", "permutation", "batch"} & set(todo):
            return
        out, snaps, retained = run(s["model"], s["ids"], policy, kw, new=s["new"],
                                   chunk=s["chunk"], mask=s["mask"])
        if "budget" in todo:
            _check_budget(s, policy, kw, protected, varying, snaps, retained)
        if "permutation" in todo:
            _check_permutation(s, policy, kw, out, snaps)
        if "batch" in todo and s["ids"].shape[0] > 1:
            _check_batch(s, policy, kw, out, snaps)

    check()


__all__ = ["check_policy", "tiny_model", "models", "prompts", "chunkings", "decode_lengths",
           "budgets", "scenarios", "run", "pos_sets", "permute_slots", "simplest",
           "PROPERTIES", "DEFAULT_PROPERTIES", "MODEL_SHAPES"]
