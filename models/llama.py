"""A standalone LLaMA-family decoder (gpt-fast sized) on FlexAttention.

Parameter names follow Hugging Face's `LlamaForCausalLM` so checkpoints load with a plain
`load_state_dict` (and `state_dict()` gives them back), though q, k and v are held as one
`qkv_proj` and gate and up as one `gate_up_proj` (`StackedLinear`'s hooks translate).
Attention goes through `flexkv.attention`; the KV cache and the compression policy are passed
explicitly through the forward (the model holds neither), so a serving engine can prefill one
cache row while the others decode.

Three entry points:
- `model(input_ids)`: plain causal forward, logits `[B, T, V]`.
- `model.prefill(input_ids, pos, cache, policy, info)`: writes (and compresses) `cache`.
- `model.decode(token, pos, cache, policy, active)`: one decode step over `cache`.
"""
from __future__ import annotations

import functools
import inspect
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flexkv import attention, cpu_gemm
from flexkv.distributed import SINGLE


@dataclass
class ModelArgs:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # Mistral: keys with q_pos - k_pos >= window are masked
    vocab_shards: int = 1  # tensor parallel: embedding and lm_head rows split over this many ranks
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        names = set(cls.__dataclass_fields__) - {"extra"}
        kw = {k: cfg[k] for k in names if k in cfg}
        rope_params = cfg.get("rope_parameters") or {}  # transformers >= 5 nests rope settings
        if "rope_theta" not in kw and "rope_theta" in rope_params:
            kw["rope_theta"] = rope_params["rope_theta"]
        scaling = kw.get("rope_scaling") or rope_params
        rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
        kw["rope_scaling"] = dict(scaling) if rope_type not in ("default", None) else None
        if rope_type in ("llama3", "yarn"):   # the pretraining context, where a config omits it,
            kw["rope_scaling"].setdefault(    # as transformers reads it
                "original_max_position_embeddings",
                cfg.get("original_max_position_embeddings", cfg.get("max_position_embeddings")))
        return cls(**kw)


ROPE_TYPES = ("default", "linear", "llama3", "yarn")   # rope_scaling types, as transformers'


def _rope_setting(sc: dict, name: str, kind: str):
    if sc.get(name) is None:
        raise ValueError(f"rope_scaling of type {kind!r} needs {name!r}, got {sc}")
    return sc[name]


def rope_inv_freq(args: ModelArgs) -> Tensor:
    """The RoPE frequencies [head_dim / 2] (fp32) of `args.rope_theta` and `args.rope_scaling`,
    computed as transformers' `modeling_rope_utils` computes them: default, `linear` (positions
    divided by `factor`), `llama3` (Llama 3.1's per-band scaling), `yarn` (YaRN's ramp between
    interpolated and extrapolated bands; its cos/sin factor is `rope_attention_factor`). Others
    (`dynamic`, whose frequencies change with the sequence's length, `longrope`) are a
    ValueError."""
    d = args.head_dim
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    sc = args.rope_scaling
    if sc is None:
        return inv.float()
    kind = sc.get("rope_type", sc.get("type"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: "
                         f"{', '.join(ROPE_TYPES)})")
    if kind == "default":
        return inv.float()
    if kind == "linear":
        return (inv / _rope_setting(sc, "factor", kind)).float()
    if kind == "yarn":
        return _yarn_inv_freq(args, inv, sc)
    factor = _rope_setting(sc, "factor", kind)
    lo, hi = _rope_setting(sc, "low_freq_factor", kind), _rope_setting(sc, "high_freq_factor", kind)
    old_ctx = _rope_setting(sc, "original_max_position_embeddings", kind)
    low_wl, high_wl = old_ctx / lo, old_ctx / hi
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wl, inv / factor, inv)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = (wavelen >= high_wl) & (wavelen <= low_wl)
    return torch.where(is_mid, mid, scaled).float()


def _yarn_factor(args: ModelArgs, sc: dict) -> float:
    old_ctx = _rope_setting(sc, "original_max_position_embeddings", "yarn")
    factor = sc.get("factor")
    return args.max_position_embeddings / old_ctx if factor is None else factor


def _yarn_inv_freq(args: ModelArgs, inv: Tensor, sc: dict) -> Tensor:
    """YaRN (arXiv 2309.00071): dimensions that turn fewer than `beta_slow` times over the
    original context are interpolated (divided by `factor`), those that turn more than
    `beta_fast` times kept, a linear ramp between."""
    d, base = args.head_dim, args.rope_theta
    factor = _yarn_factor(args, sc)
    old_ctx = sc["original_max_position_embeddings"]
    beta_fast, beta_slow = sc.get("beta_fast") or 32, sc.get("beta_slow") or 1

    def dim_of(rotations: float) -> float:   # the dimension that turns `rotations` times
        return d * math.log(old_ctx / (rotations * 2 * math.pi)) / (2 * math.log(base))
    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if sc.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(d // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp          # 1: extrapolated (kept), 0: interpolated
    return (inv / factor * (1 - keep) + inv * keep).float()


def rope_attention_factor(args: ModelArgs) -> float:
    """The factor RoPE's cos and sin are scaled by (so every score by its square): YaRN's
    `attention_factor` (given, else 0.1 ln(factor) + 1, or the ratio of the two `mscale` terms
    where both are given, as transformers computes it); 1 for the other types."""
    sc = args.rope_scaling
    if not sc or sc.get("rope_type", sc.get("type")) != "yarn":
        return 1.0
    if sc.get("attention_factor") is not None:
        return float(sc["attention_factor"])
    factor = _yarn_factor(args, sc)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
    if sc.get("mscale") and sc.get("mscale_all_dim"):
        return float(mscale(factor, sc["mscale"]) / mscale(factor, sc["mscale_all_dim"]))
    return float(mscale(factor))


def rope_cos_sin(pos: Tensor, inv_freq: Tensor, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """pos: [B, T] (int) -> (cos, sin), each [B, 1, T, D] fp32, laid out for `apply_rope`:
    `cos` is (cos, cos), `sin` is (-sin, sin) over the two halves, both times `scale`
    (`rope_attention_factor`). Made once per forward and shared by every layer (eager decode on
    CPU pays per op: bench/NOTES.md, entries 12-13)."""
    freqs = pos.clamp(min=0).to(torch.float32)[:, None, :, None] * inv_freq
    cos, sin = freqs.cos(), freqs.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def _f32(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float32 else x.float()


def apply_rope(x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
    """x: [B, H, T, D]; rope: `rope_cos_sin`'s. Rotate-half convention (HF), in fp32:
    (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), as `x * cos + roll(x, D/2) * sin` (four ops;
    bit for bit the same sums, `a + b * -s` being `a - b * s` in IEEE arithmetic)."""
    cos, sin = rope
    xf = _f32(x)
    out = xf * cos + xf.roll(x.shape[-1] // 2, dims=-1) * sin
    return out if out.dtype == x.dtype else out.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = _f32(x)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * (xf if xf.dtype == x.dtype else xf.to(x.dtype))


class Linear(nn.Linear):
    """`nn.Linear` whose eager CPU decode products (fp32 at 4-128 rows, bf16 at 1-128) run on a
    weight packed once (`flexkv.cpu_gemm`); everything else is `F.linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return cpu_gemm.linear(x, self.weight, self.bias)


class StackedLinear(Linear):
    """Several bias-free projections of the same input as one Linear, their weights stacked by
    rows in `parts`' order (name -> output features): one gemm instead of several (gpt-fast's
    `wqkv`). Checkpoints and the parent's `state_dict()` keep the parts' own names
    (`<parent>.<part>.weight`): `attach` registers the parent's hooks that join them on load
    and split them (views of the one weight) on save. Returns the parts' outputs (views)."""

    def __init__(self, in_features: int, parts: dict[str, int]):
        super().__init__(in_features, sum(parts.values()), bias=False)
        self.parts = dict(parts)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return super().forward(x).split(list(self.parts.values()), dim=-1)

    def attach(self, parent: nn.Module, name: str) -> None:
        """Make this `parent.<name>`, with the hooks that keep the parts' names."""
        setattr(parent, name, self)
        parent.register_load_state_dict_pre_hook(functools.partial(_join_parts, name))
        parent.register_state_dict_post_hook(functools.partial(_split_parts, name))


def _join_parts(name, parent, state_dict, prefix, *_):
    """Load hook: the parts' weights -> `<name>.weight`, stacked by rows."""
    keys = [f"{prefix}{part}.weight" for part in getattr(parent, name).parts]
    if all(k in state_dict for k in keys):
        state_dict[f"{prefix}{name}.weight"] = torch.cat([state_dict.pop(k) for k in keys])


def _split_parts(name, parent, state_dict, prefix, _):
    """state_dict hook: `<name>.weight` -> the parts' names (row slices: views)."""
    stacked = getattr(parent, name)
    w = state_dict.pop(f"{prefix}{name}.weight")
    for part, rows in zip(stacked.parts, w.split(list(stacked.parts.values()))):
        state_dict[f"{prefix}{part}.weight"] = rows


class Attention(nn.Module):
    shard = SINGLE  # tensor parallel (flexkv.distributed): args hold this rank's heads

    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv, self.head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.window = args.sliding_window
        d, hd = args.hidden_size, args.head_dim
        # q, k and v as one gemm: the small k and v ones ran at ~40 % of the H200's bandwidth
        # (bench/NOTES.md session 22); checkpoints keep q_proj / k_proj / v_proj
        StackedLinear(d, {"q_proj": self.n_head * hd, "k_proj": self.n_kv * hd,
                          "v_proj": self.n_kv * hd}).attach(self, "qkv_proj")
        self.o_proj = Linear(self.n_head * hd, d, bias=False)

    def _qkv(self, x: Tensor, rope: tuple[Tensor, Tensor]):
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        return apply_rope(q, rope), apply_rope(k, rope), v

    def _out(self, o: Tensor) -> Tensor:  # o: [B, H, T, D]
        B, _, T, _ = o.shape
        return self.shard.all_reduce(self.o_proj(o.transpose(1, 2).reshape(B, T, -1)))

    def forward(self, x: Tensor, pos: Tensor, rope: tuple[Tensor, Tensor], mode: str, lc=None,
                policy=None, extra=None, last_only: bool = False) -> Tensor:
        """mode: "plain" (no cache), "prefill" (write/compress `lc`; extra = the ChunkInfo),
        "decode" (one token per row; extra = the `active` rows [B] bool). `last_only`: the
        output of the last position only, [B, 1, d] (the cache still gets every token)."""
        q, k, v = self._qkv(x, rope)
        if mode == "plain":
            o = attention.prefill_attention(q, k, v, pos, pos, window=self.window,
                                            keys_end_with_queries=True)
        elif mode == "prefill":
            o = policy.prefill_layer(self, lc, q, k, v, pos, extra)
        else:
            o = policy.decode_layer(self, lc, q, k, v, pos, extra)
        return self._out(o[:, :, -1:] if last_only else o)


class FeedForward(nn.Module):
    shard = SINGLE

    def __init__(self, args: ModelArgs):
        super().__init__()
        # gate and up as one gemm (one launch and one gemm tail fewer a layer)
        d, f = args.hidden_size, args.intermediate_size
        StackedLinear(d, {"gate_proj": f, "up_proj": f}).attach(self, "gate_up_proj")
        self.down_proj = Linear(f, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x)
        return self.shard.all_reduce(self.down_proj(F.silu(gate) * up))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(args, layer_idx)
        self.mlp = FeedForward(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x: Tensor, pos: Tensor, rope: tuple[Tensor, Tensor], mode: str, lc=None,
                policy=None, extra=None, last_only: bool = False) -> Tensor:
        a = self.self_attn(self.input_layernorm(x), pos, rope, mode, lc, policy, extra, last_only)
        h = (x[:, -1:] if last_only else x) + a
        return h + self.mlp(self.post_attention_layernorm(h))


# ---------------------------------------------------------------------------- layer regions
# Hierarchical compilation of the decode step: each decoder-layer call is a
# `torch.compiler.nested_compile_region`, so the compiler traces and compiles the first layer and
# stamps that code out for every later layer whose inputs match (shapes, dtypes, and the guards
# of the first trace, e.g. a policy's Python branch on the layer index: a layer that fails them
# is traced and compiled on its own, so the result is always that of the unrolled step). Still
# one graph per step, one CUDA graph around it. Measured on CPU (default model, 30 layers):
# compile + first step 20-48 s against 70-102 s, the steady step 4-8 % slower (inductor's CPU
# wrapper checks each region call's inputs; bench/NOTES.md session 14). Used only where every
# layer's cache has the same buffers (pyramidkv's per-layer capacities stay unrolled: its regions
# would be compiled layer by layer, slower than the unrolled step).
# LAYER_REGIONS: "auto" (on for CPU; off for CUDA until a GPU run has checked it under CUDA
# graphs, bench/GPU.md), "on", "off"; the environment variable FLEXKV_LAYER_REGIONS sets the
# default. Set it before the first compiled step (dynamo guards on it: changing it recompiles).
LAYER_REGIONS = os.environ.get("FLEXKV_LAYER_REGIONS", "auto")
LAYER_REGIONS_MODES = ("auto", "on", "off")


def _call_layer(layer, x, pos, rope, mode, lc, policy, extra):
    return layer(x, pos, rope, mode, lc, policy, extra)


def _region(fn):
    """`fn` as a nested compile region (as is where this torch has none); a region may be traced
    up to once per layer before the compiler gives up reusing it (a policy branching on every
    layer index), so allow that many entries."""
    ncr = getattr(torch.compiler, "nested_compile_region", None)
    if ncr is None:  # pragma: no cover - torch < 2.8
        return fn
    if "max_reuse_entries" in inspect.signature(ncr).parameters:
        return ncr(fn, max_reuse_entries=1024)
    return ncr(fn)  # pragma: no cover - an older torch (its default entry limit)


_layer_region = _region(_call_layer)


def layer_regions_on(device: torch.device) -> bool:
    """Whether a compiled decode step on `device` wraps its layers in nested compile regions."""
    if LAYER_REGIONS not in LAYER_REGIONS_MODES:
        raise ValueError(f"flexkv.models.llama.LAYER_REGIONS must be one of {LAYER_REGIONS_MODES}, "
                         f"got {LAYER_REGIONS!r}")
    return LAYER_REGIONS == "on" or (LAYER_REGIONS == "auto" and device.type != "cuda")


def uniform_layers(cache) -> bool:
    """Every layer's cache holds the same buffers (names, shapes, dtypes)."""
    def layout(lc):
        return [(n, b.shape, b.dtype) for n, b in lc.named_buffers()]
    first = layout(cache.layers[0])
    return all(layout(lc) == first for lc in cache.layers[1:])


class Backbone(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size // args.vocab_shards, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class Transformer(nn.Module):
    """LLaMA decoder. `pos` tensors hold each token's position; `-1` marks left padding."""

    shard = SINGLE  # `flexkv.load_model(..., tp=True)`: this rank's part (flexkv.distributed)

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Backbone(args)
        self.lm_head = Linear(args.hidden_size, args.vocab_size // args.vocab_shards, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)
        self.rope_scale = rope_attention_factor(args)   # YaRN's cos/sin factor (else 1)

    @property
    def layers(self):
        return self.model.layers

    def _run(self, input_ids: Tensor, pos: Tensor, mode: str, cache=None, policy=None, extra=None,
             last_only: bool = False) -> Tensor:
        x = self.embed(input_ids)
        rope = rope_cos_sin(pos, self.inv_freq, self.rope_scale)
        call = _call_layer
        if (mode == "decode" and torch.compiler.is_compiling() and layer_regions_on(x.device)
                and uniform_layers(cache)):
            call = _layer_region
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            lc = None if cache is None else cache.layers[i]
            if last_only and i == last:
                # only the last position's output is read: the last layer's o_proj and MLP run
                # on that one token (its K/V, scores and cache still cover the whole chunk)
                x = layer(x, pos, rope, mode, lc, policy, extra, last_only=True)
            else:
                x = call(layer, x, pos, rope, mode, lc, policy, extra)
        return self.logits(self.model.norm(x))

    def embed(self, input_ids: Tensor) -> Tensor:
        """Token embeddings. Vocab-parallel (`args.vocab_shards` > 1, tensor parallel): this rank
        holds rows [rank * n, (rank + 1) * n); other ranks' ids embed to 0 here and the ranks'
        parts are summed (exact: one non-zero term per token)."""
        if self.args.vocab_shards == 1:
            return self.model.embed_tokens(input_ids)
        n = self.model.embed_tokens.num_embeddings
        local = input_ids - self.shard.rank * n
        mine = (local >= 0) & (local < n)
        x = self.model.embed_tokens(local.clamp(0, n - 1))
        return self.shard.all_reduce(torch.where(mine[..., None], x, torch.zeros_like(x)))

    def logits(self, h: Tensor) -> Tensor:
        """[..., vocab_size] logits; vocab-parallel: this rank's columns, then every rank's
        gathered in vocabulary order (each element is computed as the one-rank head would)."""
        out = self.lm_head(h)
        return out if self.args.vocab_shards == 1 else self.shard.gather(out, dim=-1)

    def forward(self, input_ids: Tensor, pos: Tensor | None = None) -> Tensor:
        if pos is None:
            B, T = input_ids.shape
            pos = torch.arange(T, device=input_ids.device).expand(B, T)
        return self._run(input_ids, pos, "plain")

    def prefill(self, input_ids: Tensor, pos: Tensor, cache, policy, info) -> Tensor:
        """A prompt chunk through `cache` (compressed by `policy`; `info`: a
        `flexkv.policies.ChunkInfo`). Logits of the chunk's last position only, [B, 1, V]; of
        every position, [B, C, V], with `info.all_logits` (a prompt's logprobs)."""
        return self._run(input_ids, pos, "prefill", cache, policy, info, last_only=not info.all_logits)

    def decode(self, token: Tensor, pos: Tensor, cache, policy, active: Tensor) -> Tensor:
        """token, pos: [B, 1]; active: [B] bool (idle rows change nothing). -> [B, 1, V]."""
        return self._run(token, pos, "decode", cache, policy, active)
