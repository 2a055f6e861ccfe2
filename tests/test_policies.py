"""Generic property tests for every policy in tests/policy_cases.py, through the public kit
`flexkv.testing.check_policy` (the same checks a researcher runs on a new policy):

- static-shape implementation == eager reference (kept positions after prefill and after each
  decode step, tokens, logits to 1e-8 on a float64 model), 20 hypothesis examples per policy;
- invariants, 10 examples: the declared budget at every step (every head <= budget for a
  decode-time policy; a prefill-only one appends exactly one token per head per step and holds
  budget + the decoded tokens per head, or on a row's average for per-layer / per-head budgets),
  protected tokens (sinks, recent window) always kept, a random permutation of the slots after
  prefill changes nothing, a batch row equals its solo run;
- a budget holding everything is exactly `full`;
- the compiled decode step == the reference for every parameter variant of `COMPILED` (one graph
  each, no recompile or graph break over the examples; slow).
"""
from __future__ import annotations

import pytest

from flexkv.testing import MODEL_SHAPES, check_policy, models
from policy_cases import CASES, COMPILED, EXEMPT, PROTECTED, VARIABLE_BUDGET

# pyramidkv on a one-layer model keeps `max + window` (its documented choice: no pyramid to
# spread over), more than the budget; its per-layer budgets are tested in test_policy_snapkv.py
MULTI_LAYER = models([s for s in MODEL_SHAPES if s[0] > 1])
# the compiled checks' model: 2 KV heads of 2 queries, two layers, so that the compiled step's
# layer regions (flexkv.models.llama.LAYER_REGIONS, on for CPU) stamp the first layer's code out
# for the second (per-layer budgets stay unrolled)
TWO_LAYER_GQA = models([(2, 4, 2, 16)])


@pytest.mark.parametrize("name", sorted(CASES))
def test_static_equals_reference(name):
    check_policy(name, params=CASES[name], properties=["reference"], max_examples=20,
                 exempt=EXEMPT.get(name))


@pytest.mark.parametrize("name", sorted(CASES))
def test_invariants(name):
    check_policy(name, params=CASES[name], properties=["budget", "permutation", "batch"],
                 protected=PROTECTED.get(name), exempt=EXEMPT.get(name), max_examples=10,
                 varying_budgets=name in VARIABLE_BUDGET,
                 model_strategy=MULTI_LAYER if name == "pyramidkv" else None)


@pytest.mark.parametrize("name", sorted(CASES))
def test_budget_holding_everything_is_full(name):
    check_policy(name, params=CASES[name], properties=["full"])


def _variant_id(case):
    name, fixed = case
    shown = {k: v for k, v in fixed.items()
             if k in ("bias", "stochastic", "denominator", "prefill_only")}
    return name + "".join(f"-{k}={v}" for k, v in shown.items())


@pytest.mark.slow
@pytest.mark.parametrize("name, fixed", COMPILED, ids=[_variant_id(c) for c in COMPILED])
def test_compiled_equals_reference(name, fixed):
    """Each variant compiled once: over 3 drawn batches (a left-padded row at a different fill
    level, one-shot or chunked prefill, 32 new tokens) the compiled step keeps the reference's
    positions and gives its tokens and logits, as one graph without recompiles."""
    budget = {} if name.startswith("full") else dict(budget=12)
    check_policy(name, params=CASES[name], properties=["compiled"], max_examples=3,
                 model_strategy=TWO_LAYER_GQA,
                 **budget, **fixed)
