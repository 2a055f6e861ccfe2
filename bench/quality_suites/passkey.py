"""Passkey retrieval: a 5-digit key hidden at a relative depth of a haystack, the question at the
end, the answer prefilled with "The pass key is"; exact match of the first digit run of the greedy
answer. Grid: prompt length x depth x budget x policy x key x haystack.

Plain prompts by default (`--chat` for the tokenizer's chat template): on the default model the
chat template, not the model, zeroed the full cache's score at 2K (measured: plain prompts 5/5 at
1K, 2K and 4K, one key per depth 0.1..0.9; the same with the template 0/5 at 2K).
"""
from __future__ import annotations

import math
import random
from pathlib import Path

import torch

from . import stats
from .common import PolicyError, budgetless, digest, haystack_filler, tqdm
from .report import (_plt, best_per_budget, cell_time, fmt_acc, md_table, mean, plot_lines,
                     prefix_score)

NAME = "passkey"


class Prompts:
    """The grid's prompts, built once per (haystack, length, depth, key)."""

    def __init__(self, r, cfg):
        self.r, self.cfg = r, cfg
        self.filler, self.filler_digest, self.desc = {}, {}, {}
        for hs in cfg["haystacks"]:
            filler, desc = haystack_filler(hs, r.args.filler)
            self.filler[hs] = filler
            self.filler_digest[hs] = "default" if filler is None else digest(filler)
            self.desc[hs] = desc
        self.chat = bool(cfg.get("chat")) and bool(getattr(r.tok, "chat_template", None))
        self.memo: dict = {}

    def get(self, haystack: str, length: int, depth: float, key_idx: int):
        k = (haystack, length, depth, key_idx)
        if k not in self.memo:
            from flexkv.passkey import build_passkey_prompt, random_key

            key = random_key(random.Random(f"{self.r.args.seed}-{length}-{depth}-{key_idx}"))
            self.memo[k] = build_passkey_prompt(self.r.tok, length, depth, key,
                                                filler=self.filler[haystack],
                                                needle=self.r.args.needle, chat=self.chat)
        return self.memo[k]

    def key(self, policy, budget, haystack, length, depth, key_idx, params=None) -> dict:
        a = self.r.args
        return self.r.key("passkey", policy, budget, params, haystack=haystack,
                          filler=self.filler_digest[haystack], needle=a.needle, chat=self.chat,
                          length=length, depth=depth, key_idx=key_idx, seed=a.seed,
                          max_new_tokens=a.max_new_tokens)


def cell(r, prompts: Prompts, policy, budget, haystack, length, depth, key_idx, params=None):
    key = prompts.key(policy, budget, haystack, length, depth, key_idx, params)
    hit = r.lookup(key)
    if hit is not None:
        return hit
    from flexkv.passkey import extract_answer

    ids, answer = prompts.get(haystack, length, depth, key_idx)
    try:
        out, wall = r.generate(NAME, ids, policy, budget, params,
                               max_new_tokens=r.args.max_new_tokens, eos_token_id=r.eos)
    except PolicyError as e:
        return dict(error=str(e))
    T = ids.shape[1]
    text = r.tok.decode(out.tokens[0, T:].tolist(), skip_special_tokens=True)
    got = extract_answer(text)
    res = dict(answer=answer, got=got, text=text[:80], correct=got == answer, prompt_len=T,
               retained=round(float(out.cache.retained().float().mean()), 1),
               wall_s=round(wall, 3), prefill_s=round(out.prefill_s, 3))
    r.cache.put(key, res)
    return res


def run(r, cfg: dict, policies: list[str], notes: list[str]) -> dict:
    prompts = Prompts(r, cfg)
    if cfg.get("chat") and not prompts.chat:
        notes.append("passkey: the tokenizer has no chat template: plain prompts")
    plan = [(p, b, hs, L, d, ki) for hs in cfg["haystacks"] for L in cfg["lengths"]
            for d in cfg["depths"] for ki in range(cfg["keys"]) for p in policies
            for b in ([None] if budgetless(p) else cfg["budgets"])]
    cells = []
    for p, b, hs, L, d, ki in tqdm(plan, desc="passkey", unit="cell", dynamic_ncols=True):
        res = cell(r, prompts, p, b, hs, L, d, ki)
        cells.append(dict(policy=p, budget=b, haystack=hs, length=L, depth=d, key_idx=ki, **res))
    return dict(cells=cells, n_cells=len(plan), chat=prompts.chat, haystacks=prompts.desc)


def acc_table(cells, policies, budgets, haystack=None, metric="exact"):
    """{policy: {budget: (mean, n)}} (full: the same value under every budget).
    metric: exact (exact match) or prefix (fraction of leading key digits right)."""
    out = {}
    for p in policies:
        row = {}
        for b in budgets:
            sel = [c for c in cells if c["policy"] == p and (budgetless(p) or c["budget"] == b)
                   and (haystack is None or c["haystack"] == haystack) and "correct" in c]
            vals = [float(c["correct"]) if metric == "exact" else
                    prefix_score(c.get("got", ""), c["answer"]) for c in sel]
            row[b] = (mean(vals), len(sel))
        out[p] = row
    return out


def sample_scores(cells, policies, budget) -> dict:
    """{policy: {"passkey": {(haystack, length, depth, key): 0/1}}} at one budget (full: its own
    cells), for the policies with every prompt of the grid answered (stats.resolve's input)."""
    grid = {(c["haystack"], c["length"], c["depth"], c["key_idx"]) for c in cells}
    out = {}
    for p in policies:
        got = {(c["haystack"], c["length"], c["depth"], c["key_idx"]): float(c["correct"])
               for c in cells if c["policy"] == p and "correct" in c
               and (budgetless(p) or c["budget"] == budget)}
        if got and set(got) == grid:
            out[p] = {"passkey": got}
    return out


def plot_heatmaps(out_dir: Path, name: str, cells, policies, cfg, budget) -> list[str]:
    plt = _plt()
    if plt is None:
        return []
    files = []
    lengths, depths, hss = cfg["lengths"], cfg["depths"], cfg["haystacks"]
    for p in policies:
        fig, axes = plt.subplots(1, len(hss), figsize=(2.2 + 1.4 * len(lengths) * len(hss) + 1.2,
                                                        max(3.0, 1.3 + 0.33 * len(depths))),
                                 squeeze=False, layout="constrained")
        for ax, hs in zip(axes[0], hss):
            grid = torch.full((len(depths), len(lengths)), float("nan"))
            for i, d in enumerate(depths):
                for j, L in enumerate(lengths):
                    sel = [float(c["correct"]) for c in cells if c["policy"] == p and c["length"] == L
                           and c["depth"] == d and c["haystack"] == hs and "correct" in c
                           and (budgetless(p) or c["budget"] == budget)]
                    if sel:
                        grid[i, j] = sum(sel) / len(sel)
            im = ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
            ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
            ax.set_xlabel("prompt tokens")
            ax.set_ylabel("needle depth")
            ax.set_title(f"haystack: {hs}", fontsize=8)
            for i in range(len(depths)):
                for j in range(len(lengths)):
                    v = grid[i, j].item()
                    if not math.isnan(v):
                        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
        btxt = "no compression" if budgetless(p) else f"budget {budget}"
        fig.suptitle(f"passkey accuracy: {p} ({btxt})", fontsize=9)
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
        f = out_dir / f"{name}_heatmap_{p.replace('+', '-')}.png"
        fig.savefig(f, dpi=90)
        plt.close(fig)
        files.append(f.name)
    return files


def section(res: dict, cfg: dict, policies: list[str], meta: dict, out_dir: Path, name: str):
    """(markdown lines, png names) of the passkey results."""
    L, pngs = [], []
    pk = res
    meta = dict(meta, haystacks=pk["haystacks"])
    budgets = cfg["budgets"]
    cells = pk["cells"]
    L += ["## Passkey retrieval", "",
          f"Exact match of the first digit run of the greedy answer ({meta['max_new_tokens']} "
          f"new tokens). {'Chat template' if pk['chat'] else 'Plain prompt (no chat template)'}, "
          "question at the end, answer prefilled with \"The pass key is\". "
          f"Lengths {cfg['lengths']}, depths {cfg['depths']}, {cfg['keys']} key(s) "
          f"per cell; haystacks: " + "; ".join(f"{h} = {meta['haystacks'][h]}"
                                                 for h in cfg["haystacks"]) + ". "
          f"{pk['n_cells']} cells: {cell_time(cells)}.", ""]
    for hs in ([None] + cfg["haystacks"] if len(cfg["haystacks"]) > 1 else [None]):
        t = acc_table(cells, policies, budgets, hs)
        title = "all haystacks" if hs is None else f"haystack: {hs}"
        L += [f"Accuracy ({title}; policy x budget; full is budget-independent; n/a: the "
              "policy refuses that budget, see the notes):", ""]
        L.append(md_table(["policy"] + [str(b) for b in budgets],
                          [[p] + [fmt_acc(t[p][b]) for b in budgets] for p in policies]))
        L.append("")
    tp = acc_table(cells, policies, budgets, metric="prefix")
    L += ["Secondary metric, key prefix (fraction of the key's leading digits reproduced; "
          "all haystacks):", ""]
    L.append(md_table(["policy"] + [str(b) for b in budgets],
                      [[p] + [fmt_acc(tp[p][b]) for b in budgets] for p in policies]))
    L.append("")
    t = acc_table(cells, policies, budgets)
    best = best_per_budget(t, budgets)
    full = t.get("full", {}).get(budgets[0], (None, 0))[0]
    L.append(f"Full-cache baseline: {full if full is None else f'{full:.2f}'}. Best compressing "
             "policy per budget: " + "; ".join(f"{b}: {', '.join(ps)} ({v:.2f})"
                                               for b, (ps, v) in best.items()) + ".")
    L.append("")
    for b in budgets:
        L += stats.resolution_md(sample_scores(cells, policies, b), f"at budget {b}")
    hb = cfg["heatmap_budget"]
    if len(cfg["lengths"]) >= 1:
        L += [f"Accuracy by prompt length at budget {hb} (all depths, keys, haystacks):", ""]
        rows = []
        for p in policies:
            row = [p]
            for Lg in cfg["lengths"]:
                sel = [float(c["correct"]) for c in cells if c["policy"] == p and
                       c["length"] == Lg and "correct" in c and (budgetless(p) or c["budget"] == hb)]
                row.append("-" if not sel else f"{sum(sel) / len(sel):.2f}")
            rows.append(row)
        L += [md_table(["policy"] + [str(x) for x in cfg["lengths"]], rows), ""]
    f = plot_lines(out_dir, f"{name}_passkey.png", f"passkey accuracy vs budget ({meta['model']})",
                   "accuracy", {p: [t[p][b][0] for b in budgets] for p in policies
                                if not budgetless(p)}, budgets,
                   baseline=full)
    pngs += [f] if f else []
    hm = plot_heatmaps(out_dir, name, cells, policies, cfg, hb)
    pngs += hm
    if hm:
        L += [f"Depth x length heatmaps at budget {hb}: " + ", ".join(f"`{x}`" for x in hm), ""]
    return L, pngs
