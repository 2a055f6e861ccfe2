"""Decode/prefill speed of flexkv policies against Hugging Face transformers, in one run.

    python bench/speed.py --preset gpu-8b         # GPU (H100/H200): Llama-3.1-8B shape, random bf16 weights
    python bench/speed.py --preset cpu            # CPU: the default model, flexkv compiled vs HF eager
    flexkv bench speed --preset ...               # the same through the CLI
    python bench/speed.py --tp 2                  # TP=1 vs TP=2 (torchrun; bench/tp_speed.py)

Per row: decode ms/token and tokens/s, the bandwidth floor of that row (measured device copy
bandwidth; bytes of weights + KV slots actually read per step), the fraction of the floor reached,
prefill time (plain causal vs the policy's prefill, one-shot or chunked), peak memory, compile
time, and recompiles during timing. Results: bench/results/speed/<preset>.{json,md}, stamped with
device, torch, commit and wall time.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:  # bench/'s own modules (kernel_profile), also when loaded by path
    sys.path.insert(0, str(ROOT))
import kernel_profile  # noqa: E402
from stamp import commit_id  # noqa: E402

RESULTS = ROOT / "results" / "speed"

LLAMA31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                  head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
                  max_position_embeddings=131072, tie_word_embeddings=False,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=4096)

PRESETS = {
    "gpu-8b": dict(model="llama-3.1-8b-shape", device="cuda", dtype="bfloat16",
                   prompts=[4096, 16384, 32768], budgets=[512, 2048], batches=[1, 8],
                   policies=["full", "streaming", "h2o", "tova", "snapkv", "weightedkv", "h2o+vam"],
                   hf=["eager", "static-compile"], new_tokens=128, chunk=2048),
    # the gpu-8b grid split into presets that each fit one 10-minute device call (bench/GPU.md);
    # policies in priority order, the transformers rows after the first `hf_after` policies, and
    # `--time-budget` skips what would not finish
    "gpu-8b-4k": dict(model="llama-3.1-8b-shape", device="cuda", dtype="bfloat16",
                      prompts=[4096], budgets=[512], batches=[1],
                      policies=["full", "streaming", "h2o", "snapkv", "tova", "weightedkv",
                                "h2o+vam"],
                      # transformers after full and streaming: lease 1 measured h2o, and its
                      # time budget cut the transformers rows (session 22)
                      hf=["static-compile", "eager"], hf_after=2, new_tokens=128, chunk=2048,
                      long_policy="h2o", long_steps=1000),  # issue 9: 1000 steps, 0 recompiles
    "gpu-8b-32k": dict(model="llama-3.1-8b-shape", device="cuda", dtype="bfloat16",
                       prompts=[32768], budgets=[2048], batches=[1],
                       policies=["streaming", "h2o", "snapkv", "laprox", "full", "tova"],
                       hf=["static-compile"], hf_after=2, new_tokens=128, chunk=2048),
    "gpu-8b-b8": dict(model="llama-3.1-8b-shape", device="cuda", dtype="bfloat16",
                      prompts=[4096], budgets=[512], batches=[8],
                      policies=["full", "streaming", "h2o"],
                      hf=["static-compile"], hf_after=3, new_tokens=128, chunk=2048),
    "gpu-smollm": dict(model="smollm2-135m-instruct", device="cuda", dtype="bfloat16",
                       prompts=[4096], budgets=[256, 1024], batches=[1, 8],
                       policies=["full", "streaming", "h2o", "tova", "snapkv", "weightedkv", "h2o+vam"],
                       hf=["eager", "static-compile"], new_tokens=128, chunk=1024),
    "cpu": dict(model="smollm2-135m-instruct", device="cpu", dtype="float32",
                prompts=[1024], budgets=[128], batches=[1],
                policies=["full", "streaming", "h2o", "snapkv"], hf=["eager"], new_tokens=32,
                chunk=256),
    "tiny": dict(model="tiny", device="cpu", dtype="float32", prompts=[64], budgets=[16],
                 batches=[1], policies=["full", "streaming", "h2o"], hf=["eager"], new_tokens=8,
                 chunk=32, long_policy="h2o", long_steps=24),
}


@dataclass
class Row:
    impl: str
    policy: str
    prompt: int
    budget: int | None
    batch: int
    decode_ms: float
    tok_s: float
    floor_ms: float
    frac_floor: float
    prefill_s: float
    prefill_plain_s: float
    prefill_chunked_s: float | None
    peak_mem_gb: float | None
    chunked_peak_mem_gb: float | None
    compile_s: float | None
    recompiles: int | None
    kv_slots: int | None
    error: str | None = None       # set when the row failed (out of memory, ...) or was skipped
    cudagraph_skips: int | None = None  # inductor's CUDA-graph skips in the warm-up + timed run
    long_steps: int | None = None       # a long run of the same shapes (the preset's long_policy):
    long_recompiles: int | None = None  # its decode steps, dynamo graphs made
    long_cudagraph_skips: int | None = None  # and CUDA-graph skips during it
    kernels: dict | None = None  # compiled cells: where a decode step's time goes (kernel_profile)
    eager_check: dict | None = None  # compiled cells: its first steps' logits against the eager step's
    chunked_bound_gb: float | None = None  # issue 9's bound on chunked_peak_mem_gb (GPU rows)


# ------------------------------------------------------------------------------ measurements
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device, dtype) -> float:
    """Bytes/s of a large device copy (read + write)."""
    n = (1 << 30) if device.type == "cuda" else (1 << 26)
    x = torch.empty(n // 2, dtype=torch.float16, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    sync(device)
    reps = 20 if device.type == "cuda" else 5
    t = time.perf_counter()
    for _ in range(reps):
        y.copy_(x)
    sync(device)
    return 2 * x.numel() * x.element_size() * reps / (time.perf_counter() - t)


def param_bytes(model) -> int:
    """Bytes of every parameter (`parameters()` yields a tied one once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def weight_bytes(model) -> int:
    """Bytes of the weights a decode step streams."""
    total = param_bytes(model)
    # the embedding table is gathered (one row per token), not streamed, unless tied to lm_head
    emb = model.model.embed_tokens.weight
    if emb is not model.lm_head.weight:
        total -= emb.numel() * emb.element_size()
    return total


def peak_reset(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device):
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def cudagraph_skips() -> int:
    from torch._dynamo.utils import counters
    return counters["inductor"]["cudagraph_skips"]


def n_graphs() -> int:
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from flexkv.generate import decode_one_token
    return len(_debug_get_cache_entry_list(decode_one_token.__code__))


# ------------------------------------------------------------------------------ models
class _default_dtype:
    """Parameters created in `dtype` (torch.set_default_dtype) inside the block."""

    def __init__(self, dtype):
        self.dtype = dtype

    def __enter__(self):
        self.prev = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc):
        torch.set_default_dtype(self.prev)


def random_transformer(args, device, dtype, seed: int = 0):
    """A flexkv Transformer of shape `args` with random weights (N(0, 0.02), norms 1; seeded),
    made directly on `device` in `dtype`: speed does not depend on the weights."""
    from flexkv.models.llama import Transformer, rope_inv_freq

    torch.manual_seed(seed)
    with torch.device(device), _default_dtype(dtype):  # no fp32 copy of 8B weights
        model = Transformer(args)
    model.inv_freq = rope_inv_freq(args).to(device)  # RoPE frequencies stay fp32
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else torch.nn.init.ones_(p)
    return model.eval()


def build_models(spec, device, dtype, with_hf: bool):
    from flexkv.models.llama import ModelArgs

    if spec in ("llama-3.1-8b-shape", "tiny"):
        cfg = LLAMA31_8B if spec != "tiny" else TINY
        model = random_transformer(ModelArgs(**cfg), device, dtype)
        hf = None
        if with_hf:
            from transformers import LlamaConfig, LlamaForCausalLM
            hf_cfg = dict(cfg)
            with torch.device(device), _default_dtype(dtype):
                hf = LlamaForCausalLM(LlamaConfig(**hf_cfg)).eval()
            # assign: the same tensors, not a second copy of the weights (on the GPU a copy
            # held 15 GB beside every flexkv run and doubled its peak memory, session 22)
            hf.load_state_dict(model.state_dict(), strict=False, assign=True)
        return model, hf
    import flexkv
    model, _ = flexkv.load_model(spec, device=device, dtype=dtype)
    hf = None
    if with_hf:
        from transformers import AutoModelForCausalLM

        from flexkv.models.provision import provision_default_model
        path = provision_default_model() if spec == "smollm2-135m-instruct" else spec
        hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
    return model, hf


# ------------------------------------------------------------------------------ runs
@torch.no_grad()
def plain_prefill_s(model, ids) -> float:
    device = ids.device
    pos = torch.arange(ids.shape[1], device=device).expand_as(ids)
    model._run(ids, pos, "plain", last_only=True)  # warm-up (compiles flex on CUDA)
    sync(device)
    t = time.perf_counter()
    model._run(ids, pos, "plain", last_only=True)
    sync(device)
    return time.perf_counter() - t


STEADY_SKIP = 4  # decode steps left out of the CUDA timing (CUDA-graph warm-up / re-record)
CHECK_STEPS = 8  # compiled cells: tokens whose logits are compared with the eager step's (CUDA
#                  graph trees run a step eagerly, then record it, then replay: 8 covers replays)
CHECK_MIN_COS = 0.99  # below this cosine a compiled cell's logits are flagged in the table


def eager_check(model, ids, policy, kw, logits) -> dict:
    """The first CHECK_STEPS logits of a compiled run ([B, n, V]) against an eager run fed the
    same tokens, at the cell's own shapes: the CUDA tests check values on tiny models, whose
    kernels fit one thread block, and inductor has bugs that show only across blocks
    (pytorch/pytorch#198270). bf16 rounds differently in the two (and may move a near-tie
    eviction), so this is a cosine, not equality: a corrupted cache falls far below 0.99. The
    eager run takes the "explicit" attention path (K and V in fp32, the reference every other
    path is tested against; nothing compiled, so no compile at a new cache shape either)."""
    import flexkv
    from flexkv import attention
    n = min(CHECK_STEPS, logits.shape[1])
    T = ids.shape[1]
    forced = logits.argmax(-1)[:, :n]  # the compiled run's greedy tokens
    path, attention.DECODE_PROBS = attention.DECODE_PROBS, "explicit"
    try:
        ref = flexkv.generate(model, ids, max_new_tokens=n, policy=policy, forced_tokens=forced,
                              output_logits=True, **kw)
    finally:
        attention.DECODE_PROBS = path
    a, b = logits[:, :n].double(), ref.logits.double()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)  # [B, n]
    del ref
    return dict(steps=n, prompt=T, min_cos=float(cos.min()),
                top1=float((a.argmax(-1) == b.argmax(-1)).double().mean()),
                max_abs=float((a - b).abs().max()), scale=float(b.abs().max()))


def free(device):
    """Return what dropped references held (so a peak measured next counts only its own run)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def chunked_bound_gb(model, budget, chunk, batch) -> float:
    """Issue 9's bound on a chunked prefill's peak memory: every weight plus twice the KV of
    `budget + chunk` tokens per sequence (the budget kept, one chunk arriving)."""
    a = model.args
    kv_token = 2 * a.num_hidden_layers * a.num_key_value_heads * a.head_dim * \
        next(model.parameters()).element_size()
    return (param_bytes(model) + 2 * (budget + chunk) * kv_token * batch) / 2**30


def run_flexkv(model, ids, policy, budget, new_tokens, chunk, compile, bw,
               long_steps: int | None = None, profile: bool = False) -> Row:
    """One compiled (or eager) flexkv cell: warm-up, the timed run (steady-state CUDA-event
    timing on CUDA), compiled: the warm-up's first logits against an eager run's (`eager_check`),
    with `profile` (compiled) a profiled run of the same shapes (the per-kernel
    breakdown of its steady decode steps: `kernel_profile`), a chunked prefill; with
    `long_steps` (compiled), then a run of that many new tokens with the same shapes, counting
    recompiles and CUDA-graph skips (issue 9's 1000-step check: a decode-time policy's capacity
    does not depend on the run's length). Each run's cache is dropped before the next run, so a
    peak (`peak_mem_gb`, `chunked_peak_mem_gb`) holds the weights and that run only."""
    import flexkv
    device = ids.device
    kw = {} if policy.startswith("full") else {"budget": budget}
    B, T = ids.shape
    skips = cudagraph_skips()
    t = time.perf_counter()  # warm-up with the timed run's shapes (capacity depends on max_new)
    warm = flexkv.generate(model, ids, max_new_tokens=new_tokens, policy=policy, compile=compile,
                           output_logits=min(CHECK_STEPS, new_tokens) if compile else False,
                           **kw)
    sync(device)
    first = time.perf_counter() - t
    warm_prefill_s, warm_steps = warm.prefill_s, warm.new_tokens - 1
    warm_logits = warm.logits  # compiled: [B, <= CHECK_STEPS, V]; eager: None
    del warm
    free(device)
    checked = None
    if compile:
        try:
            checked = eager_check(model, ids, policy, kw, warm_logits)
        except Exception as e:  # noqa: BLE001 - the check is extra: keep the row
            checked = dict(error=f"{type(e).__name__}: {str(e).strip()[:160]}")
        del warm_logits
        free(device)
    graphs = n_graphs() if compile else None
    peak_reset(device)
    events = []  # on CUDA: one event per token, recorded without a host sync

    def mark(tok):
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        events.append(ev)

    cb = {"callback": mark} if device.type == "cuda" else {}
    out = flexkv.generate(model, ids, max_new_tokens=new_tokens, policy=policy, compile=compile,
                          **cb, **kw)
    peak = peak_gb(device)
    recompiles = (n_graphs() - graphs) if compile else None
    skips = cudagraph_skips() - skips if compile else None
    steps = out.new_tokens - 1
    decode_ms = 1e3 * out.decode_s / steps
    skip = STEADY_SKIP
    if len(events) > skip + 2:  # steady state: leave out the first steps (a new cache's CUDA
        torch.cuda.synchronize()  # graph is re-recorded for its buffer addresses)
        decode_ms = events[skip].elapsed_time(events[-1]) / (len(events) - 1 - skip)
    prefill_s, kv_read, slots = out.prefill_s, out.cache.kv_bytes(), out.cache.slots()
    del out  # kv_read: every slot is read each step (static shapes)
    free(device)
    compile_s = max(0.0, first - warm_prefill_s - warm_steps * decode_ms / 1e3) \
        if compile else None
    kernels = None
    if profile and compile:
        try:
            kernels = kernel_profile.profile_decode(
                lambda cb: flexkv.generate(model, ids, max_new_tokens=new_tokens, policy=policy,
                                           compile=True, callback=cb, **kw),
                new_tokens, device, skip=STEADY_SKIP + 2)
        except Exception as e:  # noqa: BLE001 - the breakdown is extra: keep the row
            kernels = dict(error=f"{type(e).__name__}: {str(e).strip()[:160]}")
        free(device)
    peak_reset(device)
    chunked = flexkv.generate(model, ids, max_new_tokens=2, policy=policy, prefill_chunk=chunk, **kw)
    chunk_peak = peak_gb(device)
    chunked_prefill_s = chunked.prefill_s
    del chunked
    free(device)
    floor_ms = 1e3 * (weight_bytes(model) + kv_read) / bw
    row = Row("flexkv" + ("+compile" if compile else ""), policy, T,
              None if policy.startswith("full") else budget, B, decode_ms, 1e3 * B / decode_ms,
              floor_ms, floor_ms / decode_ms, prefill_s, float("nan"), chunked_prefill_s,
              peak, chunk_peak, compile_s, recompiles, slots, cudagraph_skips=skips,
              kernels=kernels, eager_check=checked)
    if chunk_peak is not None and not policy.startswith("full"):
        row.chunked_bound_gb = chunked_bound_gb(model, budget, chunk, B)
    if long_steps and compile:
        graphs, skips = n_graphs(), cudagraph_skips()
        long = flexkv.generate(model, ids, max_new_tokens=long_steps, policy=policy,
                               compile=True, **kw)
        row.long_steps = long.new_tokens - 1
        row.long_recompiles = n_graphs() - graphs
        row.long_cudagraph_skips = cudagraph_skips() - skips
    return row


@torch.no_grad()
def run_hf(hf, ids, mode, new_tokens, bw) -> Row:
    """transformers' own `generate`: "eager" (its dynamic cache), or "static-compile": a static
    cache with transformers' automatic compilation of the decoding steps (its default
    CompileConfig, `mode="reduce-overhead"`: CUDA graphs on CUDA), forced where transformers
    would not compile by itself (CPU). The warm-up generates the timed run's length, so every
    timed call reuses that cache length (transformers keeps the longest it has made) and the
    timed calls recompile nothing; `recompiles` counts the dynamo graphs made while timing."""
    from torch._dynamo.utils import counters
    device = ids.device
    B, T = ids.shape
    kw = dict(do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)
    if mode == "static-compile":
        from transformers import CompileConfig
        cc = CompileConfig()
        if device.type != "cuda":
            cc._compile_all_devices = True  # transformers' switch for compiling off CUDA
        kw.update(cache_implementation="static", compile_config=cc)

    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        """The host time of each `put`: the prompt, then each new token once it is on the host."""

        def __init__(self):
            self.t = []

        def put(self, value):
            self.t.append(time.perf_counter())

        def end(self):
            pass

    def timed(n, streamer=None):
        sync(device)
        t = time.perf_counter()
        hf.generate(ids, max_new_tokens=n, min_new_tokens=n, streamer=streamer, **kw)
        sync(device)
        return time.perf_counter() - t

    static = mode == "static-compile"
    warm = new_tokens if static else 3  # static: compiles, records, sizes the timed runs' cache
    first = timed(warm)
    graphs = counters["stats"]["unique_graphs"]
    peak_reset(device)
    t1 = timed(1)
    stamps = Stamps()
    tn = timed(new_tokens, stamps)
    peak = peak_gb(device)
    recompiles = counters["stats"]["unique_graphs"] - graphs
    # decode from the first new token to the last within one run: the difference of an n-token
    # and a 1-token run went negative for a tiny model whenever the CPU stalled the shorter one
    if len(stamps.t) != new_tokens + 1:  # this transformers' streamer protocol changed
        raise RuntimeError(f"transformers' streamer got {len(stamps.t)} puts for a prompt and "
                           f"{new_tokens} tokens, expected {new_tokens + 1}")
    decode_ms = 1e3 * (stamps.t[-1] - stamps.t[1]) / (new_tokens - 1)
    a = hf.config
    kv = 2 * a.num_hidden_layers * a.num_key_value_heads * (T + new_tokens // 2) * \
        getattr(a, "head_dim", a.hidden_size // a.num_attention_heads) * B * \
        next(hf.parameters()).element_size()
    emb = hf.model.embed_tokens.weight
    wb = sum(p.numel() * p.element_size() for p in hf.parameters())
    if emb is not hf.lm_head.weight:
        wb -= emb.numel() * emb.element_size()
    floor_ms = 1e3 * (wb + kv) / bw
    return Row(f"transformers-{mode}", "full", T, None, B, decode_ms, 1e3 * B / decode_ms,
               floor_ms, floor_ms / decode_ms, t1, float("nan"), None, peak, None,
               max(0.0, first - tn) if static else None, recompiles if static else None, None)


def failed_row(impl, policy, T, budget, B, error: str) -> Row:
    nan = float("nan")
    return Row(impl, policy, T, budget, B, nan, nan, nan, nan, nan, nan, None, None, None,
               None, None, None, error)


# ------------------------------------------------------------------------------ report
def stamp(argv, wall_s, device) -> dict:
    commit = commit_id()
    dev = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    from flexkv import attention
    from flexkv.generate import decode_compile_options
    tuned = bool(decode_compile_options(device).get("coordinate_descent_tuning"))
    return dict(command="python bench/speed.py " + " ".join(argv), commit=commit, device=dev,
                torch=torch.__version__, wall_s=round(wall_s, 1),
                threads=torch.get_num_threads(), decode_probs=attention.DECODE_PROBS,
                coordinate_descent=tuned)


def markdown(meta, rows, bw) -> str:
    tuned = meta.get("coordinate_descent")
    tuned = {True: "on", False: "off"}.get(tuned, tuned or "not recorded")
    head = (f"# Speed: {meta['preset']}\n\n`{meta['command']}`  \ncommit {meta['commit']}, "
            f"device {meta['device']}, torch {meta['torch']}, wall {meta['wall_s']} s, "
            f"copy bandwidth {bw / 1e9:.1f} GB/s, decode probabilities "
            f"{meta.get('decode_probs', 'not recorded')} (`flexkv.attention.DECODE_PROBS`), "
            f"layer regions {','.join(meta.get('config', {}).get('layer_regions', ['not recorded']))}"
            f" (`flexkv.models.llama.LAYER_REGIONS`), coordinate-descent tuning {tuned}"
            f" (`flexkv.generate.COORDINATE_DESCENT`)\n\n")
    cols = ["impl", "policy", "prompt", "budget", "batch", "decode_ms", "tok_s", "floor_ms",
            "frac_floor", "prefill_plain_s", "prefill_s", "prefill_chunked_s", "peak_mem_gb",
            "chunked_peak_mem_gb", "compile_s", "recompiles"]
    for extra in ("cudagraph_skips", "long_steps", "long_recompiles", "long_cudagraph_skips"):
        if any(getattr(r, extra) is not None for r in rows):
            cols.append(extra)
    # issue 9's ratios, where the row they compare with is in the table: decode time over
    # `streaming`'s at the same prompt, budget and batch (the <= 1.05 policy-overhead target),
    # tokens/s over transformers static+compile's at the same prompt and batch (>= 3.3x), and
    # one-shot prefill time over a plain causal prefill's (snapkv / laprox at 32K: <= 1.3x), and
    # a chunked prefill's peak memory over weights + 2 x (budget + chunk) KV (<= 1 at 32K)
    ok = [r for r in rows if not r.error and r.impl.startswith("flexkv")]
    streaming = {(r.impl, r.prompt, r.budget, r.batch): r.decode_ms for r in ok
                 if r.policy == "streaming"}
    hf_static = {(r.prompt, r.batch): r.tok_s for r in rows
                 if r.impl == "transformers-static-compile" and not r.error}
    derived = {}
    for r in ok:
        x = {}
        if r.budget is not None and (r.impl, r.prompt, r.budget, r.batch) in streaming:
            x["x_streaming_ms"] = r.decode_ms / streaming[(r.impl, r.prompt, r.budget, r.batch)]
        if (r.prompt, r.batch) in hf_static:
            x["x_hf_static_tok_s"] = r.tok_s / hf_static[(r.prompt, r.batch)]
        if r.prefill_plain_s > 0:  # False for nan (a failed plain prefill)
            x["x_plain_prefill"] = r.prefill_s / r.prefill_plain_s
        if r.chunked_bound_gb and r.chunked_peak_mem_gb is not None:
            x["x_chunked_bound"] = r.chunked_peak_mem_gb / r.chunked_bound_gb
        derived[id(r)] = x
    for extra in ("x_streaming_ms", "x_hf_static_tok_s", "x_plain_prefill", "x_chunked_bound"):
        if any(extra in x for x in derived.values()):
            cols.append(extra)
    for r in ok:  # the compiled cell's first logits against the eager step's (eager_check)
        c = r.eager_check
        if c is not None:
            derived[id(r)]["eager_cos"] = ("error" if "error" in c else f"{c['min_cos']:.4f}"
                                           + (" (!)" if c["min_cos"] < CHECK_MIN_COS else ""))
    if any("eager_cos" in x for x in derived.values()):
        cols.append("eager_cos")
    if any(r.error for r in rows):
        cols.append("error")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        d = asdict(r) | derived.get(id(r), {})
        cells = []
        for c in cols:
            v = d.get(c)  # a ratio absent for this row
            cells.append("-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n" + kernel_profile.markdown(rows)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--tp" or a.startswith("--tp=") for a in argv):  # tensor parallel: its own runner
        sys.path.insert(0, str(ROOT))
        from tp_speed import main as tp_main
        return tp_main(argv)
    from flexkv.attention import DECODE_PROBS_PATHS
    ap = argparse.ArgumentParser(prog="flexkv bench speed", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--policies", help="comma-separated subset of the preset's policies")
    ap.add_argument("--prompts", help="comma-separated prompt lengths")
    ap.add_argument("--budgets", help="comma-separated budgets")
    ap.add_argument("--batches", help="comma-separated batch sizes")
    ap.add_argument("--new-tokens", type=int)
    ap.add_argument("--no-compile", action="store_true", help="eager flexkv (harness tests)")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baselines")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--decode-probs", choices=DECODE_PROBS_PATHS,
                    help="flexkv.attention.DECODE_PROBS for this run (how policies that need "
                         "attention probabilities get them; default: the library's)")
    ap.add_argument("--layer-regions", metavar="MODES",
                    help="comma-separated flexkv.models.llama.LAYER_REGIONS settings (auto, on, "
                         "off; default: this process's, FLEXKV_LAYER_REGIONS or auto): every "
                         "compiled flexkv cell runs once per setting, in this order, labelled "
                         "with it when there are several (compile_s compares them)")
    ap.add_argument("--no-profile", action="store_true",
                    help="skip the profiled run of each compiled cell (the per-kernel breakdown)")
    ap.add_argument("--time-budget", type=float, metavar="S",
                    help="start no cell that would end after S seconds of this run (it is "
                         "recorded as skipped); results are written after every cell")
    args = ap.parse_args(argv)
    cfg = dict(PRESETS[args.preset])
    for key in ("policies", "prompts", "budgets", "batches"):
        val = getattr(args, key)
        if val:
            cfg[key] = [int(x) if key != "policies" else x for x in val.split(",")]
    if args.new_tokens:
        cfg["new_tokens"] = args.new_tokens
    if cfg["new_tokens"] < 3:
        ap.error("--new-tokens must be >= 3")
    device = torch.device(cfg["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"preset {args.preset!r} needs a CUDA GPU; use --preset cpu here")
    dtype = getattr(torch, cfg["dtype"])
    from flexkv import attention
    if args.decode_probs:
        attention.DECODE_PROBS = args.decode_probs
    cfg["decode_probs"] = attention.DECODE_PROBS
    from flexkv.models import llama
    regions = args.layer_regions.split(",") if args.layer_regions else [llama.LAYER_REGIONS]
    bad = [m for m in regions if m not in llama.LAYER_REGIONS_MODES]
    if bad or not regions:
        ap.error(f"--layer-regions takes settings from {llama.LAYER_REGIONS_MODES}, got {bad}")
    cfg["layer_regions"] = regions
    t0 = time.perf_counter()
    with_hf = not args.no_hf and bool(cfg["hf"])
    model, hf = build_models(cfg["model"], device, dtype, with_hf)
    bw = copy_bandwidth(device, dtype)
    rows: list[Row] = []
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = lambda x, **k: x  # noqa: E731
    longest = [0.0]  # the longest cell so far: the estimate for the next one (--time-budget)

    def write() -> str:
        """json + md so far (after every cell: a run stopped at its limit keeps its rows)."""
        meta = stamp(argv, time.perf_counter() - t0, device)
        meta.update(preset=args.preset, bandwidth_gb_s=bw / 1e9, config=cfg,
                    complete=all(r.error is None for r in rows))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.preset}.json").write_text(
            json.dumps(dict(meta=meta, rows=[asdict(r) for r in rows]), indent=1))
        md = markdown(meta, rows, bw)
        (args.out / f"{args.preset}.md").write_text(md)
        return md

    def cell(run, impl, pol, T, budget, B) -> Row:
        """One row: run it, or record why not (time budget, out of memory, any error)."""
        elapsed = time.perf_counter() - t0
        if args.time_budget is not None and elapsed + 1.2 * longest[0] > args.time_budget:
            print(f"  skipped {impl} {pol} T={T} budget={budget} B={B}: time budget "
                  f"({elapsed:.0f} s used of {args.time_budget:.0f})", flush=True)
            return failed_row(impl, pol, T, budget, B, "skipped: time budget")
        t = time.perf_counter()
        try:
            row = run()
        except Exception as e:  # noqa: BLE001 - a failed cell must not lose the others
            import traceback
            traceback.print_exc()
            msg = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"
            row = failed_row(impl, pol, T, budget, B, msg)
        finally:
            free(device)
        longest[0] = max(longest[0], time.perf_counter() - t)
        return row

    impl = "flexkv" + ("" if args.no_compile else "+compile")
    combos = [(T, B) for T in cfg["prompts"] for B in cfg["batches"]]
    for T, B in tqdm(combos, desc="prompt x batch"):
        g = torch.Generator().manual_seed(T + B)
        ids = torch.randint(0, model.args.vocab_size, (B, T), generator=g).to(device)
        try:
            plain = plain_prefill_s(model, ids)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: the rows say so
            print(f"  plain prefill T={T} B={B} failed: {type(e).__name__}: {e}", flush=True)
            plain = float("nan")
            free(device)
        hf_after = min(cfg.get("hf_after", len(cfg["policies"])), len(cfg["policies"]))
        for i, pol in enumerate(cfg["policies"] + [None]):
            if i == hf_after and hf is not None:
                for mode in cfg["hf"]:
                    row = cell(lambda: run_hf(hf, ids, mode, cfg["new_tokens"], bw),
                               f"transformers-{mode}", "full", T, None, B)
                    row.prefill_plain_s = plain
                    rows.append(row)
                    print(f"  {row.impl} T={T} B={B}: {row.decode_ms:.2f} ms/tok", flush=True)
                    write()
            if pol is None:
                continue
            budgets = [None] if pol.startswith("full") else cfg["budgets"]
            for budget, mode in [(b, m) for b in budgets for m in regions]:
                long = cfg.get("long_steps") if pol == cfg.get("long_policy") else None
                llama.LAYER_REGIONS = mode
                label = impl + (f" (regions {mode})" if len(regions) > 1 else "")
                row = cell(lambda: run_flexkv(model, ids, pol, budget, cfg["new_tokens"],
                                              cfg["chunk"], not args.no_compile, bw, long,
                                              profile=not args.no_profile),
                           label, pol, T, budget, B)
                row.impl = label
                row.prefill_plain_s = plain
                rows.append(row)
                print(f"  {row.impl} {pol} T={T} budget={budget} B={B}: "
                      f"{row.decode_ms:.2f} ms/tok ({row.frac_floor:.0%} of floor)"
                      + (f" [{row.error}]" if row.error else ""), flush=True)
                write()
    md = write()
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
