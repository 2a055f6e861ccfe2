"""Per-policy hypothesis strategies for the generic property tests (tests/test_policies.py).

`CASES[name](draw, T)` returns the keyword arguments (budget + hyperparameters) for a prompt
whose shortest row has T (>= 4) tokens; budgets come from `flexkv.testing.budgets`: below T (the
prefill compresses) or at or above it (eviction starts mid-decode, and a longer row of the batch
may be compressed while the shorter one is not). Windows stay inside the prompt.
`PROTECTED[name](kw, last_pos)` (optional) gives the positions a policy must always keep;
`EXEMPT[name](kw)` (optional) the `flexkv.testing` properties that do not apply to a draw;
`VARIABLE_BUDGET`: the policies whose layers or heads get different shares of the budget.
`COMPILED`: the parameter variants whose compiled decode step is checked against the reference
(one graph each, so every variant of every policy is compiled at least once).
tests/test_policies.py runs `flexkv.testing.check_policy` on every entry.
"""
from __future__ import annotations

from hypothesis import strategies as st

from flexkv.testing import budgets

CASES = {}
PROTECTED = {}
EXEMPT = {}
# prefill-only policies whose layers (pyramidkv) or heads (adakv, laprox) get different shares of
# the budget: the budget property holds a row's mean over layers and heads to it
VARIABLE_BUDGET = {"pyramidkv", "adakv", "laprox"}


def recent(last, n):
    """The n newest positions up to `last` (fewer when the row is shorter)."""
    return set(range(max(0, last - n + 1), last + 1))


def case(name):
    def deco(fn):
        CASES[name] = fn
        return fn
    return deco


@case("streaming")
def _streaming(draw, T):
    n_sink = draw(st.integers(0, min(4, T - 2)))  # T >= 4
    return dict(budget=draw(budgets(T, n_sink + 1)), n_sink=n_sink)


PROTECTED["streaming"] = lambda kw, last: set(range(kw["n_sink"])) | recent(
    last, kw["budget"] - kw["n_sink"])


@case("h2o")
def _h2o(draw, T):
    budget = draw(budgets(T, 2))
    return dict(budget=budget, recent=draw(st.one_of(st.none(), st.integers(1, budget - 1))))


PROTECTED["h2o"] = lambda kw, last: recent(
    last, kw["recent"] if kw["recent"] is not None else kw["budget"] // 2)


@case("tova")
def _tova(draw, T):
    return dict(budget=draw(budgets(T)))


@case("keydiff")
def _keydiff(draw, T):
    # budget >= 2: with budget 1 a decode step scores 2 keys, which are always exactly equally
    # similar to their mean (a tie in exact arithmetic that rounding decides)
    budget = draw(budgets(T, 2))
    return dict(budget=budget, window=draw(st.integers(0, min(budget, T) - 1)))


PROTECTED["keydiff"] = lambda kw, last: recent(last, kw["window"])


@case("laprox")
def _laprox(draw, T):
    window = draw(st.integers(1, max(1, min(6, T - 2))))
    budget = draw(budgets(T, window + 1))
    return dict(budget=budget, window=window, max_head_factor=draw(st.sampled_from([1, 1.5, 4])),
                normalize=draw(st.sampled_from(["layer", "none", "output"])),
                score=draw(st.sampled_from(["norm_product", "frobenius"])),
                kernel=draw(st.sampled_from([7, 1, 3])))


PROTECTED["laprox"] = lambda kw, last: recent(last, kw["window"])


@case("weightedkv")
def _weightedkv(draw, T):
    n_sink = draw(st.integers(0, min(2, T - 3)))
    window = draw(st.integers(1, max(1, min(6, T - 2 - n_sink))))
    return dict(budget=draw(budgets(T, window + n_sink + 1)), window=window,
                n_sink=n_sink, bias=draw(st.sampled_from([None, "log_mass"])))


PROTECTED["weightedkv"] = lambda kw, last: set(range(kw["n_sink"])) | recent(last, kw["window"])


@case("cam")
def _cam(draw, T):
    import torch

    n_sink = draw(st.integers(0, min(4, T - 2)))
    # a generator either way (unused unless stochastic), so a fixed stochastic=True can be set
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    return dict(budget=draw(budgets(T, n_sink + 1)), n_sink=n_sink,
                merge_tokens=draw(st.integers(1, 6)), stochastic=draw(st.booleans()),
                gate_generator=gen,
                bias=draw(st.sampled_from([None, "log_mass"])),
                denominator=draw(st.sampled_from(["mean", "max"])))


PROTECTED["cam"] = PROTECTED["streaming"]
# the Bernoulli gate draws one uniform per (layer, row index, head, position): not batch-invariant
EXEMPT["cam"] = lambda kw: {"batch"} if kw["stochastic"] else set()


def _snapkv_family(draw, T):
    budget = draw(budgets(T, 2))
    return dict(budget=budget, window=draw(st.integers(1, min(budget, T) - 1)),
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
    PROTECTED[_name] = lambda kw, last: recent(last, kw["window"])


@case("kvmerger")
def _kvmerger(draw, T):
    window = draw(st.integers(1, max(1, min(6, T - 2))))
    return dict(budget=draw(budgets(T, window + 1)), window=window,
                kernel=draw(st.sampled_from([1, 3, 7])), pool=draw(st.sampled_from(["max", "avg"])),
                skip_layers=draw(st.sampled_from([(), (0,), (-1,), None])),  # None: all 2 layers
                bias=draw(st.sampled_from([None, "log_mass"])))


PROTECTED["kvmerger"] = lambda kw, last: recent(last, kw["window"])


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


# Every policy that evicts at decode also runs with `prefill_only=True` (its selection at
# prefill, then decode appends) in about a third of its draws; the simplest example keeps it
# off, so the fixed-draw checks ("full") see the default.
DECODE_TIME = ("streaming", "h2o", "tova", "keydiff", "weightedkv", "cam")


def _or_prefill_only(draw_kw):
    def draw(draw, T):
        return dict(draw_kw(draw, T), prefill_only=draw(st.sampled_from([False, False, True])))
    return draw


for _name in DECODE_TIME:
    CASES[_name] = _or_prefill_only(CASES[_name])


# The compiled decode step against the reference (tests/test_policies.py): one graph per entry
# (policy, fixed parameters), at budget 12 on 24-token rows whose padded neighbour may hold fewer
# tokens than the budget (eviction mid-decode), on a two-layer model with 2 KV heads (the second
# layer reusing the first one's compiled code, a nested compile region; pyramidkv's per-layer
# capacities unrolled). Every parameter that changes the decode step is set at least once (bias,
# stochastic, denominator, VAM's alpha), and the prefill-only policies' decode (appending into
# per-layer / per-head budgets) is compiled too.
# kvmerger's bias=None decode is snapkv's (plain appending); the other parameters act at prefill
# only (eager, covered by the reference tests).
COMPILED = [
    ("streaming", dict(n_sink=2)),
    # prefill_only (decode appends) compiled once: VAM's update over a base that appends
    ("streaming+vam", dict(n_sink=2, alpha=0.35, prefill_only=True)),
    ("h2o", dict(recent=3)),
    ("h2o+vam", dict(recent=None, alpha=0.35)),
    ("tova", {}),
    ("keydiff", dict(window=2)),
    ("weightedkv", dict(n_sink=1, window=2, bias=None)),
    ("weightedkv", dict(n_sink=1, window=2, bias="log_mass")),
    ("cam", dict(n_sink=2, merge_tokens=3, stochastic=False, bias=None, denominator="mean")),
    ("cam", dict(n_sink=2, merge_tokens=3, stochastic=True, bias="log_mass", denominator="max")),
    ("snapkv", dict(window=2)),
    ("pyramidkv", dict(window=2, beta=4)),          # layers keep 20 and 4 of a 24-token prompt
    ("adakv", dict(window=2, alpha=0.2)),           # per-head budgets
    ("laprox", dict(window=2, max_head_factor=4)),  # per-layer and per-head budgets
    ("kvmerger", dict(window=2, bias="log_mass")),  # the log_mass bias at decode
    ("full+vam", dict(alpha=0.35)),
]
