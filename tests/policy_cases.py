"""Per-policy hypothesis strategies for the generic property tests (tests/test_policies.py).

`CASES[name](draw, T)` returns the keyword arguments (budget + hyperparameters) for a prompt of
T tokens; every budget drawn is below T + new tokens so the policy really compresses.
`PROTECTED[name](kw, last_pos)` (optional) gives the positions a policy must always keep;
`EXEMPT[name](kw)` (optional) the `flexkv.testing` properties that do not apply to a draw.
tests/test_policies.py runs `flexkv.testing.check_policy` on every entry.
"""
from __future__ import annotations

from hypothesis import strategies as st

CASES = {}
PROTECTED = {}
EXEMPT = {}
VARIABLE_BUDGET = set()  # policies whose per-head budgets vary (checked against lc.budget only)


def case(name):
    def deco(fn):
        CASES[name] = fn
        return fn
    return deco


@case("streaming")
def _streaming(draw, T):
    n_sink = draw(st.integers(0, min(4, T - 2)))  # T >= 4 (a prompt of 8+ tokens, half padding)
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


@case("tova")
def _tova(draw, T):
    return dict(budget=draw(st.integers(1, T - 1)))


@case("keydiff")
def _keydiff(draw, T):
    # budget >= 2: with budget 1 a decode step scores 2 keys, which are always exactly equally
    # similar to their mean (a tie in exact arithmetic that rounding decides)
    budget = draw(st.integers(2, T - 1))
    return dict(budget=budget, window=draw(st.integers(0, budget - 1)))


PROTECTED["keydiff"] = lambda kw, last: set(range(last - kw["window"] + 1, last + 1))


@case("laprox")
def _laprox(draw, T):
    window = draw(st.integers(1, max(1, min(6, T - 2))))
    budget = draw(st.integers(window + 1, T - 1))
    return dict(budget=budget, window=window, max_head_factor=draw(st.sampled_from([1, 1.5, 4])),
                normalize=draw(st.sampled_from(["layer", "none", "output"])),
                score=draw(st.sampled_from(["norm_product", "frobenius"])),
                kernel=draw(st.sampled_from([7, 1, 3])))


PROTECTED["laprox"] = lambda kw, last: set(range(last - kw["window"] + 1, last + 1))
VARIABLE_BUDGET.add("laprox")


@case("weightedkv")
def _weightedkv(draw, T):
    n_sink = draw(st.integers(0, min(2, T - 3)))
    window = draw(st.integers(1, max(1, min(6, T - 2 - n_sink))))
    return dict(budget=draw(st.integers(window + n_sink + 1, T - 1)), window=window,
                n_sink=n_sink, bias=draw(st.sampled_from([None, "log_mass"])))


PROTECTED["weightedkv"] = lambda kw, last: set(range(kw["n_sink"])) | set(
    range(last - kw["window"] + 1, last + 1))


@case("cam")
def _cam(draw, T):
    import torch

    n_sink = draw(st.integers(0, min(4, T - 2)))
    stochastic = draw(st.booleans())
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16))) if stochastic else None
    return dict(budget=draw(st.integers(n_sink + 1, T - 1)), n_sink=n_sink,
                merge_tokens=draw(st.integers(1, 6)), stochastic=stochastic, gate_generator=gen,
                bias=draw(st.sampled_from([None, "log_mass"])),
                denominator=draw(st.sampled_from(["mean", "max"])))


PROTECTED["cam"] = PROTECTED["streaming"]
# the Bernoulli gate draws one uniform per (layer, row index, head, position): not batch-invariant
EXEMPT["cam"] = lambda kw: {"batch"} if kw["stochastic"] else set()


def _snapkv_family(draw, T):
    budget = draw(st.integers(2, T - 1))
    return dict(budget=budget, window=draw(st.integers(1, budget - 1)),
                kernel=draw(st.sampled_from([5, 1, 3, 7])), pool=draw(st.sampled_from(["avg", "max"])))


@case("snapkv")
def _snapkv(draw, T):
    return _snapkv_family(draw, T)


@case("pyramidkv")
def _pyramidkv(draw, T):
    return dict(_snapkv_family(draw, T), beta=draw(st.integers(1, 20)))


@case("adakv")
def _adakv(draw, T):
    return dict(_snapkv_family(draw, T), alpha=draw(st.sampled_from([0.2, 0.0, 0.35, 0.5, 1.0])))


for _name in ("snapkv", "pyramidkv", "adakv"):
    PROTECTED[_name] = lambda kw, last: set(range(last - kw["window"] + 1, last + 1))
# prefill-only policies append during decode (retained grows past `budget`; pyramidkv's layers
# and adakv's heads differ too): checked against lc.budget (the static capacity) only
VARIABLE_BUDGET.update({"snapkv", "pyramidkv", "adakv"})


@case("kvmerger")
def _kvmerger(draw, T):
    window = draw(st.integers(1, max(1, min(6, T - 2))))
    return dict(budget=draw(st.integers(window + 1, T - 1)), window=window,
                kernel=draw(st.sampled_from([1, 3, 7])), pool=draw(st.sampled_from(["max", "avg"])),
                skip_layers=draw(st.sampled_from([(), (0,), (-1,), None])),  # None: all 2 layers
                bias=draw(st.sampled_from([None, "log_mass"])))


PROTECTED["kvmerger"] = lambda kw, last: set(range(last - kw["window"] + 1, last + 1))
VARIABLE_BUDGET.add("kvmerger")  # prefill-only: decode appends past `budget`


def _with_vam(base):
    """`<base>+vam`: the base's parameters plus alpha (simplest example 0.0, so the fixed-draw
    'budget holds everything == full' check sees alpha=0, which is exactly the base)."""
    def draw_kw(draw, T):
        kw = CASES[base](draw, T) if base in CASES else {}
        return dict(kw, alpha=draw(st.sampled_from([0.0, 0.35, 1.0])))
    return draw_kw


for _base in ("h2o", "streaming", "full"):
    case(f"{_base}+vam")(_with_vam(_base))
    if _base in PROTECTED:
        PROTECTED[f"{_base}+vam"] = PROTECTED[_base]
VARIABLE_BUDGET.add("full+vam")  # no budget: everything is kept
