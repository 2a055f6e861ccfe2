"""Streaming perplexity (the StreamingLLM / CaM / WeightedKV protocol): a short prompt, then every
later token of a long text fed one at a time through the decode step (teacher forcing), the policy
acting after every step; PPL of the next-token NLL over the forced tokens. Also VAM's alpha swept on
this stream (`vam-stream`): outside VAM's paper regime (a long prompt compressed at prefill, then a
short generation: the `vam` suite), reported separately and labelled so.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from . import stats
from .common import (PolicyError, block_means, budgetless, kept_value_norm, nll_of, prefill_only,
                     tqdm)
from .report import cell_time, md_table, plot_lines
from .stats import STRETCHES

NAME = "ppl"


def stream_ids(r, cfg):
    """[1, prompt + tokens] ids of the run's long text, and its description."""
    ids, src = r.long_ids()
    need = cfg["ppl_prompt"] + cfg["ppl_tokens"]
    if len(ids) < need:
        raise ValueError(f"the PPL text ({src['source']}) has {len(ids)} tokens; the streaming PPL "
                         f"needs --ppl-prompt + --ppl-tokens = {need}")
    return torch.tensor([ids[:need]], dtype=torch.long), dict(
        src, tokens=need, prompt_tokens=cfg["ppl_prompt"], scored_tokens=cfg["ppl_tokens"])


def cell(r, cfg, policy, budget, params=None):
    ids, src = stream_ids(r, cfg)
    key = r.key("ppl", policy, budget, params, text=src["text_sha1"],
                prompt_tokens=cfg["ppl_prompt"], tokens=cfg["ppl_tokens"])
    hit = r.lookup(key)
    if hit is not None:
        return hit
    first, rest = ids[:, :cfg["ppl_prompt"]], ids[:, cfg["ppl_prompt"]:]
    vnorm, step = [], [0]

    def track(cache):  # the kept values' mean norm every 64 steps (cam's merge adds to them)
        if step[0] % 64 == 0 or step[0] == rest.shape[1] - 1:
            vnorm.append(round(kept_value_norm(cache), 4))
        step[0] += 1

    try:
        out, wall = r.generate(NAME, first, policy, budget, params, max_new_tokens=rest.shape[1],
                               forced_tokens=rest.to(r.device), output_logits=True,
                               cache_callback=track)
    except PolicyError as e:
        return dict(error=str(e))
    nll = nll_of(out.logits[0], rest[0])
    del out
    n = nll.numel()
    res = dict(ppl=math.exp(float(nll.mean())), nll=round(float(nll.mean()), 5),
               ppl_second_half=math.exp(float(nll[n // 2:].mean())), tokens=n,
               wall_s=round(wall, 2), step_ms=round(1e3 * wall / n, 2), compiled=r.compile_for(),
               nll_curve=[round(float(x), 4) for x in block_means(nll, 64)],
               vnorm_curve=vnorm, vnorm_growth=round(vnorm[-1] / vnorm[0], 3) if vnorm else None)
    r.cache.put(key, res)
    return res


def run(r, cfg: dict, policies: list[str], notes: list[str]) -> dict:
    budgets = cfg.get("ppl_budgets") or cfg["budgets"]
    pols = cfg.get("ppl_policies_resolved") or policies
    plan = [(p, b) for p in pols for b in ([None] if budgetless(p) else budgets)]
    _, src = stream_ids(r, cfg)
    cells = []
    for p, b in tqdm(plan, desc="ppl", unit="run", dynamic_ncols=True):
        cells.append(dict(policy=p, budget=b, prefill_only=prefill_only(p), **cell(r, cfg, p, b)))
    return dict(cells=cells, budgets=budgets, source=src, n_cells=len(plan))


def run_vam_stream(r, cfg: dict, policies: list[str], notes: list[str]) -> dict | None:
    from flexkv.policies import available

    avail = available()
    if "<policy>+vam" not in avail:
        notes.append("VAM streaming sweep skipped: the vam modifier is not registered")
        return None
    bases = [b for b in cfg["vam_stream_bases"] if b in avail]
    budgets = cfg.get("ppl_budgets") or cfg["budgets"]
    plan = []
    for base in bases:
        for b in ([None] if budgetless(base) else budgets):
            plan.append((base, b, None))                         # the base itself
            plan += [(f"{base}+vam", b, al) for al in cfg["alphas"]]
    _, src = stream_ids(r, cfg)
    cells = []
    for p, b, al in tqdm(plan, desc="vam-stream", unit="run", dynamic_ncols=True):
        res = cell(r, cfg, p, b, None if al is None else {"alpha": al})
        cells.append(dict(policy=p, base=p.split("+")[0], budget=b, alpha=al,
                          prefill_only=prefill_only(p.split("+")[0]), **res))
    return dict(cells=cells, source=src, n_cells=len(plan))


def stretch_scores(cells, policies, budget) -> dict:
    """{policy: {"stream": {i: -(mean NLL of stretch i)}}} at one budget (full: its own run):
    `nll_curve`'s 64-token block means merged into STRETCHES contiguous stretches (higher is
    better, as stats.resolve ranks). Runs with a different block count are left out."""
    curves = {}
    for p in policies:
        c = next((c for c in cells if c["policy"] == p and (budgetless(p) or c["budget"] == budget)
                  and c.get("nll_curve")), None)
        if c is not None and len(c["nll_curve"]) % STRETCHES == 0:
            curves[p] = c["nll_curve"]
    if len({len(v) for v in curves.values()}) > 1:
        return {}
    out = {}
    for p, curve in curves.items():
        k = len(curve) // STRETCHES
        out[p] = {"stream": {i: -sum(curve[i * k:(i + 1) * k]) / k for i in range(STRETCHES)}}
    return out


def section(res: dict, cfg: dict, policies: list[str], meta: dict, out_dir: Path, name: str):
    L, pngs = [], []
    pp = res
    budgets = pp["budgets"]
    src = pp["source"]
    pols = list(dict.fromkeys(c["policy"] for c in pp["cells"]))     # the run's order
    L += ["## Streaming perplexity", "",
          f"Text: {src['source']} (sha1 {src['text_sha1']}); prompt {src['prompt_tokens']} "
          f"tokens, then {src['scored_tokens']} tokens fed one at a time through the decode "
          "step (teacher forcing), the policy acting after every step; PPL = exp(mean NLL of "
          f"each next token). {len(pp['cells'])} runs: {cell_time(pp['cells'])}.", ""]
    po = sorted({c["policy"] for c in pp["cells"] if c.get("prefill_only")})
    if po:
        L += [f"Prefill-only policies ({', '.join(po)}) compress only the {src['prompt_tokens']}"
              "-token prompt here (shorter than every budget), then append without eviction: "
              "their streaming PPL is the full cache's by construction.", ""]
    rows, series = [], {}
    full_ppl = None
    for p in pols:
        row, ys = [p], []
        for b in budgets:
            c = next((c for c in pp["cells"] if c["policy"] == p and
                      (budgetless(p) or c["budget"] == b)), None)
            v = c.get("ppl") if c else None
            row.append("err" if c and "error" in c else "-" if v is None else f"{v:.3f}")
            ys.append(v)
        if budgetless(p) and p == "full":
            full_ppl = ys[0]
        rows.append(row)
        if not budgetless(p):
            series[p] = ys
    L += [md_table(["policy"] + [str(b) for b in budgets], rows), ""]
    if series:
        best = {}
        for i, b in enumerate(budgets):
            vals = {p: ys[i] for p, ys in series.items() if ys[i] is not None}
            if vals:
                m = min(vals.values())
                best[b] = ([p for p, v in vals.items() if v == m], m)
        L += ["Lowest PPL per budget: " + "; ".join(f"{b}: {', '.join(ps)} ({v:.3f})"
                                                   for b, (ps, v) in best.items()) + ".", ""]
    for b in budgets:
        L += stats.resolution_md(
            stretch_scores(pp["cells"], pols, b), f"at budget {b}", bounded=False,
            value=lambda m: f"{math.exp(-m):.3f}", value_name="PPL", unit="stretches", per="stretch",
            note=f" The stream is cut into {STRETCHES} stretches of equal length (each a mean "
                 "NLL); they follow one another through one cache, so they are not independent "
                 "and the p-values are approximate.")
    growth = [(c["policy"], c["budget"], c["vnorm_curve"]) for c in pp["cells"]
              if c.get("vnorm_curve")]
    if growth:
        L += ["Mean norm of the kept values over its value at the start of the stream, at the "
              "end (and the largest, sampled every 64 steps; eviction keeps the model's own "
              "values, so the ratio only reflects which tokens are kept; cam's merge adds "
              "evicted values to the kept ones, which grow along the stream): " +
              ", ".join(f"{p}@{b}: {v[-1] / v[0]:.2f} ({max(v) / v[0]:.2f})"
                        for p, b, v in growth) + ".", ""]
    steps = [c["step_ms"] for c in pp["cells"] if "step_ms" in c]
    if steps:
        L += [f"Per-step time {min(steps):.1f}-{max(steps):.1f} ms (incl. compile when "
              "compiled).", ""]
    f = plot_lines(out_dir, f"{name}_ppl.png", f"streaming PPL vs budget ({meta['model']})",
                   "perplexity", series, budgets, baseline=full_ppl)
    pngs += [f] if f else []
    return L, pngs


def section_vam_stream(res: dict, cfg: dict, policies: list[str], meta: dict, out_dir: Path,
                       name: str):
    L, pngs = [], []
    vm = res
    alphas = cfg["alphas"]
    L += ["## VAM alpha sweep on the streaming PPL (outside VAM's paper regime)", "",
          "VAM's paper applies it to a long prompt compressed at prefill followed by a short "
          "generation (the `vam` suite); this sweep streams a long text through the decode step "
          "instead, a regime the paper did not use. alpha = 0 must equal the base policy.",
          ""]
    rows, series = [], {}
    combos = sorted({(c["base"], c["budget"]) for c in vm["cells"]},
                    key=lambda x: (x[0], x[1] or 0))
    for base, b in combos:
        row = [base, "-" if b is None else b]
        basec = next((c for c in vm["cells"] if c["policy"] == base and c["budget"] == b), {})
        row.append(f"{basec['ppl']:.3f}" if "ppl" in basec else "-")
        ys = []
        for al in alphas:
            c = next((c for c in vm["cells"] if c["policy"] == f"{base}+vam" and
                      c["budget"] == b and c["alpha"] == al), {})
            row.append(f"{c['ppl']:.3f}" if "ppl" in c else "err" if "error" in c else "-")
            ys.append(c.get("ppl"))
        rows.append(row)
        series[f"{base}+vam" + ("" if b is None else f" @{b}")] = ys
    L += [md_table(["base", "budget", "base PPL"] + [f"alpha={a:g}" for a in alphas], rows), ""]
    checks = []
    for base, b in combos:
        c0 = next((c for c in vm["cells"] if c["policy"] == f"{base}+vam" and
                   c["budget"] == b and c["alpha"] == 0), {})
        cb = next((c for c in vm["cells"] if c["policy"] == base and c["budget"] == b), {})
        if "ppl" in c0 and "ppl" in cb:
            same = abs(c0["ppl"] - cb["ppl"]) <= 1e-4 * cb["ppl"]
            checks.append(f"{base}@{b}: {'equal' if same else 'DIFFERENT'} "
                          f"({c0['ppl']:.4f} vs {cb['ppl']:.4f})")
    if checks:
        L += ["Sanity check, alpha = 0 vs the base policy: " + "; ".join(checks) + ".", ""]
    po = sorted({c["base"] for c in vm["cells"] if c.get("prefill_only")})
    if po:
        L += [f"({', '.join(po)}: prefill-only, so equal to full+vam here, see above.)", ""]
    f = plot_lines(out_dir, f"{name}_vam.png", "VAM: streaming PPL vs alpha", "perplexity",
                   series, alphas, xlabel="alpha", logx=False)
    pngs += [f] if f else []
    return L, pngs
