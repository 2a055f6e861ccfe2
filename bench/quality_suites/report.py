"""Tables and plots shared by the quality suites' report sections."""
from __future__ import annotations

import math
from pathlib import Path

from .common import budgetless


def mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def prefix_score(got: str, answer: str) -> float:
    """Leading digits of the key reproduced, as a fraction (a secondary, finer metric)."""
    n = 0
    for a, b in zip(got or "", answer):
        if a != b:
            break
        n += 1
    return n / len(answer)


def fmt_acc(v):
    acc, n = v
    return "n/a" if acc is None else f"{acc:.2f}"


def cell_time(cells) -> str:
    """The cells' own measured compute time (also for cells taken from the cache)."""
    done = [c for c in cells if "wall_s" in c]
    cached = [c for c in done if c.get("cached")]
    tot = sum(c["wall_s"] for c in done)
    return (f"{tot:.0f} s of measured compute ({len(done) - len(cached)} computed in this run, "
            f"{len(cached)} from the cell cache, timed when they were computed)")


def md_table(header, rows) -> str:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def best_per_budget(table, budgets):
    out = {}
    for b in budgets:
        vals = {p: v[b][0] for p, v in table.items() if not budgetless(p) and v[b][0] is not None}
        if vals:
            m = max(vals.values())
            out[b] = (sorted(p for p, x in vals.items() if x == m), m)
    return out


def _plt():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def plot_lines(out_dir: Path, fname: str, title: str, ylabel: str, series: dict, xs, baseline=None,
               logy=False, xlabel="budget (tokens kept per head)", logx=True) -> str | None:
    plt = _plt()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if len(series) > 10:                 # the default cycle repeats its 10 colours
        ax.set_prop_cycle(color=plt.cm.tab20.colors)
    for label, ys in series.items():
        pts = [(x, y) for x, y in zip(xs, ys) if y is not None and not math.isnan(y)]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    if baseline is not None:
        ax.axhline(baseline, color="k", ls="--", lw=1, label="full (no compression)")
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xticks(list(xs), [f"{x:g}" for x in xs])
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    f = out_dir / fname
    fig.savefig(f, dpi=90)
    plt.close(fig)
    return f.name
