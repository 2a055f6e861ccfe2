"""Fidelity to the full cache on real long text (the Paul Graham essays of RULER's data): after a
`--fid-prefix`-token prefix compressed by the policy, `--fid-tokens` tokens of the essay are
teacher-forced through the decode step; per position the next-token distribution is compared with
the full cache's on the same tokens.

Metrics: mean KL(full || policy) in nats, top-1 agreement (the policy's argmax equals the full
cache's), and the continuation's perplexity. They rank policies where a 135M model fails a task.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from . import stats
from .common import PolicyError, budgetless, comp_budget, nll_of, tqdm
from .report import md_table, mean, plot_lines
from .ruler import comp_label, compressions
from .stats import STRETCHES

NAME = "fidelity"


class Texts:
    """Sample i: the essays' token stream from i * (prefix + tokens), [1, prefix + tokens]."""

    def __init__(self, r, cfg):
        self.r, self.cfg = r, cfg
        self.ids, self.src = r.long_ids()

    def get(self, index: int):
        n = self.cfg["fid_prefix"] + self.cfg["fid_tokens"]
        lo = index * n
        if lo + n > len(self.ids):
            raise ValueError(f"--fid-samples: the essays hold {len(self.ids) // n} windows of "
                             f"{n} tokens, sample {index} needs more")
        return torch.tensor([self.ids[lo:lo + n]], dtype=torch.long)

    def reference(self, index: int) -> torch.Tensor:
        """The full cache's log-probs on sample `index` [N, V]: computed once per run (the
        Runner keeps them, so the fidelity and vam suites share one reference pass)."""
        key = (NAME, self.src["text_sha1"], self.cfg["fid_prefix"], self.cfg["fid_tokens"], index)
        if key not in self.r.references:
            lp, _ = forward(self.r, self, "full", None, index)
            if lp is None:
                raise RuntimeError("fidelity: the full cache failed on the reference run")
            self.r.references[key] = lp
        return self.r.references[key]


def forward(r, texts: Texts, policy, budget, index, params=None):
    """(log-probs [N, V] float32 on the CPU, wall s) of the teacher-forced continuation;
    (None, None) when the policy refuses the cell."""
    ids = texts.get(index)
    P = texts.cfg["fid_prefix"]
    try:
        out, wall = r.generate(NAME, ids[:, :P], policy, budget, params,
                               max_new_tokens=ids.shape[1] - P,
                               forced_tokens=ids[:, P:].to(r.device), output_logits=True)
    except PolicyError:
        return None, None
    return torch.log_softmax(out.logits[0].double(), -1).float().cpu(), wall


def cell(r, texts: Texts, policy, comp, index, params=None):
    cfg = texts.cfg
    budget = comp_budget(comp, cfg["fid_prefix"])
    key = r.key(NAME, policy, budget, params, text=texts.src["text_sha1"], index=index,
                prefix=cfg["fid_prefix"], tokens=cfg["fid_tokens"],
                compression=None if comp is None else list(comp))
    hit = r.lookup(key)
    if hit is not None:
        return hit
    ids = texts.get(index)
    target = ids[0, cfg["fid_prefix"]:]
    ref = texts.reference(index)
    if budgetless(policy) and not params:
        lp, wall = ref, None
    else:
        lp, wall = forward(r, texts, policy, budget, index, params)
        if lp is None:
            return dict(error="policy refused the cell (see the notes)")
    kl = (ref.exp() * (ref - lp)).sum(-1).clamp_min(0)          # [N] nats
    nll = nll_of(lp, target)
    res = dict(kl=float(kl.mean()), kl_max=float(kl.max()),
               kl_curve=[round(float(x.mean()), 6) for x in kl.tensor_split(STRETCHES)]
               if kl.numel() >= STRETCHES else None,
               top1=float((lp.argmax(-1) == ref.argmax(-1)).float().mean()),
               nll=float(nll.mean()), ppl=math.exp(float(nll.mean())), budget_tokens=budget,
               **({} if wall is None else dict(wall_s=round(wall, 2))))
    r.cache.put(key, res)
    return res


def run(r, cfg: dict, policies: list[str], notes: list[str]) -> dict:
    texts = Texts(r, cfg)
    plan = [(p, c, i) for p in policies for c in ([None] if budgetless(p) else compressions(cfg))
            for i in range(cfg["fid_samples"])]
    cells = []
    for p, c, i in tqdm(plan, desc="fidelity", unit="cell", dynamic_ncols=True):
        cells.append(dict(policy=p, comp=None if c is None else list(c), index=i,
                          **cell(r, texts, p, c, i)))
    return dict(cells=cells, n_cells=len(plan), source=texts.src)


def _scored(cells, policies, comp) -> dict:
    """{policy: its scored cells at one compression}, for the compressing policies with any (the
    full cache's KL to itself is 0 by definition)."""
    out = {}
    for p in policies:
        sel = [c for c in cells if c["policy"] == p and c.get("comp") == list(comp) and "kl" in c]
        if sel and not budgetless(p):
            out[p] = sel
    return out


def stretch_scores(cells, policies, comp) -> dict:
    """{policy: {window: {stretch: -(mean KL of the stretch)}}} at one compression, for the
    compressing policies whose every window has `kl_curve` (cells cached before it was recorded
    have none); higher is better, as stats.resolve ranks."""
    return {p: {c["index"]: {j: -x for j, x in enumerate(c["kl_curve"])} for c in sel}
            for p, sel in _scored(cells, policies, comp).items()
            if all(len(c.get("kl_curve") or []) == STRETCHES for c in sel)}


def window_scores(cells, policies, comp) -> dict:
    """{policy: {"windows": {window: -(its mean KL)}}} at one compression, for the compressing
    policies with a window scored (pairs are compared on the windows both have); the windows
    are disjoint stretches of the essays, each with its own cache, so unlike the stretches
    within one window they are independent units."""
    return {p: {"windows": {c["index"]: -c["kl"] for c in sel}}
            for p, sel in _scored(cells, policies, comp).items()}


def metric(cells, policy, comp, name):
    return mean([c[name] for c in cells if c["policy"] == policy and name in c and
                 (budgetless(policy) or c["comp"] == list(comp))])


def section(res: dict, cfg: dict, policies: list[str], meta: dict, out_dir: Path, name: str):
    L, pngs = [], []
    cells, comps = res["cells"], compressions(cfg)
    L += ["## Fidelity to the full cache", "",
          f"Text: {res['source']['source']} (sha1 {res['source']['text_sha1']}); "
          f"{cfg['fid_samples']} window(s): a {cfg['fid_prefix']}-token prefix (compressed by the "
          f"policy; ratio = fraction of the prefix removed, b<N> = absolute budget), then "
          f"{cfg['fid_tokens']} teacher-forced tokens. KL(full || policy) in nats per token "
          "(lower is better), top-1 agreement with the full cache, perplexity of the "
          "continuation.", ""]
    full_ppl = metric(cells, "full", None, "ppl")
    for m, fmt, title in [("kl", "{:.4f}", "mean KL(full || policy)"),
                          ("top1", "{:.3f}", "top-1 agreement"),
                          ("ppl", "{:.3f}", "continuation PPL")]:
        rows, series = [], {}
        for p in policies:
            ys = [metric(cells, p, c, m) for c in comps]
            rows.append([p] + ["-" if y is None else fmt.format(y) for y in ys])
            if not budgetless(p):
                series[p] = [y for (k, _), y in zip(comps, ys) if k == "ratio"]
        L += [f"{title} (policy x compression):", "",
              md_table(["policy"] + [comp_label(c) for c in comps], rows), ""]
        ratios = [x for k, x in comps if k == "ratio"]
        if ratios:
            f = plot_lines(out_dir, f"{name}_fidelity_{m}.png", f"{title} ({meta['model']})",
                           title, series, ratios, baseline=full_ppl if m == "ppl" else None,
                           logy=m == "kl", xlabel="compression ratio (fraction of the prefix "
                           "removed)", logx=False)
            pngs += [f] if f else []
    kl = dict(bounded=False, value=lambda m: f"{-m:.4f}", value_name="KL")
    for c in comps:
        if cfg["fid_samples"] >= 2:
            L += stats.resolution_md(
                window_scores(cells, policies, c), f"(KL) at compression {comp_label(c)}, "
                "per window", **kl, unit="windows", per="window",
                note=" The windows are disjoint stretches of the essays, each compressed on its "
                     "own: independent units, unlike the stretches of one window below"
                     + (f" (with {n} windows no p-value can be below {2 / 2 ** n:.2g})."
                        if (n := cfg["fid_samples"]) <= stats.EXACT_MAX else "."))
        L += stats.resolution_md(
            stretch_scores(cells, policies, c), f"(KL) at compression {comp_label(c)}", **kl,
            unit="stretches", per="stretch",
            note=f" Each window's continuation is cut into {STRETCHES} stretches (a mean KL "
                 "each), paired across policies; they follow one another through one cache, so "
                 "the p-values are approximate.")
    return L, pngs
