"""Bad input raises `ValueError` naming the offending argument, before any work starts."""
from __future__ import annotations

import pytest
import torch

import flexkv
from helpers import random_ids, NoCacheBuilt

V, CTX = 101, 512  # helpers.TINY


def _budget_policies() -> list[str]:
    """Registered policies that take a budget (everything but `full`, which keeps all tokens)."""
    names = [n for n in flexkv.policies.available() if not n.startswith("<") and n != "full"]
    out = []
    for n in names:
        try:
            flexkv.policies.make_policy(n, budget=8)
        except ValueError:
            continue
        out.append(n)
    return out


BUDGET_POLICIES = _budget_policies() or [
    pytest.param(None, marks=pytest.mark.skip(reason="no budget-taking policy registered yet"))]


@pytest.fixture
def ids():
    return random_ids(2, 6, V, seed=0)


def _raises(model, match, input_ids, **kw):
    """generate(...) raises ValueError matching `match` before any cache is built."""
    kw.setdefault("max_new_tokens", 4)
    with NoCacheBuilt(), pytest.raises(ValueError, match=match) as e:
        flexkv.generate(model, input_ids, **kw)
    return str(e.value)


# --------------------------------------------------------------------------- load_model
def test_unknown_model_name():
    with pytest.raises(ValueError, match="model") as e:
        flexkv.load_model("no-such-model")
    assert "no-such-model" in str(e.value) and "smollm2-135m-instruct" in str(e.value)


def test_load_model_bad_dtype_and_device(tiny_llama_dir):
    with pytest.raises(ValueError, match="dtype"):
        flexkv.load_model(tiny_llama_dir, dtype=torch.int64)
    with pytest.raises(ValueError, match="device"):
        flexkv.load_model(tiny_llama_dir, device="no-such-device")


# --------------------------------------------------------------------------- policy / budget
def test_unknown_policy(tiny_llama, ids):
    msg = _raises(tiny_llama, "policy", ids, policy="no-such-policy")
    assert "full" in msg  # names the allowed values


def test_unknown_policy_modifier(tiny_llama, ids):
    _raises(tiny_llama, "policy", ids, policy="full+no-such-modifier")


def test_unknown_policy_parameter(tiny_llama, ids):
    _raises(tiny_llama, "no_such_param", ids, policy="full", no_such_param=3)


def test_full_takes_no_budget(tiny_llama, ids):
    _raises(tiny_llama, "budget", ids, policy="full", budget=5)


def test_policy_object_with_budget(tiny_llama, ids):
    _raises(tiny_llama, "budget", ids, policy=flexkv.policies.Full(), budget=5)


@pytest.mark.parametrize("policy", BUDGET_POLICIES)
@pytest.mark.parametrize("budget", [0, -3])
def test_budget_below_one(tiny_llama, ids, policy, budget):
    msg = _raises(tiny_llama, "budget", ids, policy=policy, budget=budget)
    assert str(budget) in msg


@pytest.mark.parametrize("policy", BUDGET_POLICIES)
def test_budget_missing_or_not_int(tiny_llama, ids, policy):
    _raises(tiny_llama, "budget", ids, policy=policy)
    _raises(tiny_llama, "budget", ids, policy=policy, budget=4.5)


# --------------------------------------------------------------------------- input_ids
def test_empty_prompt(tiny_llama):
    _raises(tiny_llama, "input_ids", torch.zeros(1, 0, dtype=torch.long))


def test_float_input_ids(tiny_llama, ids):
    _raises(tiny_llama, "input_ids", ids.float())


def test_input_ids_not_a_tensor(tiny_llama, ids):
    _raises(tiny_llama, "input_ids", ids.tolist())


def test_input_ids_3d(tiny_llama, ids):
    _raises(tiny_llama, "input_ids", ids[None])


@pytest.mark.parametrize("bad", [V, V + 7, -1])
def test_ids_out_of_vocab(tiny_llama, ids, bad):
    ids = ids.clone()
    ids[1, 3] = bad
    msg = _raises(tiny_llama, "input_ids", ids)
    assert str(V - 1) in msg  # the allowed range


def test_mismatched_device(tiny_llama):
    ids = torch.zeros(1, 4, dtype=torch.long, device="meta")
    _raises(tiny_llama, "input_ids", ids)


def test_prompt_plus_new_tokens_over_context(tiny_llama):
    ids = random_ids(1, CTX - 10, V, seed=1)
    msg = _raises(tiny_llama, "max_new_tokens", ids, max_new_tokens=11)
    assert str(CTX) in msg
    # exactly filling the context is fine
    out = flexkv.generate(tiny_llama, ids, max_new_tokens=10, policy="full")
    assert out.tokens.shape == (1, CTX)


def test_prompt_longer_than_context(tiny_llama):
    msg = _raises(tiny_llama, "prompt|input_ids", random_ids(1, CTX + 1, V, seed=2), max_new_tokens=1)
    assert str(CTX) in msg


# --------------------------------------------------------------------------- generation args
@pytest.mark.parametrize("n", [0, -1, 2.0])
def test_max_new_tokens(tiny_llama, ids, n):
    _raises(tiny_llama, "max_new_tokens", ids, max_new_tokens=n)


@pytest.mark.parametrize("t", [-0.5, -1e-9])
def test_negative_temperature(tiny_llama, ids, t):
    _raises(tiny_llama, "temperature", ids, temperature=t)


@pytest.mark.parametrize("p", [0, 0.0, 1.5, -0.2])
def test_top_p_out_of_range(tiny_llama, ids, p):
    _raises(tiny_llama, "top_p", ids, temperature=1.0, top_p=p)


@pytest.mark.parametrize("k", [0, -2, 1.5])
def test_bad_top_k(tiny_llama, ids, k):
    _raises(tiny_llama, "top_k", ids, temperature=1.0, top_k=k)


@pytest.mark.parametrize("c", [0, -4, 2.5])
def test_bad_prefill_chunk(tiny_llama, ids, c):
    _raises(tiny_llama, "prefill_chunk", ids, prefill_chunk=c)


# --------------------------------------------------------------------------- attention_mask
def test_right_padding_mask(tiny_llama, ids):
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # right padding
    _raises(tiny_llama, "attention_mask", ids, attention_mask=mask)


def test_mask_with_a_hole(tiny_llama, ids):
    mask = torch.ones_like(ids)
    mask[1, 2] = 0  # 1 1 0 1 1 1: not left padding
    _raises(tiny_llama, "attention_mask", ids, attention_mask=mask)


def test_mask_wrong_shape(tiny_llama, ids):
    _raises(tiny_llama, "attention_mask", ids, attention_mask=torch.ones(2, 5, dtype=torch.long))


def test_mask_not_binary(tiny_llama, ids):
    _raises(tiny_llama, "attention_mask", ids, attention_mask=torch.full_like(ids, 2))


def test_mask_all_padding_row(tiny_llama, ids):
    mask = torch.ones_like(ids)
    mask[1] = 0
    _raises(tiny_llama, "attention_mask", ids, attention_mask=mask)


def test_valid_left_padding_mask_is_accepted(tiny_llama, ids):
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    out = flexkv.generate(tiny_llama, ids, max_new_tokens=2, attention_mask=mask.bool())
    assert out.tokens.shape == (2, ids.shape[1] + 2)


# --------------------------------------------------------------------------- more argument types
@pytest.mark.parametrize("eos", [-1, V, "2", [], [3, V], 2.0, True])
def test_bad_eos_token_id(tiny_llama, ids, eos):
    _raises(tiny_llama, "eos_token_id", ids, eos_token_id=eos)


@pytest.mark.parametrize("kw", [dict(max_new_tokens=True), dict(top_k=True),
                                dict(temperature=float("nan")), dict(temperature=float("inf")),
                                dict(temperature="1"), dict(prefill_chunk=True)])
def test_bools_nan_and_strings_rejected(tiny_llama, ids, kw):
    _raises(tiny_llama, next(iter(kw)), ids, **kw)


@pytest.mark.parametrize("policy", BUDGET_POLICIES)
def test_budget_over_context(tiny_llama, ids, policy):
    _raises(tiny_llama, "budget", ids, policy=policy, budget=CTX + 1)


@pytest.mark.parametrize("n", [0, -1, 5, 2.0, "2", None])
def test_bad_output_logits(tiny_llama, ids, n):
    """A bool (every step or none) or the first n steps, n in [1, max_new_tokens = 4]."""
    assert "[1, max_new_tokens = 4]" in _raises(tiny_llama, "output_logits", ids, output_logits=n)


def test_output_logits_first_n_steps(tiny_llama, ids):
    """`output_logits=n` keeps the first n steps' logits, equal to those of `output_logits=True`."""
    every = flexkv.generate(tiny_llama, ids, max_new_tokens=5, output_logits=True)
    first = flexkv.generate(tiny_llama, ids, max_new_tokens=5, output_logits=3)
    assert every.logits.shape[:2] == (2, 5) and first.logits.shape[:2] == (2, 3)
    assert torch.equal(first.logits, every.logits[:, :3])
    assert torch.equal(first.tokens, every.tokens)
    assert flexkv.generate(tiny_llama, ids, max_new_tokens=5).logits is None
