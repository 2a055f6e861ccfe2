"""Per-policy hypothesis strategies for the generic property tests (tests/test_policies.py).

`CASES[name](draw, T)` returns the keyword arguments (budget + hyperparameters) for a prompt of
T tokens; every budget drawn is below T + new tokens so the policy really compresses.
`PROTECTED[name](kw, last_pos)` (optional) gives the positions a policy must always keep.
"""
from __future__ import annotations

from hypothesis import strategies as st

CASES = {}
PROTECTED = {}
VARIABLE_BUDGET = set()  # policies whose per-head budgets vary (checked against lc.budget only)


def case(name):
    def deco(fn):
        CASES[name] = fn
        return fn
    return deco


@case("streaming")
def _streaming(draw, T):
    n_sink = draw(st.integers(0, 4))
    return dict(budget=draw(st.integers(n_sink + 1, T - 1)), n_sink=n_sink)


PROTECTED["streaming"] = lambda kw, last: set(range(kw["n_sink"])) | set(
    range(last - (kw["budget"] - kw["n_sink"]) + 1, last + 1))


@case("h2o")
def _h2o(draw, T):
    budget = draw(st.integers(2, T - 1))
    recent = draw(st.one_of(st.none(), st.integers(1, budget - 1)))
    return dict(budget=budget, recent=recent)


PROTECTED["h2o"] = lambda kw, last: set(range(
    last - (kw["recent"] if kw["recent"] is not None else kw["budget"] // 2) + 1, last + 1))
