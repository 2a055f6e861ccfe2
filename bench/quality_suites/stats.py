"""How far a quality table's differences are resolved by its samples.

A RULER average is a mean over tasks of each task's mean over its samples (`ruler.average`), and
every policy answers the same samples; likewise passkey's prompts, the streaming PPL's stretches
of one stream and fidelity's stretches of each window (groups: tasks, or windows). So:

- `interval`: a Wilson score interval of that statistic (scores in [0, 1]), which errs wide.
- `sign_flip_p`: the two-sided paired randomization test of "the two policies score alike": under
  it each sample's difference is as likely to have either sign. Exact (every sign pattern) up to
  `EXACT_MAX` nonzero differences, else Monte Carlo with p = (1 + #{|T*| >= |T|}) / (1 + n).
- `holm`: Holm's step-down adjustment, so "resolved" holds for all pairs of a table at once.

The Monte Carlo path is seeded: a report made twice from the same cells says the same thing.
"""
from __future__ import annotations

import itertools
import math
from statistics import NormalDist

import numpy as np

from .report import md_table

EXACT_MAX = 16       # nonzero differences up to which every sign pattern is enumerated (65536)
RESAMPLES = 10_000
STRETCHES = 16       # a stream (PPL) or a window (fidelity) cut into this many paired units


def _weights(groups) -> tuple[np.ndarray, np.ndarray]:
    """(values, weights) flattened so that sum(w * x) is the mean over groups of group means."""
    groups = [np.asarray(g, dtype=np.float64) for g in groups]
    if not groups or any(g.size == 0 for g in groups):
        raise ValueError("groups: need at least one group, each with at least one sample")
    x = np.concatenate(groups)
    w = np.concatenate([np.full(g.size, 1.0 / (g.size * len(groups))) for g in groups])
    return x, w


def statistic(groups) -> float:
    x, w = _weights(groups)
    return float(np.dot(w, x))


def interval(groups, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of the mean of group means, at Kish's effective sample size
    (1 / sum w^2: the sample count when the groups are equally sampled); groups: lists of sample
    scores in [0, 1]. Such a score's variance is at most mean * (1 - mean), and averaging
    groups can only lower it (Jensen), so the interval errs wide, never narrow, also where a
    few samples happen to agree (a bootstrap would then report zero width)."""
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    x, w = _weights(groups)
    if x.min() < 0 or x.max() > 1:
        raise ValueError("groups: scores must lie in [0, 1]")
    p, n = float(np.dot(w, x)), 1.0 / float(np.dot(w, w))
    z = NormalDist().inv_cdf(1 - (1 - level) / 2)
    mid = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, mid - half), min(1.0, mid + half)


def sign_flip_p(diffs, n: int = RESAMPLES, seed: int = 0) -> float:
    """Two-sided p-value of a paired randomization test; diffs: per group, the per-sample score
    differences (a - b on the same samples). The statistic is their mean of group means."""
    d, w = _weights(diffs)
    keep = d != 0                                  # a zero difference is the same either sign
    t = np.abs(w[keep] * d[keep])                  # [m] each sample's share of the statistic
    if t.size == 0:
        return 1.0
    obs = abs(float(np.dot(w, d)))
    tol = 1e-12 * max(1.0, obs)
    if t.size <= EXACT_MAX:
        bits = (np.arange(2 ** t.size)[:, None] >> np.arange(t.size)) & 1
        signs = 1.0 - 2.0 * bits                                     # [2^m, m] every pattern
        return float(np.mean(np.abs(signs @ t) >= obs - tol))
    rng = np.random.default_rng(seed)
    signs = rng.choice((1.0, -1.0), size=(n, t.size))
    hits = int(np.count_nonzero(np.abs(signs @ t) >= obs - tol))
    return (1 + hits) / (1 + n)


def holm(pvals: dict) -> dict:
    """Holm-adjusted p-values (same keys): the k-th smallest of m is scaled by m - k + 1, then
    made non-decreasing in that order and capped at 1."""
    order = sorted(pvals, key=lambda k: pvals[k])
    m, out, run = len(order), {}, 0.0
    for i, k in enumerate(order):
        run = max(run, min(1.0, (m - i) * pvals[k]))
        out[k] = run
    return out


def resolve(scores: dict[str, dict[str, dict]], alpha: float = 0.05, level: float = 0.95,
            bounded: bool = True) -> dict:
    """scores: {policy: {task: {sample: score}}}, every policy on the same tasks; higher is
    better; `bounded`: scores in [0, 1], which gives each average a Wilson interval (else lo and
    hi are None).

    Returns {"rows": [{policy, mean, lo, hi, n, beats: [...], beaten_by: [...]}] best first,
    "pairs": number compared, "resolved": how many differ at family-wise `alpha` (Holm)}.
    Pairs are compared on the samples both answered."""
    names = list(scores)
    tasks = sorted({t for s in scores.values() for t in s})
    for p in names:
        if sorted(scores[p]) != tasks:
            raise ValueError(f"scores: {p!r} lacks tasks {sorted(set(tasks) - set(scores[p]))}")
    rows = {}
    for p in names:
        groups = [list(scores[p][t].values()) for t in tasks]
        lo, hi = interval(groups, level) if bounded else (None, None)
        rows[p] = dict(policy=p, mean=statistic(groups), lo=lo, hi=hi,
                       n=sum(len(g) for g in groups), beats=[], beaten_by=[])
    raw, diff = {}, {}
    for a, b in itertools.combinations(names, 2):
        groups = []
        for t in tasks:
            common = sorted(set(scores[a][t]) & set(scores[b][t]))
            if not common:
                raise ValueError(f"scores: {a!r} and {b!r} share no sample of task {t!r}")
            groups.append([scores[a][t][i] - scores[b][t][i] for i in common])
        raw[(a, b)] = sign_flip_p(groups)
        diff[(a, b)] = statistic(groups)
    adj = holm(raw) if raw else {}
    for (a, b), p in adj.items():
        if p < alpha:
            hi_, lo_ = (a, b) if diff[(a, b)] > 0 else (b, a)
            rows[hi_]["beats"].append(lo_)
            rows[lo_]["beaten_by"].append(hi_)
    ranked = sorted(rows.values(), key=lambda r: -r["mean"])
    order = {r["policy"]: i for i, r in enumerate(ranked)}
    for r in ranked:                                  # named in the table's order
        r["beats"].sort(key=order.get)
        r["beaten_by"].sort(key=order.get)
    return dict(rows=ranked, pairs=len(adj), resolved=sum(p < alpha for p in adj.values()),
                alpha=alpha, level=level, p_holm={f"{a} vs {b}": p for (a, b), p in adj.items()})


def resolution_md(scores: dict, where: str, *, bounded: bool = True, value=None,
                  value_name: str = "average", unit: str = "samples", per: str = "sample",
                  note: str = "") -> list[str]:
    """Markdown lines: `resolve(scores)` as a table, introduced by `where` (what was compared,
    e.g. "at compression 0.5 (5 task(s))"); `value` formats a policy's mean (default 3
    decimals), `unit` / `per` name the paired units (plural / singular), `note` ends the
    introduction. Nothing when fewer than two policies have scores."""
    if len(scores) < 2:
        return []
    r = resolve(scores, bounded=bounded)
    pct = round(100 * r["level"])
    value = value or (lambda m: f"{m:.3f}")
    head = ["policy", value_name] + ([f"{pct} % interval"] if bounded else []) + \
        [unit, "beats", "beaten by"]
    rows = [[x["policy"], value(x["mean"])]
            + ([f"[{x['lo']:.3f}, {x['hi']:.3f}]"] if bounded else [])
            + [x["n"], ", ".join(x["beats"]) or "-", ", ".join(x["beaten_by"]) or "-"]
            for x in r["rows"]]
    intro = (f"How far these scores are resolved {where}, the same {unit} for every policy: "
             + (f"{pct} % Wilson interval of each average (at its sample count; it errs wide); "
                if bounded else "")
             + f"a policy *beats* another where a paired sign-flip test on their per-{per} "
             f"differences rejects equality at {r['alpha']:g} after Holm's correction over all "
             f"{r['pairs']} pairs. {r['resolved']} of {r['pairs']} pairs resolved." + note)
    return [intro, "", md_table(head, rows), ""]
