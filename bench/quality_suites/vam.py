"""VAM in its paper's regime: a long prompt compressed at prefill (full, snapkv, pyramidkv), then a
short generation. VAM reweights the values at decode steps; alpha is swept (alpha = 0 is the base
policy by construction and is checked to be). Scored on RULER's answers (the tasks the full cache
can do, from the ruler suite's cells) and on the fidelity suite's teacher-forced continuation
(its NLL and KL to the full cache). The streaming-PPL sweep (`vam-stream`) is outside this regime.
"""
from __future__ import annotations

from pathlib import Path

from . import fidelity, ruler
from .common import budgetless, tqdm
from .report import md_table, mean, plot_lines

NAME = "vam"


def variants(cfg):
    """(policy, params, base, alpha) per swept point: the base itself, then base+vam per alpha."""
    out = []
    for base in cfg["vam_bases"]:
        out.append((base, None, base, None))
        out += [(f"{base}+vam", {"alpha": a}, base, a) for a in cfg["alphas"]]
    return out


def run(r, cfg: dict, policies: list[str], notes: list[str]) -> dict | None:
    from flexkv.policies import available

    if "<policy>+vam" not in available():
        notes.append("VAM suite skipped: the vam modifier is not registered")
        return None
    samples, texts = ruler.Samples(r, cfg), fidelity.Texts(r, cfg)
    comps = [("ratio", x) for x in cfg["vam_ratios"]]
    cells = []
    L = cfg["ruler_lengths"][0]
    full = [dict(policy="full", comp=None, task=t, length=L, index=i,
                 **ruler.cell(r, samples, cfg, "full", None, t, L, i))
            for t in ruler.tasks_of(cfg) for i in range(cfg["ruler_samples"])]
    keep = ruler.capable(full, cfg, L)
    plan = [(p, prm, base, al, c) for p, prm, base, al in variants(cfg)
            for c in ([None] if budgetless(base) else comps)]
    for p, prm, base, al, c in tqdm(plan, desc="vam", unit="point", dynamic_ncols=True):
        comp = None if c is None else list(c)
        rs = [dict(policy=p, comp=comp, task=t, length=L,
                   **ruler.cell(r, samples, cfg, p, c, t, L, i, prm))
              for t in keep for i in range(cfg["ruler_samples"])]
        fd = [fidelity.cell(r, texts, p, c, i, prm) for i in range(cfg["fid_samples"])]
        cells.append(dict(policy=p, base=base, alpha=al, comp=comp,
                          ruler=ruler.average(rs, p, c, L, keep),
                          nll=mean([x.get("nll") for x in fd]), kl=mean([x.get("kl") for x in fd]),
                          errors=sum("error" in x for x in rs + fd)))
    return dict(cells=cells, tasks=keep, length=L, n_cells=len(plan))


def section(res: dict, cfg: dict, policies: list[str], meta: dict, out_dir: Path, name: str):
    L, pngs = [], []
    alphas = cfg["alphas"]
    L += ["## VAM in its paper's regime (prefill compression, short generation)", "",
          f"Bases {', '.join(cfg['vam_bases'])}; compression ratio(s) {cfg['vam_ratios']} of the "
          f"prompt; RULER average at {res['length']} tokens over the tasks the full cache can do "
          f"({', '.join(res['tasks']) or 'none'}; higher is better) and the fidelity "
          "continuation's NLL (nats per token, lower is better). alpha = 0 must equal the base.",
          ""]
    combos = sorted({(c["base"], tuple(c["comp"] or ())) for c in res["cells"]})
    for metric_, fmt in [("ruler", "{:.3f}"), ("nll", "{:.4f}")]:
        rows, series = [], {}
        for base, comp in combos:
            sel = [c for c in res["cells"] if c["base"] == base and tuple(c["comp"] or ()) == comp]
            basec = next((c for c in sel if c["alpha"] is None), {})
            ys = [next((c[metric_] for c in sel if c["alpha"] == a), None) for a in alphas]
            label = base + (f" @{comp[1]:g}" if comp else "")
            rows.append([label, "-" if basec.get(metric_) is None else fmt.format(basec[metric_])]
                        + ["-" if y is None else fmt.format(y) for y in ys])
            series[label + "+vam"] = ys
        L += [f"{'RULER average' if metric_ == 'ruler' else 'continuation NLL'}:", "",
              md_table(["base", "base alone"] + [f"alpha={a:g}" for a in alphas], rows), ""]
        f = plot_lines(out_dir, f"{name}_vam_{metric_}.png", f"VAM (prefill regime): {metric_} "
                       "vs alpha", metric_, series, alphas, xlabel="alpha", logx=False)
        pngs += [f] if f else []
    checks = []
    for base, comp in combos:
        sel = [c for c in res["cells"] if c["base"] == base and tuple(c["comp"] or ()) == comp]
        b0 = next((c for c in sel if c["alpha"] is None), {})
        a0 = next((c for c in sel if c["alpha"] == 0), None)
        if a0 and b0.get("nll") is not None and a0.get("nll") is not None:
            same = abs(a0["nll"] - b0["nll"]) <= 1e-5 * max(1.0, abs(b0["nll"]))
            checks.append(f"{base}: {'equal' if same else 'DIFFERENT'}")
    if checks:
        L += ["Sanity check, alpha = 0 vs the base (continuation NLL): " + "; ".join(checks) + ".",
              ""]
    return L, pngs
