"""Test helpers: tiny random Hugging Face checkpoints and their transformers reference models.

`make_checkpoint(tmp_dir, model_type="llama", **config_overrides)` saves a seeded, random, fp32
`LlamaForCausalLM` / `MistralForCausalLM` with `save_pretrained` (no tokenizer) and returns its
directory; `hf_model(path)` loads it back with transformers (fp32, eval, eager attention).

The weights are drawn wider than transformers' default init (`initializer_range=0.02`) and the
RMSNorm gains are randomised too: logits then spread over several units, so greedy decoding has
clear winners (no near-ties that fp32 rounding could flip between two correct implementations),
random models do not collapse into repeating one token, and a norm loaded wrongly shows up.
"""
from __future__ import annotations

import json
import pathlib

import torch
import transformers

_TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])

# The standard tiny llama (conftest's `tiny_llama_dir`).
TINY = dict(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=512)

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


# A byte-level tokenizer built in code (one token per byte, no merges) and a minimal chat
# template: the tokenizer of the server, CLI and serving-bench tests.
BYTE_SPECIALS = ("<s>", "</s>", "<|user|>", "<|assistant|>")
BYTE_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
BYTE_VOCAB = 256 + len(BYTE_SPECIALS)


def byte_tokenizer(chat: bool = True, specials=BYTE_SPECIALS):
    """A `PreTrainedTokenizerFast`: 256 byte tokens, then `specials` (bos, eos, ...); with
    `BYTE_CHAT_TEMPLATE` where `chat`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tk = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(list(specials))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=specials[0], eos_token=specials[1])
    if chat:
        tok.chat_template = BYTE_CHAT_TEMPLATE
    assert len(tok) == 256 + len(specials)
    return tok


def sse_events(response) -> list:
    """The `data:` payloads of a server-sent-events response (httpx, streamed): JSON decoded,
    '[DONE]' kept."""
    out = []
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), line
        payload = line[len("data: "):]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def no_whitespace_bias(tok) -> dict:
    """A `logit_bias` that keeps JSON whitespace out of a structured reply (a compact one fits
    the few tokens a test gives it)."""
    return {str(i): -100 for w in " \n\t\r" for i in tok(w, add_special_tokens=False)["input_ids"]}


def make_config(model_type: str = "llama", **overrides):
    from transformers import LlamaConfig, MistralConfig

    kw = dict(TINY)
    kw.update(initializer_range=0.2, rms_norm_eps=1e-6, tie_word_embeddings=False,
              bos_token_id=None, eos_token_id=None, pad_token_id=None)
    kw.update(overrides)
    rope_theta = kw.pop("rope_theta", 10000.0)
    rope_scaling = kw.pop("rope_scaling", None)
    if _TRANSFORMERS_MAJOR >= 5:  # rope settings are spelled `rope_parameters` since 5.0
        kw["rope_parameters"] = dict(rope_scaling or {"rope_type": "default"}, rope_theta=rope_theta)
    else:
        kw.update(rope_theta=rope_theta, rope_scaling=rope_scaling)
    if model_type == "llama":
        cls = LlamaConfig
    elif model_type == "mistral":
        cls = MistralConfig
        kw.setdefault("sliding_window", None)
    else:
        raise ValueError(f"make_config: model_type must be 'llama' or 'mistral', got {model_type!r}")
    return cls(**kw)


def make_checkpoint(tmp_dir, model_type: str = "llama", seed: int = 0, max_shard_size=None,
                    **config_overrides) -> pathlib.Path:
    """Save a random tiny checkpoint into `tmp_dir` (created if needed) and return the path."""
    from transformers import LlamaForCausalLM, MistralForCausalLM

    cfg = make_config(model_type, **config_overrides)
    cls = LlamaForCausalLM if model_type == "llama" else MistralForCausalLM
    torch.manual_seed(seed)
    model = cls(cfg).to(torch.float32)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(cfg.initializer_range * torch.randn(p.shape, generator=g))
    path = pathlib.Path(tmp_dir)
    path.mkdir(parents=True, exist_ok=True)
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(str(path), **kw)
    return path


def hf_model(path, attn_implementation: str = "eager"):
    """The checkpoint at `path` loaded by transformers (fp32, eval)."""
    from transformers import AutoModelForCausalLM

    try:
        m = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                 attn_implementation=attn_implementation)
    except TypeError:  # transformers < 4.56 spelling
        m = AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32,
                                                 attn_implementation=attn_implementation)
    return m.eval()


def hf_greedy(model, input_ids: torch.Tensor, max_new_tokens: int,
              attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """transformers' greedy `generate` that never stops early: [B, T + max_new_tokens]."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    with torch.no_grad():
        return model.generate(input_ids, attention_mask=attention_mask, do_sample=False,
                              max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                              eos_token_id=None, pad_token_id=0, num_beams=1,
                              temperature=None, top_p=None, top_k=None)


def random_ids(batch: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


def canonical_cache(lc):
    """Per (row, head) of a LayerCache: (positions kept, sorted; their k; their v). Slot order
    carries no meaning, so this is what two caches are compared on."""
    out = {}
    B, H = lc.pos.shape[:2]
    for b in range(B):
        for h in range(H):
            p = lc.pos[b, h]
            idx = torch.nonzero(p >= 0).flatten()
            idx = idx[p[idx].argsort()]
            out[(b, h)] = (p[idx], lc.k[b, h, idx], lc.v[b, h, idx])
    return out


def assert_same_cache(c1, c2, atol: float = 1e-5) -> None:
    """Two KVCaches hold the same pos -> (k, v) sets in every layer, row and head."""
    assert len(c1.layers) == len(c2.layers)
    for l, (a, b) in enumerate(zip(c1.layers, c2.layers)):
        ca, cb = canonical_cache(a), canonical_cache(b)
        assert ca.keys() == cb.keys(), f"layer {l}: batch/head shapes differ"
        for key in ca:
            pa, ka, va = ca[key]
            pb, kb, vb = cb[key]
            assert torch.equal(pa, pb), f"layer {l} (row, head) {key}: kept positions differ"
            torch.testing.assert_close(ka, kb, atol=atol, rtol=0,
                                       msg=lambda m: f"layer {l} (row, head) {key}: k: {m}")
            torch.testing.assert_close(va, vb, atol=atol, rtol=0,
                                       msg=lambda m: f"layer {l} (row, head) {key}: v: {m}")


class NoCacheBuilt:
    """Context manager: fails if a KV cache is built inside it (bad input must be rejected
    before any work starts)."""

    def __enter__(self):
        from flexkv.cache import KVCache

        self.built, self._init, self._cls = [], KVCache.__init__, KVCache
        outer = self

        def spy(cache, *a, **k):
            outer.built.append(1)
            outer._init(cache, *a, **k)

        KVCache.__init__ = spy
        return self

    def __exit__(self, *exc):
        self._cls.__init__ = self._init
        if exc[0] is None or issubclass(exc[0], Exception):
            assert not self.built, "a cache was built before the input was rejected"
        return False


def decode_step_args(name: str, params: dict, n_layers: int = 2, dtype=torch.float64,
                     T: int = 24, new: int = 8, batch: int = 2, device: str = "cpu") -> tuple:
    """The arguments of one decode step (`flexkv.generate.decode_one_token`) of policy `name` on
    a tiny random model (4 query heads, 2 KV heads, head dim 16; a copy of it on another
    device), after an eager prefill of `batch` random T-token rows:
    (model, cache, policy, token, pos, active)."""
    import copy

    from flexkv.generate import prefill
    from flexkv.policies.registry import make_policy
    from flexkv.testing import tiny_model

    model = tiny_model(n_layers, 4, 2, 16, dtype=dtype)
    if torch.device(device).type != "cpu":
        model = copy.deepcopy(model).to(device)  # tiny_model's are cached: never moved
    pol = make_policy(name, **params)
    pol.validate(T, new, n_layers)
    cache = pol.build_cache(model, batch, T, new)
    ids = random_ids(batch, T, model.args.vocab_size).to(device)
    pos = torch.arange(T, device=device).expand(batch, T)
    with torch.no_grad():
        tok = prefill(model, cache, pol, ids, pos, None, new).argmax(-1)
    return (model, cache, pol, tok[:, None], pos[:, -1:] + 1,
            torch.ones(batch, dtype=torch.bool, device=device))


def decode_step_code(name: str, params: dict, device: str = "cpu", batch: int = 2,
                     dtype=torch.float32) -> tuple[str, tuple]:
    """Compile one decode step of policy `name` (2-layer tiny model) as `generate` compiles it;
    return inductor's generated code (all of it, joined) and the step's arguments."""
    from torch._inductor.utils import run_and_get_code

    from flexkv.generate import decode_compile_options, decode_one_token

    args = decode_step_args(name, params, 2, dtype, batch=batch, device=device)
    torch._dynamo.reset()
    step = torch.compile(decode_one_token, fullgraph=True, dynamic=False,
                         options=decode_compile_options(device))  # what `generate` compiles
    with torch.no_grad():
        _, code = run_and_get_code(step, *args)
    return "\n".join(code), args


def kv_sized_temporaries(name: str, params: dict, device: str = "cpu") -> list[str]:
    """Compile one decode step of policy `name` (2-layer fp32 tiny model) and return the buffer
    allocations in inductor's generated code that have a layer's K/V shape: copies of the cache
    (an in-place write has none; tests/test_compiled_writes.py)."""
    import re

    code, args = decode_step_code(name, params, device)
    assert "empty_strided" in code  # inductor's buffer allocations, which the check reads
    shape = ", ".join(map(str, args[1].layers[0].k.shape))
    return re.findall(r"\w+ = empty_strided_\w+\(\(" + shape + r"\).*", code)


def kv_sized_ops(name: str, params: dict) -> dict[str, int]:
    """Trace one decode step of policy `name` (2-layer fp32 tiny model, layers unrolled) to the
    functional aten graph the compiler starts from and count the ops, other than the
    `index_put`s that write a few slots in place and views, whose result has a layer's K/V shape: an
    operation over the whole cache (a full-width `add` or `where`), one more pass over K or V
    per layer and step (tests/test_compiled_writes.py)."""
    import collections

    from torch._dynamo.backends.common import aot_autograd

    from flexkv.generate import decode_one_token

    args = decode_step_args(name, params, 2, torch.float32)
    shape = tuple(args[1].layers[0].k.shape)
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    step = torch.compile(decode_one_token, fullgraph=True, dynamic=False,
                         backend=aot_autograd(fw_compiler=keep))
    with torch.no_grad():
        step(*args)
    assert graphs
    ops = collections.Counter(
        str(n.target) for gm in graphs for n in gm.graph.nodes
        if n.op == "call_function" and isinstance(n.meta.get("val"), torch.Tensor)
        and tuple(n.meta["val"].shape) == shape
        and not getattr(n.target, "is_view", False))   # an alias (expand, view): no pass
    assert ops["aten.index_put.default"] > 0  # the new token's write: the check sees the cache
    del ops["aten.index_put.default"]
    return dict(ops)


def decode_graphs() -> int:
    """Dynamo cache entries of the compiled decode unit, `decode_one_token` (1 = no recompiles)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from flexkv.generate import decode_one_token
    return len(_debug_get_cache_entry_list(decode_one_token.__code__))


def load_bench(name: str):
    """Import `bench/<name>.py` (not a package) as module `bench_<name>`; registered in
    sys.modules, where dataclasses look their module up."""
    import importlib.util
    import sys

    path = pathlib.Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[f"bench_{name}"] = mod
    spec.loader.exec_module(mod)
    return mod


class torch_threads:
    """Context manager: run with `n` torch intra-op threads, restoring the old count after
    (tiny models on a busy 2-core machine run several times faster on one thread)."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        self.old = torch.get_num_threads()
        torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)
        return False
