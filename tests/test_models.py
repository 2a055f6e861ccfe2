"""The standalone LLaMA / Mistral models against transformers: random tiny checkpoints saved with
`save_pretrained`, loaded back through `flexkv.load_model(dir)`, plain causal forward logits equal
to transformers' in fp32 (max abs diff <= 1e-4)."""
from __future__ import annotations

import json
import tempfile

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import flexkv
from helpers import LLAMA3_SCALING, hf_model, make_checkpoint, random_ids

ATOL = 1e-4


def _logits_match(path, ids, atol=ATOL):
    model, tok = flexkv.load_model(path)
    assert tok is None  # save_pretrained without a tokenizer
    ref = hf_model(path)
    with torch.no_grad():
        ours = model(ids)
        theirs = ref(ids).logits
    assert ours.dtype == torch.float32 and ours.shape == theirs.shape
    diff = (ours - theirs).abs().max().item()
    assert diff <= atol, f"max abs logit diff {diff:.3g} > {atol}"
    return model


@st.composite
def yarn_scaling(draw, factor: float):
    """A YaRN `rope_scaling` with each optional setting given or not, as configs carry them."""
    sc = {"rope_type": "yarn", "factor": factor,
          "original_max_position_embeddings": draw(st.sampled_from([16, 32, 64]))}
    if draw(st.booleans()):
        sc.update(beta_fast=draw(st.sampled_from([8.0, 32.0])), beta_slow=draw(st.sampled_from([1.0, 2.0])))
    extra = draw(st.sampled_from(["none", "attention_factor", "mscale", "truncate"]))
    if extra == "attention_factor":
        sc["attention_factor"] = draw(st.sampled_from([0.9, 1.3]))
    elif extra == "mscale":
        sc.update(mscale=0.8, mscale_all_dim=0.5)
    elif extra == "truncate":
        sc["truncate"] = False
    return sc


@st.composite
def configs(draw):
    model_type = draw(st.sampled_from(["llama", "mistral"]))
    n_kv = draw(st.sampled_from([1, 2]))
    ratio = draw(st.sampled_from([1, 2, 4]))
    seq = draw(st.integers(8, 40))
    cfg = dict(
        num_key_value_heads=n_kv,
        num_attention_heads=n_kv * ratio,
        head_dim=draw(st.sampled_from([32, 64])),
        hidden_size=draw(st.sampled_from([48, 64, 96])),
        intermediate_size=draw(st.sampled_from([64, 128])),
        num_hidden_layers=draw(st.integers(1, 3)),
        tie_word_embeddings=draw(st.booleans()),
        rope_theta=draw(st.sampled_from([10000.0, 500000.0, 1e6, 123.0])),
    )
    kind = draw(st.sampled_from(["default", "llama3", "linear", "yarn"]))
    factor = draw(st.sampled_from([2.0, 8.0, 32.0]))
    if kind == "llama3":
        cfg["rope_scaling"] = dict(LLAMA3_SCALING, factor=factor)
    elif kind == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": factor}
    elif kind == "yarn":
        cfg["rope_scaling"] = draw(yarn_scaling(factor))
    if model_type == "mistral":
        cfg["sliding_window"] = draw(st.integers(1, seq - 1))  # shorter than the sequence
    return model_type, cfg, seq, draw(st.integers(1, 2)), draw(st.integers(0, 2**16))


@settings(max_examples=8, deadline=None)  # derandomized under CI (conftest)
@given(configs())
# the cases the issue names, always run (hypothesis adds random combinations of them)
@example(("llama", dict(num_key_value_heads=1, num_attention_heads=4, head_dim=64, hidden_size=64,
                        intermediate_size=64, num_hidden_layers=2, tie_word_embeddings=True,
                        rope_theta=500000.0, rope_scaling=LLAMA3_SCALING), 33, 2, 1))
@example(("llama", dict(num_key_value_heads=2, num_attention_heads=4, head_dim=32, hidden_size=96,
                        intermediate_size=128, num_hidden_layers=2, tie_word_embeddings=False,
                        rope_theta=10000.0), 20, 1, 2))
@example(("mistral", dict(num_key_value_heads=2, num_attention_heads=2, head_dim=32,
                          hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                          tie_word_embeddings=False, rope_theta=1e6, sliding_window=7), 30, 2, 3))
@example(("llama", dict(num_key_value_heads=2, num_attention_heads=4, head_dim=32, hidden_size=64,
                        intermediate_size=64, num_hidden_layers=2, tie_word_embeddings=False,
                        rope_theta=10000.0, rope_scaling={"rope_type": "linear", "factor": 4.0}),
          40, 2, 4))
@example(("mistral", dict(num_key_value_heads=1, num_attention_heads=2, head_dim=32,
                          hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                          tie_word_embeddings=False, rope_theta=10000.0, sliding_window=9,
                          rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                        "original_max_position_embeddings": 32}), 40, 2, 5))
def test_logits_match_transformers(case):
    model_type, cfg, seq, batch, seed = case
    with tempfile.TemporaryDirectory() as d:
        path = make_checkpoint(d, model_type, seed=seed, **cfg)
        model = _logits_match(path, random_ids(batch, seq, 101, seed=seed))
    assert model.args.model_type == model_type
    assert model.args.sliding_window == cfg.get("sliding_window")
    assert model.args.tie_word_embeddings == cfg["tie_word_embeddings"]
    if cfg["tie_word_embeddings"]:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_load_model_returns_eval_fp32_model(tiny_llama_dir):
    model, tok = flexkv.load_model(tiny_llama_dir)
    assert tok is None
    assert not model.training
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    a = model.args
    assert (a.vocab_size, a.hidden_size, a.num_hidden_layers, a.num_attention_heads,
            a.num_key_value_heads, a.head_dim, a.max_position_embeddings) == (101, 64, 2, 4, 2, 16, 512)


def test_sharded_checkpoint_loads(tmp_path):
    path = make_checkpoint(tmp_path / "sharded", "llama", seed=5, max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").is_file()
    assert not (path / "model.safetensors").exists()
    assert len(list(path.glob("model-*.safetensors"))) > 1
    _logits_match(path, random_ids(2, 17, 101, seed=5))


def test_batch_of_one_and_1d_shapes(tiny_llama, tiny_llama_hf):
    ids = random_ids(1, 1, 101, seed=9)  # a single token
    with torch.no_grad():
        diff = (tiny_llama(ids) - tiny_llama_hf(ids).logits).abs().max().item()
    assert diff <= ATOL


def test_unsupported_model_type_raises(tmp_path):
    path = make_checkpoint(tmp_path / "gpt2ish", "llama", seed=1)
    cfg_file = path / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["model_type"] = "gpt2"
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model_type") as e:
        flexkv.load_model(path)
    msg = str(e.value)
    assert "gpt2" in msg and "llama" in msg and "mistral" in msg, msg


def test_missing_config_raises(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        flexkv.load_model(tmp_path)


@pytest.mark.parametrize("scaling, needle", [
    ({"rope_type": "dynamic", "factor": 2.0}, "'dynamic' is not supported (supported: default, linear, llama3, yarn)"),
    ({"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}, "'longrope' is not supported"),
    ({"rope_type": "linear"}, "'linear' needs 'factor'"),
])
def test_unsupported_or_incomplete_rope_scaling_raises(tmp_path, scaling, needle):
    """A checkpoint whose RoPE flexkv does not compute as transformers does is refused at load
    with the type (or the missing setting) named, never run with other frequencies."""
    path = make_checkpoint(tmp_path / "rope", "llama", seed=1)
    cfg_file = path / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.pop("rope_parameters", None)
    cfg.update(rope_theta=10000.0, rope_scaling=scaling)
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="rope_scaling") as e:
        flexkv.load_model(path)
    assert needle in str(e.value), str(e.value)


def test_yarn_without_its_original_context_reads_it_as_transformers_does(tmp_path):
    """A YaRN config that leaves out `original_max_position_embeddings` takes the config's
    top-level one, else `max_position_embeddings`, as transformers does: the same logits."""
    for top in (None, 32):
        path = make_checkpoint(tmp_path / f"yarn{top}", "llama", seed=2,
                               rope_scaling={"rope_type": "yarn", "factor": 4.0})
        cfg_file = path / "config.json"
        cfg = json.loads(cfg_file.read_text())
        for key in ("rope_parameters", "rope_scaling"):
            if cfg.get(key):
                cfg[key].pop("original_max_position_embeddings", None)
        if top is not None:
            cfg["original_max_position_embeddings"] = top
        cfg_file.write_text(json.dumps(cfg))
        model = _logits_match(path, random_ids(2, 40, 101, seed=2))
        want = top or cfg["max_position_embeddings"]
        assert model.args.rope_scaling["original_max_position_embeddings"] == want


def test_a_repo_id_in_the_local_hugging_face_cache_loads(tmp_path, monkeypatch):
    """`load_model("org/name")` takes the snapshot the local Hugging Face cache holds (as `hf
    download` leaves it), fetching nothing; a repo id not in it is a ValueError that says how
    to get it."""
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--some-org--tiny.llama"
    make_checkpoint(repo / "snapshots" / "0123abcd", "llama", seed=4)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    model = _logits_match(repo / "snapshots" / "0123abcd", random_ids(1, 9, 101, seed=4))
    ours, _ = flexkv.load_model("some-org/tiny.llama")
    ids = random_ids(2, 12, 101, seed=5)
    with torch.no_grad():
        assert torch.equal(ours(ids), model(ids))
    with pytest.raises(ValueError, match=r"not in the local Hugging Face cache .*hf download some-org/other"):
        flexkv.load_model("some-org/other")
    with pytest.raises(ValueError, match="no such directory"):
        flexkv.load_model("./not/a/dir/at/all")


@pytest.mark.parametrize("scaling", [{"rope_type": "linear", "factor": 4.0},
                                     {"rope_type": "yarn", "factor": 16.0,
                                      "original_max_position_embeddings": 32}])
def test_scaled_rope_greedy_equals_transformers(tmp_path, scaling):
    """With a scaled RoPE the cached decode path (the frequencies and YaRN's factor applied to
    each new token's query and key) gives transformers' greedy tokens."""
    from helpers import hf_greedy

    path = make_checkpoint(tmp_path / "rope", "llama", seed=3, rope_scaling=scaling)
    model, _ = flexkv.load_model(path)
    ids = random_ids(2, 20, 101, seed=1)
    want = hf_greedy(hf_model(path), ids, 12)
    assert torch.equal(flexkv.generate(model, ids, max_new_tokens=12).tokens, want)
