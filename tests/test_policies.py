"""Generic property tests for every policy in tests/policy_cases.py, through the public kit
`flexkv.testing.check_policy` (the same checks a researcher runs on a new policy):

- static-shape implementation == eager reference (kept positions after prefill and after each
  decode step, tokens, logits to 1e-8 on a float64 model), 20 hypothesis examples per policy;
- invariants, 10 examples: retained <= budget at every step, protected tokens (sinks, recent
  window) always kept, a random permutation of the slots after prefill changes nothing, a batch
  row equals its solo run;
- a budget holding everything is exactly `full`;
- zero recompiles across 50 compiled decode steps for every decode-time policy (slow).
"""
from __future__ import annotations

import pytest

import flexkv
from flexkv.testing import check_policy, simplest
from policy_cases import CASES, EXEMPT, PROTECTED


@pytest.mark.parametrize("name", sorted(CASES))
def test_static_equals_reference(name):
    check_policy(name, params=CASES[name], properties=["reference"], max_examples=20,
                 exempt=EXEMPT.get(name))


@pytest.mark.parametrize("name", sorted(CASES))
def test_invariants(name):
    check_policy(name, params=CASES[name], properties=["budget", "permutation", "batch"],
                 protected=PROTECTED.get(name), exempt=EXEMPT.get(name), max_examples=10)


@pytest.mark.parametrize("name", sorted(CASES))
def test_budget_holding_everything_is_full(name):
    check_policy(name, params=CASES[name], properties=["full"])


DECODE_TIME = ["full"] + sorted(n for n in CASES if flexkv.policies.make_policy(
    n, **simplest(CASES[n], 30)).decode_evicts)


@pytest.mark.slow
@pytest.mark.parametrize("name", DECODE_TIME)
def test_zero_recompiles_compiled_equals_eager(name):
    """Every decode-time policy: 50 compiled steps, one graph each, no recompiles, and the
    compiled tokens equal the eager static path's."""
    check_policy(name, params=CASES.get(name, lambda draw, T: {}), properties=["recompile"])
