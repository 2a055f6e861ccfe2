"""Side by side with NVIDIA's kvpress 0.5.5 on RULER: the ruler suite's samples (the same token ids)
through kvpress's presses in its own virtualenv (bench/kvpress_side.py), at the same compression.

Per (task, sample, ratio) of the ruler suite on the tasks the full cache can do: flexkv's policy
with kvpress's parameters (`kvpress_side.FLEX_PARAMS`), and kvpress's press in both modes: 'whole'
(the whole prompt compressed in one prefill, as flexkv does) and 'question' (kvpress's pipeline:
the context compressed, the question `Sample.question_start` onwards appended uncompressed, as
kvpress's own RULER numbers are made). Scored with RULER's metric, as the ruler suite.
"""
from __future__ import annotations

import time
from pathlib import Path

from . import ruler as ruler_suite
from .common import comp_budget, tqdm
from .kvpress import ask_worker, kvpress_side, venv_python
from .report import md_table, mean

NAME = "kvpress-ruler"


def run(r, cfg: dict, policies: list[str], notes: list[str]) -> dict | None:
    from flexkv import ruler

    ks = kvpress_side()
    a = r.args
    py = venv_python(r, notes, "kvpress RULER side by side")
    if py is None:
        return None
    pairs = [(p, press) for p, press in ks.PRESS_FOR.items() if p in policies]
    ratios = [("ratio", x) for x in cfg["ruler_ratios"]]
    samples = ruler_suite.Samples(r, cfg)
    t0 = time.perf_counter()
    cells, requests, keyed = [], [], {}
    for L in cfg["ruler_lengths"]:
        n = cfg["ruler_samples"]
        full = [dict(policy="full", comp=None, task=t, length=L, index=i,
                     **ruler_suite.cell(r, samples, cfg, "full", None, t, L, i))
                for t in ruler_suite.tasks_of(cfg) for i in range(n)]
        keep = ruler_suite.capable(full, cfg, L)
        cells += [c for c in full if c["task"] in keep]
        plan = [(p, c, t, i) for p, _ in pairs for c in ratios for t in keep for i in range(n)]
        for p, c, t, i in tqdm(plan, desc=f"kvpress-ruler {L}: flexkv side", unit="cell",
                               dynamic_ncols=True):
            cells.append(dict(policy=p, comp=list(c), task=t, length=L, index=i,
                              **ruler_suite.cell(r, samples, cfg, p, c, t, L, i,
                                                 ks.flex_params(p) or None)))
        for t in keep:
            for i in range(n):
                sample, ids = samples.get(t, L, i)
                T = ids.shape[1]
                ctx_len = ks.question_start(r.tok, ids[0].tolist(), at=sample.question_start)
                n_new = ruler_suite.max_new(cfg, sample)
                for mode in ks.MODES:
                    for p, press in [("full", None)] + pairs:
                        for c in [None] if press is None else ratios:
                            if press is None and mode != "whole":
                                continue
                            b = None if c is None else comp_budget(c, T)
                            key = dict(r.base_key, kind=NAME, press=press, mode=mode, budget=b,
                                       press_params=ks.press_params(press), task=t, length=L,
                                       index=i, seed=a.seed, data=ruler.DATA_VERSION,
                                       generator=ruler.GENERATOR_VERSION, max_new_tokens=n_new,
                                       kvpress=ks.KVPRESS_VERSION)
                            rid = len(keyed)
                            keyed[rid] = (key, p, press, mode, c, t, L, i, sample)
                            if r.cache.get(key) is None:
                                requests.append(dict(id=rid, input_ids=ids[0].tolist(),
                                                     ctx_len=ctx_len, press=press, mode=mode,
                                                     budget=b, params=ks.press_params(press),
                                                     max_new_tokens=n_new))
    def on_result(res):
        key, *_rest, sample = keyed[res["id"]]
        pred = r.tok.decode(res["tokens"], skip_special_tokens=True)
        r.cache.put(key, dict(score=ruler.score(sample.task, pred, sample.outputs),
                              pred=pred[:160], kept=res.get("kept"), wall_s=res.get("wall_s")))

    ask_worker(r, py, requests, on_result, "kvpress-ruler: kvpress side", notes)
    rows = []
    for key, p, press, mode, c, t, L, i, _ in keyed.values():
        res = r.cache.peek(key)
        if res is not None:
            rows.append(dict(policy=p, press=press or "none", mode=mode,
                             comp=None if c is None else list(c), task=t, length=L, index=i,
                             score=res["score"], pred=res["pred"], kept=res.get("kept")))
    return dict(flexkv=cells, kvpress=rows, venv=str(Path(a.kvpress_venv)), kvpress_version=ks.KVPRESS_VERSION,
                modes=ks.MODE_DOC, press_params={p: ks.press_params(s) for p, s in pairs},
                flex_params={p: ks.flex_params(p) for p, _ in pairs},
                wall_s=round(time.perf_counter() - t0, 1))


def _avg(rows, length, policy, comp, mode=None) -> tuple[float | None, int]:
    """Mean over tasks of the per-task mean score, and the number of tasks."""
    per = {}
    for x in rows:
        if (x["length"] == length and x["policy"] == policy and x["comp"] == comp
                and (mode is None or x["mode"] == mode) and "score" in x):
            per.setdefault(x["task"], []).append(x["score"])
    return mean([sum(v) / len(v) for v in per.values()]), len(per)


def section(res: dict, cfg: dict, policies: list[str], meta: dict, out_dir: Path, name: str):
    ks = kvpress_side()
    L = ["## RULER side by side with kvpress", "",
         f"kvpress {res['kvpress_version']} in its own virtualenv ({res['venv']}), the same weights "
         "through transformers (eager attention, fp32), the same token ids as the ruler suite; "
         "the tasks the full cache can do; mean over tasks of the per-task mean score. Modes: " +
         "; ".join(f"**{m}**: {d}" for m, d in res["modes"].items()) + " (the question starts "
         "at `Sample.question_start`). Parameters: " +
         "; ".join(f"{p} {res['flex_params'].get(p) or {}} vs {ks.PRESS_FOR[p]} "
                   f"{res['press_params'].get(p) or {}}" for p in res["press_params"]) +
         f". Wall {res['wall_s']} s.", ""]
    def ident(x):
        return x["policy"], str(x["comp"]), x["task"], x["index"], x["length"]

    flex_score = {ident(x): x["score"] for x in res["flexkv"] if "score" in x}
    for length in cfg["ruler_lengths"]:
        rows = []
        for p in ["full"] + [p for p in ks.PRESS_FOR if p in res["press_params"]]:
            for c in [None] if p == "full" else [["ratio", x] for x in cfg["ruler_ratios"]]:
                fx, nt = _avg(res["flexkv"], length, p, c)
                kv = [_avg(res["kvpress"], length, p, c, m)[0] for m in ks.MODES]
                same = [flex_score[ident(x)] == x["score"] for x in res["kvpress"]
                        if x["mode"] == "whole" and x["policy"] == p and x["comp"] == c
                        and x["length"] == length and ident(x) in flex_score]
                if fx is None and all(k is None for k in kv):
                    continue
                rows.append([p, "none" if p == "full" else ks.PRESS_FOR[p],
                             "-" if c is None else f"{c[1]:g}", nt,
                             "-" if fx is None else f"{fx:.2f}"] +
                            ["-" if k is None else f"{k:.2f}" for k in kv] +
                            [f"{sum(same)}/{len(same)}"])
        L += [f"### {length} tokens", "",
              md_table(["flexkv policy", "kvpress press", "ratio", "tasks", "flexkv"] +
                       [f"kvpress {m}" for m in ks.MODES] + ["same score (whole)"], rows), ""]
    L += ["Why they can differ: as in the passkey side by side (protocol, decode-time eviction, "
          "numerics; see `bench/kvpress_side.py` DIFFERENCES).", ""]
    return L, []
