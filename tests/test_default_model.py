"""The real default model (SmolLM2-135M-Instruct) loaded by name through `flexkv.load_model`:
logits equal transformers' own GGUF loading, and greedy generation with the full cache equals
transformers' greedy generation, token for token.

The model is provisioned once per session (conftest `default_model_dir`, shared with
test_provision.py) into a temporary FLEXKV_CACHE; loading it by name then finds it complete there.
"""
from __future__ import annotations

import pytest
import torch

import flexkv
from helpers import hf_greedy

pytestmark = pytest.mark.slow

NAME = "smollm2-135m-instruct"
MESSAGES = [
    {"role": "system", "content": "You are a concise, helpful assistant who answers in plain English."},
    {"role": "user", "content": "In two or three short sentences, explain why the sky looks blue "
                                "during the day but turns red and orange at sunset."},
]
# fp32 on both sides and bit-identical weights (test_provision checks the conversion to 1e-6), so
# only the order of floating-point operations differs (FlexAttention vs transformers' attention,
# RoPE and RMSNorm formulations) and the rounding accumulates through 30 layers into logits of
# magnitude ~40. Measured: ~6e-5 max abs. 1e-3 leaves ~20x margin (about 2.5e-5 of the largest
# logit) while any real discrepancy (a wrong permutation, norm, RoPE or mask) is orders larger.
LOGITS_ATOL = 1e-3


@pytest.fixture(scope="module")
def default_model(default_model_dir):
    """(model, tokenizer) from `flexkv.load_model(NAME)`, resolved through the cache root."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLEXKV_CACHE", str(default_model_dir.parent))
        mp.setenv("FLEXKV_WHEEL", str(default_model_dir / "no-such.whl"))  # must not reprovision
        model, tok = flexkv.load_model(NAME)
    assert tok is not None
    return model, tok


@pytest.fixture(scope="module")
def chat_ids(default_model):
    _, tok = default_model
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt")
    if not isinstance(ids, torch.Tensor):  # transformers 5 may return a BatchEncoding
        ids = ids["input_ids"]
    assert 40 <= ids.shape[1] <= 70, ids.shape
    return ids


def test_default_model_shape(default_model):
    model, _ = default_model
    a = model.args
    assert (a.num_hidden_layers, a.num_attention_heads, a.num_key_value_heads, a.head_dim) == (30, 9, 3, 64)
    assert a.max_position_embeddings == 8192 and a.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert next(model.parameters()).dtype == torch.float32 and not model.training


def test_logits_equal_transformers_gguf(default_model, gguf_reference, chat_ids):
    model, _ = default_model
    _, _, gguf_model = gguf_reference
    with torch.no_grad():
        ours = model(chat_ids)
        ref = gguf_model(chat_ids).logits
    assert ours.shape == ref.shape
    diff = (ours - ref).abs().max().item()
    assert diff <= LOGITS_ATOL, f"max abs logit diff {diff:.3g} > {LOGITS_ATOL}"


def test_greedy_full_equals_transformers(default_model, default_model_dir, chat_ids):
    from transformers import LlamaForCausalLM

    model, tok = default_model
    n = 32
    hf = LlamaForCausalLM.from_pretrained(str(default_model_dir), local_files_only=True).eval()
    ref = hf_greedy(hf, chat_ids, n)
    out = flexkv.generate(model, chat_ids, max_new_tokens=n, policy="full")
    T = chat_ids.shape[1]
    assert torch.equal(out.tokens, ref), (tok.decode(out.tokens[0, T:]), tok.decode(ref[0, T:]))
    # a real answer, not garbage
    assert "sky" in tok.decode(out.tokens[0, T:]).lower()
