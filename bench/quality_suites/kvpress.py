"""Side by side with NVIDIA's kvpress 0.5.5: the same passkey prompts and budgets through kvpress
in its own virtualenv (created on first use under bench/.kvpress-venv; see bench/kvpress_side.py)."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from . import passkey
from .common import BENCH, budgetless, tqdm
from .passkey import Prompts
from .report import md_table, mean

NAME = "kvpress"


def kvpress_side():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import kvpress_side as ks
    return ks


def venv_python(r, notes: list[str], what: str):
    """The kvpress virtualenv's python (created first with --kvpress-setup), or None with a note
    that `what` was skipped."""
    venv = Path(r.args.kvpress_venv)
    py = kvpress_side().ensure_venv(venv, setup=r.args.kvpress_setup,
                                    log=lambda m: print(m, file=sys.stderr))
    if py is None:
        notes.append(f"{what} skipped: no kvpress virtualenv at {venv} "
                     "(run with --kvpress-setup to create it)")
    return py


def ask_worker(r, py, requests: list[dict], on_result, desc: str, notes: list[str]) -> None:
    """Run `requests` through the kvpress worker, `on_result(res)` for each answer (cached-only
    runs count them as missing instead)."""
    if not requests:
        return
    if r.args.cached_only:
        r.missing += len(requests)
        return
    ks = kvpress_side()
    bar = tqdm(total=len(requests), desc=desc, unit="cell", dynamic_ncols=True)

    def one(res):
        on_result(res)
        bar.update(1)

    err = ks.run_worker(py, ks.model_dir(r.args.model), requests, device=r.device.type,
                        dtype=r.args.dtype, on_result=one)
    bar.close()
    if err:
        notes.append(f"kvpress worker: {err}")


def run(r, cfg: dict, policies: list[str], notes: list[str]) -> dict | None:
    ks = kvpress_side()
    a = r.args
    py = venv_python(r, notes, "kvpress side by side")
    if py is None:
        return None
    pairs = [(p, press) for p, press in ks.PRESS_FOR.items() if p in policies]
    lengths = a.kvpress_lengths or cfg["lengths"]
    depths = a.kvpress_depths or cfg["depths"]
    budgets = a.kvpress_budgets or cfg["budgets"]
    keys = a.kvpress_keys or cfg["keys"]
    hs = cfg["haystacks"][0]
    prompts = Prompts(r, cfg)
    # the flexkv side: the same cells as the passkey grid (cached when it ran)
    plan = []
    for L in lengths:
        for d in depths:
            for ki in range(keys):
                plan.append((hs, L, d, ki))
    flex = {}
    t0 = time.perf_counter()
    flex_plan = [(p, b, *c) for c in plan for p in ["full"] + [p for p, _ in pairs]
                 for b in ([None] if budgetless(p) else budgets)]
    for p, b, h, L, d, ki in tqdm(flex_plan, desc="kvpress: flexkv side", unit="cell",
                                  dynamic_ncols=True):
        flex[(p, b, L, d, ki)] = passkey.cell(r, prompts, p, b, h, L, d, ki,
                                               ks.flex_params(p) or None)
    # the kvpress side
    from flexkv.passkey import extract_answer

    requests, keyed = [], {}
    for h, L, d, ki in plan:
        ids, answer = prompts.get(h, L, d, ki)
        ctx_len = ks.question_start(r.tok, ids[0].tolist())
        for mode in ks.MODES:
            for p, press in [("full", None)] + pairs:
                for b in ([None] if press is None else budgets):
                    if press is None and mode != "whole":
                        continue
                    key = dict(r.base_key, kind="kvpress", press=press, mode=mode, budget=b,
                               press_params=ks.press_params(press), haystack=h,
                               filler=prompts.filler_digest[h], needle=a.needle, chat=prompts.chat, length=L,
                               depth=d, key_idx=ki, seed=a.seed, max_new_tokens=a.max_new_tokens,
                               kvpress=ks.KVPRESS_VERSION)
                    rid = len(keyed)
                    keyed[rid] = (key, p, press, mode, b, L, d, ki, answer)
                    if r.cache.get(key) is None:      # a hit counts once, here
                        requests.append(dict(id=rid, input_ids=ids[0].tolist(), ctx_len=ctx_len,
                                             press=press, mode=mode, budget=b,
                                             params=ks.press_params(press),
                                             max_new_tokens=a.max_new_tokens))
    def on_result(res):
        key, *_rest, answer = keyed[res["id"]]
        text = r.tok.decode(res["tokens"], skip_special_tokens=True)
        got = extract_answer(text)
        r.cache.put(key, dict(answer=answer, got=got, text=text[:80], correct=got == answer,
                              kept=res.get("kept"), wall_s=res.get("wall_s")))

    ask_worker(r, py, requests, on_result, "kvpress: kvpress side", notes)
    rows = []
    for rid, (key, p, press, mode, b, L, d, ki, answer) in keyed.items():
        res = r.cache.peek(key)
        if res is None:
            continue
        fx = flex.get((p, b, L, d, ki), {})
        rows.append(dict(policy=p, press=press or "none", mode=mode, budget=b, length=L, depth=d,
                         key_idx=ki, kvpress_correct=res["correct"], kvpress_got=res["got"],
                         kvpress_kept=res.get("kept"), flexkv_correct=fx.get("correct"),
                         flexkv_got=fx.get("got"), answer=answer))
    return dict(rows=rows, venv=str(Path(a.kvpress_venv)), kvpress_version=ks.KVPRESS_VERSION,
                modes=ks.MODE_DOC, press_params={p: ks.press_params(s) for p, s in pairs},
                flex_params={p: ks.flex_params(p) for p, _ in pairs},
                wall_s=round(time.perf_counter() - t0, 1), lengths=lengths, depths=depths,
                budgets=budgets, keys=keys, haystack=hs)

def section(res: dict, cfg: dict, policies: list[str], meta: dict, out_dir: Path, name: str):
    L, pngs = [], []
    kv = res
    ks = kvpress_side()

    L += ["## Side by side with kvpress", "",
          f"kvpress {kv['kvpress_version']} in its own virtualenv ({kv['venv']}), the same "
          f"weights through transformers, the same token ids; lengths {kv['lengths']}, depths "
          f"{kv['depths']}, {kv['keys']} key(s), haystack {kv['haystack']}. Modes: " +
          "; ".join(f"**{m}**: {d}" for m, d in kv["modes"].items()) + ". Wall "
          f"{kv['wall_s']} s.", "",
          "Parameters (kvpress's own; flexkv's set to match where they share a knob): " +
          "; ".join(f"{p} {kv.get('flex_params', {}).get(p) or {}} vs "
                    f"{ks.PRESS_FOR[p]} {kv['press_params'].get(p) or {}}"
                    for p in kv["press_params"]) + ".", ""]
    rows = []
    for p in ["full"] + list(ks.PRESS_FOR):
        for b in sorted({r["budget"] for r in kv["rows"] if r["policy"] == p},
                        key=lambda x: x or 0):
            sel = [r for r in kv["rows"] if r["policy"] == p and r["budget"] == b]
            if not sel:
                continue
            row = [p, sel[0]["press"], "-" if b is None else b]
            fl = [r for r in sel if r["mode"] == "whole"]
            row.append(f"{mean([float(r['flexkv_correct']) for r in fl if r['flexkv_correct'] is not None]) or 0:.2f}")
            for m in ks.MODES:
                ms = [r for r in sel if r["mode"] == m]
                row.append(f"{mean([float(r['kvpress_correct']) for r in ms]):.2f}" if ms else "-")
            agree = [r["kvpress_got"] == r["flexkv_got"] for r in fl]
            row.append(f"{sum(agree)}/{len(agree)}")
            kept = [mean([r["kvpress_kept"] for r in sel if r["mode"] == m
                           and r.get("kvpress_kept") is not None]) for m in ks.MODES]
            row.append(" / ".join("-" if k is None else f"{k:.0f}" for k in kept))
            rows.append(row)
    L += [md_table(["flexkv policy", "kvpress press", "budget", "flexkv acc"] +
                   [f"kvpress {m} acc" for m in ks.MODES] +
                   ["same answer (whole)", "kvpress cache after prefill (" +
                    " / ".join(ks.MODES) + ")"], rows), ""]
    L += ["Why they can differ:", ""] + [f"- {d}" for d in ks.DIFFERENCES] + \
         [f"- {p} vs {press}: {ks.PAIR_NOTES.get(p, '')}" for p, press in ks.PRESS_FOR.items()
          if any(r["policy"] == p for r in kv["rows"])] + [""]
    return L, pngs
