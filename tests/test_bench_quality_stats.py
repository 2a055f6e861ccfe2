"""The quality report's statistics (bench/quality_suites/stats.py): Wilson intervals that err
wide, the paired sign-flip test (exact and Monte Carlo), Holm's adjustment, and the RULER
section's table of which policies the samples tell apart."""
from math import comb

import numpy as np
import pytest

from helpers import load_bench

load_bench("quality")                       # puts bench/ on sys.path
from quality_suites import ruler, stats  # noqa: E402


def test_wilson_interval_known_values():
    # textbook values (Wilson 1927; e.g. Newcombe 1998, table I): 4/10, 0/10, 10/10 at 95 %
    assert stats.interval([[1] * 4 + [0] * 6]) == pytest.approx((0.1682, 0.6873), abs=1e-4)
    assert stats.interval([[0] * 10]) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert stats.interval([[1] * 10]) == pytest.approx((0.7225, 1.0), abs=1e-4)
    # equally sampled groups: the pooled sample's interval
    assert stats.interval([[1, 1, 0], [0, 0, 1]]) == pytest.approx(stats.interval([[1, 1, 0, 0, 0, 1]]))
    with pytest.raises(ValueError, match="level"):
        stats.interval([[1]], level=1.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        stats.interval([[2.0]])
    with pytest.raises(ValueError, match="groups"):
        stats.interval([[1], []])


def test_wilson_interval_covers_a_stratified_mean():
    """Five tasks of very different difficulty, 6 samples each (the RULER table's shape): the 95 %
    interval covers the true mean of task means at least 95 % of the time (it errs wide), also
    with fractional scores; a bootstrap within tasks would not (it reports zero width whenever a
    task's few samples agree)."""
    rng = np.random.default_rng(1)
    rates = np.array([0.05, 0.3, 0.5, 0.8, 0.97])
    for frac in (False, True):
        hits = 0
        for _ in range(2000):
            draws = rng.random((5, 6)) < rates[:, None]
            scores = draws * (rng.integers(1, 5, size=(5, 6)) / 4 if frac else 1.0)
            truth = rates.mean() * (0.625 if frac else 1.0)
            lo, hi = stats.interval([list(s) for s in scores])
            hits += lo <= truth <= hi
        assert hits / 2000 >= 0.95


def test_sign_flip_exact_by_hand():
    assert stats.sign_flip_p([[1, 1, 1]]) == 0.25          # 2 of the 8 sign patterns as extreme
    assert stats.sign_flip_p([[1, -1]]) == 1.0
    assert stats.sign_flip_p([[0, 0], [0]]) == 1.0           # nothing differs
    # group weights 1/2 and 1/4: shares [1, .25, .25] of |T| = 1.5, reached only by equal signs
    assert stats.sign_flip_p([[2], [1, 1]]) == 0.25
    assert stats.sign_flip_p([[1], [-1, -1]]) == 1.0          # the weighted statistic is 0


def _binomial_p(m: int, plus: int) -> float:
    """P(|sum of m fair +-1| >= |2 plus - m|)."""
    s = abs(2 * plus - m)
    return sum(comb(m, k) for k in range(m + 1) if abs(2 * k - m) >= s) / 2 ** m


def test_sign_flip_exact_and_monte_carlo_match_the_binomial():
    assert stats.sign_flip_p([[1] * 12 + [-1] * 4]) == pytest.approx(_binomial_p(16, 12), rel=1e-12)
    mc = stats.sign_flip_p([[1] * 14 + [-1] * 6, [0, 0]])     # 20 nonzero: Monte Carlo
    assert mc == pytest.approx(_binomial_p(20, 14), abs=0.01)
    assert mc == stats.sign_flip_p([[1] * 14 + [-1] * 6, [0, 0]])   # seeded


def test_sign_flip_holds_its_level_under_the_null():
    rng = np.random.default_rng(2)
    rejected = 0
    for _ in range(400):
        a, b = rng.random((2, 5, 6)) < 0.5
        rejected += stats.sign_flip_p([list(x) for x in a.astype(float) - b]) < 0.05
    assert rejected / 400 <= 0.07


def test_holm():
    adj = stats.holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.005})
    assert adj == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06, "d": 0.02})
    assert stats.holm({"a": 0.6, "b": 0.7}) == {"a": 1.0, "b": 1.0}
    assert stats.holm({}) == {}


def _cells(policy, comp, per_task):
    return [dict(policy=policy, comp=comp, task=t, length=64, index=i, score=s)
            for t, scores in per_task.items() for i, s in enumerate(scores)]


def test_resolve_and_the_ruler_table():
    """`good` answers every sample, `bad` none, `near` one more than `bad`: with 30 samples good
    beats both after Holm; bad and near are not told apart; full (every cell) beats bad and near."""
    tasks = [f"t{i}" for i in range(5)]
    comp = ["ratio", 0.5]
    cells = (_cells("full", None, {t: [1] * 6 for t in tasks})
             + _cells("good", comp, {t: [1] * 6 for t in tasks})
             + _cells("bad", comp, {t: [0] * 6 for t in tasks})
             + _cells("near", comp, {t: [0] * 6 if t != "t0" else [1, 0, 0, 0, 0, 0] for t in tasks})
             + _cells("bad", ["ratio", 0.9], {t: [1] * 6 for t in tasks}))     # another compression
    scores = ruler.sample_scores(cells, ["full", "good", "bad", "near"], ("ratio", 0.5), 64, tasks)
    r = stats.resolve(scores)
    rows = {x["policy"]: x for x in r["rows"]}
    assert [x["policy"] for x in r["rows"]][-1] == "bad"
    assert sorted(rows["good"]["beats"]) == ["bad", "near"] and rows["good"]["beaten_by"] == []
    assert sorted(rows["bad"]["beaten_by"]) == ["full", "good"]
    assert "near" not in rows["bad"]["beaten_by"]
    assert r["pairs"] == 6 and r["resolved"] == 4 and rows["near"]["n"] == 30
    assert rows["near"]["mean"] == pytest.approx(1 / 30)
    md = "\n".join(ruler.resolution(cells, ["full", "good", "bad", "near"], ("ratio", 0.5), 64, tasks))
    assert "4 of 6 pairs resolved" in md
    assert "| bad | 0.000 | [0.000, 0.114] | 30 | - | full, good |" in md
    # a policy without a score on some task is left out; one policy alone is no comparison
    partial = [c for c in cells if not (c["policy"] == "near" and c["task"] == "t3")]
    assert "near" not in ruler.sample_scores(partial, ["near"], ("ratio", 0.5), 64, tasks)
    assert ruler.resolution(cells, ["good"], ("ratio", 0.5), 64, tasks) == []
    with pytest.raises(ValueError, match="lacks tasks"):
        stats.resolve({"a": {"t0": {0: 1.0}}, "b": {"t1": {0: 1.0}}})


def test_passkey_resolution_per_budget():
    """The passkey suite's prompts (haystack, length, depth, key) are the paired samples; a policy
    that misses a prompt of the grid is left out; full's cells count at every budget."""
    from quality_suites import passkey

    grid = [("classic", L, d, k) for L in (1024, 2048) for d in (0.1, 0.5, 0.9) for k in range(5)]

    def cells(policy, budget, correct):
        return [dict(policy=policy, budget=budget, haystack=h, length=L, depth=d, key_idx=k,
                     correct=correct(i)) for i, (h, L, d, k) in enumerate(grid)]

    cs = (cells("full", None, lambda i: True) + cells("tova", 128, lambda i: True)
          + cells("h2o", 128, lambda i: i % 10 == 0) + cells("h2o", 256, lambda i: True)
          + cells("snapkv", 128, lambda i: False)[:-1])         # one prompt short
    scores = passkey.sample_scores(cs, ["full", "tova", "h2o", "snapkv"], 128)
    assert sorted(scores) == ["full", "h2o", "tova"] and len(scores["h2o"]["passkey"]) == 30
    md = "\n".join(stats.resolution_md(scores, "at budget 128"))
    assert "resolved at budget 128" in md and "2 of 3 pairs resolved" in md
    assert "| h2o | 0.100 | [0.035, 0.256] | 30 | - | full, tova |" in md   # budget 128's cells


def test_streaming_ppl_resolution_over_stretches():
    """The streaming PPL's paired units: its 64-token block means merged into 16 stretches; the
    table shows PPL (lower is better, ranked first) and no interval (NLL is not in [0, 1])."""
    import math

    from quality_suites import ppl

    steady = [3.0] * 64
    worse = [3.0 + 0.05 * (1 + i % 3) for i in range(64)]       # higher NLL in every stretch
    noisy = [3.0 + (0.01 if i % 8 < 4 else -0.01) for i in range(64)]
    cells = [dict(policy="full", budget=None, nll_curve=steady),
             dict(policy="h2o", budget=256, nll_curve=worse),
             dict(policy="tova", budget=256, nll_curve=noisy),
             dict(policy="tova", budget=128, nll_curve=worse),
             dict(policy="cam", budget=256, nll_curve=steady[:60])]      # another block count
    scores = ppl.stretch_scores(cells, ["full", "h2o", "tova", "cam"], 256)
    assert sorted(scores) == ["full", "h2o", "tova"]
    assert len(scores["h2o"]["stream"]) == 16
    assert scores["h2o"]["stream"][0] == pytest.approx(-(3.0 + 0.05 * (1 + 2 + 3 + 1) / 4))
    md = stats.resolution_md(scores, "at budget 256", bounded=False,
                             value=lambda m: f"{math.exp(-m):.3f}", value_name="PPL",
                             unit="stretches", per="stretch")
    text = "\n".join(md)
    assert "per-stretch differences" in text and "interval" not in md[2]
    assert "| h2o | 22.181 | 16 | - | full, tova |" in text    # exp(3 + 0.05 * 127 / 64)
    assert "| full | 20.086 | 16 | h2o | - |" in text          # tova ~ full: +-0.01 a stretch


def test_fidelity_resolution_over_windows_and_stretches():
    """Fidelity's paired units: every window's 16 KL stretches; the full cache (KL 0 by
    definition) and cells without a curve (cached before it was recorded) are left out."""
    from quality_suites import fidelity

    comp = ["ratio", 0.75]

    def cell(p, i, kl):
        return dict(policy=p, comp=comp, index=i, kl=kl, kl_curve=[kl] * 16)

    cells = ([dict(policy="full", comp=None, index=i, kl=0.0, kl_curve=[0.0] * 16) for i in range(2)]
             + [cell("snapkv", i, 0.04) for i in range(2)] + [cell("cam", i, 1.3) for i in range(2)]
             + [dict(policy="h2o", comp=comp, index=0, kl=0.05)])      # no curve: left out
    scores = fidelity.stretch_scores(cells, ["full", "snapkv", "cam", "h2o"], ("ratio", 0.75))
    assert sorted(scores) == ["cam", "snapkv"] and sorted(scores["cam"]) == [0, 1]
    md = "\n".join(stats.resolution_md(scores, "(KL) at compression 0.75", bounded=False,
                                       value=lambda m: f"{-m:.4f}", value_name="KL",
                                       unit="stretches", per="stretch"))
    assert "| snapkv | 0.0400 | 32 | cam | - |" in md and "1 of 1 pairs resolved" in md


def test_fidelity_resolution_over_independent_windows(tmp_path):
    """The per-window table pairs each window's mean KL (independent units: disjoint text, a
    cache each), exact up to 16 windows: 16 windows resolve a policy that is better in 15 of
    them, 4 windows cannot resolve anything (no p-value below 2 / 2^4)."""
    from quality_suites import fidelity

    comp = ["ratio", 0.75]

    def cells(n):
        out = [dict(policy="full", comp=None, index=i, kl=0.0) for i in range(n)]
        for i in range(n):
            worse = 0.06 + 0.001 * i
            out += [dict(policy="snapkv", comp=comp, index=i, kl=worse + (0.002 if i == 3 else -0.02)),
                    dict(policy="h2o", comp=comp, index=i, kl=worse)]
        return out

    scores = fidelity.window_scores(cells(4), ["full", "snapkv", "h2o"], ("ratio", 0.75))
    assert sorted(scores) == ["h2o", "snapkv"] and sorted(scores["h2o"]["windows"]) == [0, 1, 2, 3]

    def section(n):
        cfg = dict(fid_samples=n, fid_prefix=2048, fid_tokens=256, ruler_ratios=[0.75],
                   ruler_budgets=[])
        res = dict(cells=cells(n), source=dict(source="test", text_sha1="0"))
        lines, _ = fidelity.section(res, cfg, ["full", "snapkv", "h2o"], dict(model="m"), tmp_path,
                                    f"t{n}")
        return "\n".join(lines)

    md16, md4 = section(16), section(4)
    assert "per window, the same windows" in md16 and "1 of 1 pairs resolved" in md16
    assert "| snapkv | 0.0489 | 16 | h2o | - |" in md16       # 0.0675 - 0.02 + 0.022 / 16
    assert "no p-value can be below 0.12" in md4 and "0 of 1 pairs resolved" in md4
    assert "per window" not in section(1)                     # one window: nothing to pair
