"""Quality of the KV policies on a real model: passkey grid, streaming perplexity, VAM alpha
sweep, and a side-by-side with NVIDIA's kvpress.

    python bench/quality.py --quick                 # a few cells, <= 10 min on a 2-core CPU
    python bench/quality.py                         # the default grid (many hours on a CPU)
    python bench/quality.py --suites passkey --lengths 2048 --budgets 128,256 --keys 1 --name medium
    python bench/quality.py --suites kvpress --lengths 1024 --depths 0.2,0.5,0.8 --budgets 64,128
    flexkv bench quality ...                        # the same through the CLI

Suites (`--suites`, comma-separated; default `passkey,ppl,vam`):

- passkey: a 5-digit key hidden at a relative depth of a haystack (the classic repeated filler and
  real prose from `pydoc_data.topics`), chat template, question at the end, answer prefilled with
  "The pass key is"; exact match of the first digit run of the greedy answer. Grid: prompt length
  x depth x budget x policy x key x haystack.
- ppl: streaming perplexity (StreamingLLM / CaM / WeightedKV protocol): a short prompt, then every
  later token fed one at a time through the decode step (teacher forcing), the policy acting after
  every step; PPL of the next-token NLL over the forced tokens.
- vam: the VAM modifier's alpha swept on top of a few base policies, on the streaming PPL.
- kvpress: the same prompts and budgets through kvpress 0.5.5 (its own virtualenv, created on
  first use under bench/.kvpress-venv; see bench/kvpress_side.py).

The policies are those registered at run time (`flexkv.policies.available()`), plus
`<base>+vam` for the `--vam-variants` bases when the vam modifier is registered.

On a shared or busy CPU pass `--threads 1`: with two cores contended, two torch threads made an
eager decode step ~8x slower than one (measured here: 1184 vs 141 ms per step).

Every cell's result is appended to a JSON-lines cache keyed by the cell's parameters
(`<out>/cells/cells.jsonl`, gitignored): an interrupted run resumes from the cached cells
(`--fresh` ignores them). Results: `<out>/<name>.json`, `<out>/<name>.md` and PNGs, stamped with
the command, commit, device, torch version and wall time.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import random
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent          # bench/
RESULTS = ROOT / "results" / "quality"
DEFAULT_MODEL = "smollm2-135m-instruct"

DEFAULT_GRID = dict(
    lengths=[1024, 2048, 4096],
    depths=[round(i / 10, 1) for i in range(11)],
    budgets=[64, 128, 256, 512],
    keys=3,
    haystacks=["classic", "prose"],
    policies=None,                     # None: every registered policy
    vam_variants=["full", "h2o", "snapkv"],
    ppl_tokens=4096,
    ppl_prompt=16,
    ppl_budgets=None,                  # None: the passkey budgets
    alphas=[0.0, 0.05, 0.1, 0.2, 0.35],
    vam_bases=["full", "h2o", "snapkv"],
    heatmap_budget=128,
)
QUICK_POLICIES = ["full", "streaming", "h2o", "snapkv", "weightedkv", "laprox"]
QUICK_GRID = dict(
    lengths=[1024],
    depths=[0.2, 0.5, 0.8],
    budgets=[64, 128],
    keys=1,
    haystacks=["classic"],
    policies=QUICK_POLICIES,           # those of these that are registered
    vam_variants=[],
    ppl_tokens=1024,
    ppl_prompt=16,
    ppl_budgets=[64],
    ppl_policies=["full", "h2o", "weightedkv"],
    alphas=[0.35],
    vam_bases=["h2o"],
    heatmap_budget=128,
)

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover - tqdm is a dependency of flexkv
    def tqdm(it=None, **_):
        return it


# =========================================================================== text sources
def pydoc_prose(no_digits: bool = False, min_chars: int = 160) -> str:
    """English prose that ships with Python: the prose paragraphs of `pydoc_data.topics` (the
    language reference's topics; code blocks, grammar, tables and headings dropped), in sorted
    topic order. `no_digits` drops paragraphs containing digits (a clean passkey haystack)."""
    from pydoc_data import topics

    paras = []
    for name in sorted(topics.topics):
        for block in re.split(r"\n\s*\n", topics.topics[name]):
            lines = block.split("\n")
            if not lines or any(ln.startswith((" ", "\t")) for ln in lines):
                continue                                  # indented: code, grammar, lists
            para = " ".join(ln.strip() for ln in lines).strip()
            if len(para) < min_chars or re.search(r"\*\*\*|===|---|\|", para):
                continue                                  # headings, tables
            if no_digits and re.search(r"\d", para):
                continue
            letters = sum(c.isalpha() or c == " " for c in para) / len(para)
            if letters < 0.85 or para[-1] not in ".:)\"":
                continue
            paras.append(para)
    return "\n\n".join(paras)


def prose_source() -> str:
    return (f"pydoc_data.topics (the Python {platform.python_version()} language reference "
            "topics that ship with Python), prose paragraphs only")


def haystack_filler(name: str, filler_file: Path | None):
    """(filler text or None for passkey's default, description)."""
    if name == "classic":
        return None, "classic repeated sentences (flexkv.passkey.DEFAULT_FILLER)"
    if name == "prose":
        return pydoc_prose(no_digits=True), prose_source() + ", paragraphs with digits dropped"
    if name == "file":
        if filler_file is None:
            raise ValueError("haystack 'file' needs --filler FILE")
        return filler_file.read_text(), f"file {filler_file.name}"
    raise ValueError(f"unknown haystack {name!r}; allowed: classic, prose, file")


def digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:12]


# =========================================================================== cell cache
class CellCache:
    """JSON lines, one cell per line: {"key": {...params...}, "result": {...}}. Later lines win."""

    def __init__(self, path: Path, fresh: bool = False):
        self.path = path
        self.cells: dict[str, dict] = {}
        self.hits = 0
        self.computed = 0
        if path.exists() and not fresh:
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                    self.cells[self.ident(rec["key"])] = rec["result"]
                except (ValueError, KeyError, TypeError):
                    continue                              # a torn last line of a killed run

    @staticmethod
    def ident(key: dict) -> str:
        return json.dumps(key, sort_keys=True, separators=(",", ":"))

    def get(self, key: dict):
        res = self.cells.get(self.ident(key))
        if res is not None:
            self.hits += 1
        return res

    def peek(self, key: dict):
        """Like get, without counting a cache hit."""
        return self.cells.get(self.ident(key))

    def put(self, key: dict, result: dict) -> None:
        self.cells[self.ident(key)] = result
        self.computed += 1
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps({"key": key, "result": result}, sort_keys=True) + "\n")
            f.flush()


# =========================================================================== policies
def policy_names(requested, vam_variants) -> tuple[list[str], list[str]]:
    """(policies to run, notes). Bases come from flexkv.policies.available() at run time."""
    from flexkv.policies import available, make_policy

    avail = available()
    bases = [a for a in avail if not a.startswith("<policy>+")]
    mods = [a.split("+", 1)[1] for a in avail if a.startswith("<policy>+")]
    notes = []
    if requested is None:
        pols = list(bases)
    else:
        pols = []
        for p in requested:
            base = p.split("+")[0]
            if base not in bases:
                notes.append(f"policy {p!r} skipped: not registered (available: {', '.join(bases)})")
                continue
            make_policy(p, budget=None if base == "full" else 64)   # unknown modifier -> error
            pols.append(p)
    if "full" in pols:
        pols.remove("full")
    pols.insert(0, "full")
    for b in vam_variants or []:
        if "vam" not in mods:
            notes.append("+vam variants skipped: the vam modifier is not registered")
            break
        if b in bases and f"{b}+vam" not in pols:
            pols.append(f"{b}+vam")
    return pols, notes


def budgetless(policy: str) -> bool:
    return policy.split("+")[0] == "full"


def resolved_params(policy: str, budget, params=None) -> dict | None:
    """Every parameter of the policy after its defaults (budget aside), for the cell cache keys:
    a changed default then never serves a cell computed under the old one."""
    import dataclasses

    from flexkv.policies import make_policy

    try:
        pol = make_policy(policy, budget=None if budgetless(policy) else budget, **(params or {}))
    except ValueError:
        return None
    out = {}
    while pol is not None and dataclasses.is_dataclass(pol):
        names = [f.name for f in dataclasses.fields(pol) if f.init]
        for n in names:
            if n not in ("budget", "base"):
                v = getattr(pol, n)
                ok = v is None or isinstance(v, (bool, int, float, str, tuple, list))
                out[f"{type(pol).name}.{n}"] = v if ok else type(v).__name__
        pol = getattr(pol, "base", None) if "base" in names else None
    return out


def prefill_only(policy: str, budget=64) -> bool:
    """True for policies that compress the prompt only (decode appends without eviction)."""
    from flexkv.policies import make_policy

    pol = make_policy(policy, budget=None if budgetless(policy) else budget)
    while pol is not None:
        if hasattr(type(pol), "decode_evicts"):
            return not type(pol).decode_evicts and not budgetless(policy)
        pol = getattr(pol, "base", None)
    return False


def eos_ids(tokenizer, model) -> list[int]:
    from flexkv.generate import stop_token_ids
    return stop_token_ids(tokenizer, model)


# =========================================================================== runner
class Runner:
    def __init__(self, args, model, tok, cache: CellCache):
        self.args = args
        self.model = model
        self.tok = tok
        self.cache = cache
        self.device = model.lm_head.weight.device
        self.eos = eos_ids(tok, model) or None
        self.model_tag = args.model if not Path(str(args.model)).is_dir() else \
            f"dir:{Path(args.model).resolve().name}"
        self.base_key = dict(model=self.model_tag, dtype=args.dtype, device=self.device.type)
        self.prompts: dict = {}
        self.missing = 0
        self.errors: dict[tuple, int] = {}   # (suite, policy, budget, message) -> cells

    # ------------------------------------------------------------------ compile policy
    def compile_for(self, suite: str) -> bool:
        c = self.args.compile
        if c == "on":
            return True
        if c == "off":
            return False
        # auto: on CUDA only. On CPU a compile costs minutes per (policy, budget) graph (measured:
        # ~200 s on the 2-core dev machine) while an eager decode step costs ~50 ms there.
        return self.device.type == "cuda"

    def _fresh_compile(self):
        import torch._dynamo

        torch._dynamo.reset()    # every (policy, budget) is a new graph: no recompile limit hit

    def error(self, suite, policy, budget, e, params=None):
        """A policy that refuses a cell (e.g. a budget below its window): noted, not fatal."""
        msg = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        k = (suite, policy + (f" {params}" if params else ""), budget, msg)
        self.errors[k] = self.errors.get(k, 0) + 1

    # ------------------------------------------------------------------ passkey
    def prompt(self, haystack: str, length: int, depth: float, key_idx: int):
        k = (haystack, length, depth, key_idx)
        if k not in self.prompts:
            from flexkv.passkey import build_passkey_prompt, random_key

            filler, _ = self.haystacks[haystack]
            key = random_key(random.Random(f"{self.args.seed}-{length}-{depth}-{key_idx}"))
            ids, answer = build_passkey_prompt(self.tok, length, depth, key, filler=filler,
                                               needle=self.args.needle, chat=self.chat)
            self.prompts[k] = (ids, answer)
        return self.prompts[k]

    def passkey_key(self, policy, budget, haystack, length, depth, key_idx, params=None) -> dict:
        k = dict(self.base_key, kind="passkey", policy=policy, budget=budget, haystack=haystack,
                 filler=self.filler_digest[haystack], needle=self.args.needle, chat=self.chat,
                 length=length, depth=depth, key_idx=key_idx, seed=self.args.seed,
                 max_new_tokens=self.args.max_new_tokens)
        resolved = resolved_params(policy, budget, params)
        if resolved:  # (none for full/tova: their cached cells keep their keys)
            k["resolved"] = resolved
        if params:
            k["params"] = params
        return k

    def lookup(self, key):
        """A cached cell, a `missing` marker under --cached-only, or None (compute it)."""
        hit = self.cache.get(key)
        if hit is not None:
            return dict(hit, cached=True)
        if self.args.cached_only:
            self.missing += 1
            return dict(missing=True)
        return None

    def passkey_cell(self, policy, budget, haystack, length, depth, key_idx, params=None):
        key = self.passkey_key(policy, budget, haystack, length, depth, key_idx, params)
        hit = self.lookup(key)
        if hit is not None:
            return hit
        import flexkv
        from flexkv.passkey import extract_answer

        ids, answer = self.prompt(haystack, length, depth, key_idx)
        ids = ids.to(self.device)
        comp = self.compile_for("passkey")
        if comp:
            self._fresh_compile()
        t0 = time.perf_counter()
        try:
            out = flexkv.generate(self.model, ids, max_new_tokens=self.args.max_new_tokens,
                                  policy=policy, budget=None if budgetless(policy) else budget,
                                  compile=comp, eos_token_id=self.eos, **(params or {}))
        except (ValueError, RuntimeError, NotImplementedError) as e:   # a policy's limitation
            self.error("passkey", policy, budget, e)
            return dict(error=str(e)[:300])
        wall = time.perf_counter() - t0
        T = ids.shape[1]
        text = self.tok.decode(out.tokens[0, T:].tolist(), skip_special_tokens=True)
        got = extract_answer(text)
        res = dict(answer=answer, got=got, text=text[:80], correct=got == answer, prompt_len=T,
                   retained=round(float(out.cache.retained().float().mean()), 1),
                   wall_s=round(wall, 3), prefill_s=round(out.prefill_s, 3))
        self.cache.put(key, res)
        return res

    # ------------------------------------------------------------------ streaming PPL
    def ppl_tokens(self):
        if not hasattr(self, "_ppl_ids"):
            a = self.args
            if a.text:
                text, src = Path(a.text).read_text(), f"file {Path(a.text).name}"
            else:
                text, src = pydoc_prose(), prose_source()
            need = a.ppl_prompt + a.ppl_tokens
            ids = self.tok(text, add_special_tokens=False)["input_ids"]
            if len(ids) < need:
                raise ValueError(f"--text: the text has {len(ids)} tokens, the streaming PPL needs "
                                 f"--ppl-prompt + --ppl-tokens = {need}")
            self._ppl_ids = torch.tensor([ids[:need]], dtype=torch.long)
            self.ppl_source = dict(source=src, text_sha1=digest(text), tokens=need,
                                   prompt_tokens=a.ppl_prompt, scored_tokens=a.ppl_tokens)
        return self._ppl_ids

    def ppl_cell(self, policy, budget, params=None):
        a = self.args
        ids = self.ppl_tokens()
        key = dict(self.base_key, kind="ppl", policy=policy, budget=budget,
                   text=self.ppl_source["text_sha1"], prompt_tokens=a.ppl_prompt,
                   tokens=a.ppl_tokens)
        resolved = resolved_params(policy, budget, params)
        if resolved:
            key["resolved"] = resolved
        if params:
            key["params"] = params
        hit = self.lookup(key)
        if hit is not None:
            return hit
        import flexkv

        ids = ids.to(self.device)
        first, rest = ids[:, :a.ppl_prompt], ids[:, a.ppl_prompt:]
        comp = self.compile_for("ppl")
        if comp:
            self._fresh_compile()
        vnorm, step = [], [0]

        def track(cache):  # the kept values' mean norm every 64 steps (cam's merge adds to them)
            if step[0] % 64 == 0 or step[0] == rest.shape[1] - 1:
                vnorm.append(round(kept_value_norm(cache), 4))
            step[0] += 1

        t0 = time.perf_counter()
        try:
            out = flexkv.generate(self.model, first, max_new_tokens=rest.shape[1], policy=policy,
                                  budget=None if budgetless(policy) else budget, compile=comp,
                                  forced_tokens=rest, output_logits=True, cache_callback=track,
                                  **(params or {}))
        except (ValueError, RuntimeError, NotImplementedError) as e:
            self.error("ppl", policy, budget, e, params)
            return dict(error=str(e)[:300])
        wall = time.perf_counter() - t0
        logits = out.logits[0].double()
        nll = torch.nn.functional.cross_entropy(logits, rest[0].to(logits.device), reduction="none")
        nll = nll.cpu()
        del out, logits
        n = nll.numel()
        res = dict(ppl=math.exp(float(nll.mean())), nll=round(float(nll.mean()), 5),
                   ppl_second_half=math.exp(float(nll[n // 2:].mean())), tokens=n,
                   wall_s=round(wall, 2), step_ms=round(1e3 * wall / n, 2), compiled=comp,
                   nll_curve=[round(float(x), 4) for x in _block_means(nll, 64)],
                   vnorm_curve=vnorm, vnorm_growth=round(vnorm[-1] / vnorm[0], 3) if vnorm else None)
        self.cache.put(key, res)
        return res


def kept_value_norm(cache) -> float:
    """Mean L2 norm of the values a cache holds (valid slots, averaged over layers)."""
    return float(torch.stack([lc.v[lc.pos >= 0].float().norm(dim=-1).mean()
                              for lc in cache.layers]).mean())


def _block_means(x: torch.Tensor, block: int):
    return [x[i:i + block].mean() for i in range(0, x.numel(), block)]


# =========================================================================== suites
def run_passkey(r: Runner, cfg: dict, policies: list[str]) -> dict:
    cells = []
    plan = []
    for hs in cfg["haystacks"]:
        for L in cfg["lengths"]:
            for d in cfg["depths"]:
                for ki in range(cfg["keys"]):
                    for p in policies:
                        for b in ([None] if budgetless(p) else cfg["budgets"]):
                            plan.append((p, b, hs, L, d, ki))
    t0 = time.perf_counter()
    for p, b, hs, L, d, ki in tqdm(plan, desc="passkey", unit="cell", dynamic_ncols=True):
        res = r.passkey_cell(p, b, hs, L, d, ki)
        cells.append(dict(policy=p, budget=b, haystack=hs, length=L, depth=d, key_idx=ki, **res))
    return dict(cells=cells, wall_s=round(time.perf_counter() - t0, 1), n_cells=len(plan))


def run_ppl(r: Runner, cfg: dict, policies: list[str]) -> dict:
    budgets = cfg.get("ppl_budgets") or cfg["budgets"]
    pols = cfg.get("ppl_policies_resolved") or policies
    plan = [(p, b) for p in pols for b in ([None] if budgetless(p) else budgets)]
    r.ppl_tokens()
    cells = []
    t0 = time.perf_counter()
    for p, b in tqdm(plan, desc="ppl", unit="run", dynamic_ncols=True):
        res = r.ppl_cell(p, b)
        cells.append(dict(policy=p, budget=b, prefill_only=prefill_only(p), **res))
    return dict(cells=cells, budgets=budgets, source=r.ppl_source,
                wall_s=round(time.perf_counter() - t0, 1), n_cells=len(plan))


def run_vam(r: Runner, cfg: dict, notes: list[str]) -> dict | None:
    from flexkv.policies import available

    avail = available()
    if "<policy>+vam" not in avail:
        notes.append("VAM sweep skipped: the vam modifier is not registered")
        return None
    bases = [b for b in cfg["vam_bases"] if b in avail]
    for b in cfg["vam_bases"]:
        if b not in avail:
            notes.append(f"VAM sweep: base {b!r} skipped (not registered)")
    budgets = cfg.get("ppl_budgets") or cfg["budgets"]
    plan = []
    for base in bases:
        for b in ([None] if budgetless(base) else budgets):
            plan.append((base, b, None))                         # the base itself
            for al in cfg["alphas"]:
                plan.append((f"{base}+vam", b, al))
    r.ppl_tokens()
    cells = []
    t0 = time.perf_counter()
    for p, b, al in tqdm(plan, desc="vam", unit="run", dynamic_ncols=True):
        res = r.ppl_cell(p, b, None if al is None else {"alpha": al})
        cells.append(dict(policy=p, base=p.split("+")[0], budget=b, alpha=al,
                          prefill_only=prefill_only(p.split("+")[0]), **res))
    return dict(cells=cells, source=r.ppl_source, wall_s=round(time.perf_counter() - t0, 1),
                n_cells=len(plan))


def run_kvpress(r: Runner, cfg: dict, policies: list[str], notes: list[str]) -> dict | None:
    sys.path.insert(0, str(ROOT))
    import kvpress_side as ks

    a = r.args
    venv = Path(a.kvpress_venv)
    py = ks.ensure_venv(venv, setup=a.kvpress_setup, log=lambda m: print(m, file=sys.stderr))
    if py is None:
        notes.append(f"kvpress side by side skipped: no kvpress virtualenv at {venv} "
                     "(run with --kvpress-setup to create it)")
        return None
    pairs = [(p, press) for p, press in ks.PRESS_FOR.items() if p in policies]
    lengths = a.kvpress_lengths or cfg["lengths"]
    depths = a.kvpress_depths or cfg["depths"]
    budgets = a.kvpress_budgets or cfg["budgets"]
    keys = a.kvpress_keys or cfg["keys"]
    hs = cfg["haystacks"][0]
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
        flex[(p, b, L, d, ki)] = r.passkey_cell(p, b, h, L, d, ki, ks.flex_params(p) or None)
    # the kvpress side
    from flexkv.passkey import extract_answer

    model_dir = ks.model_dir(a.model)
    requests, keyed = [], {}
    for h, L, d, ki in plan:
        ids, answer = r.prompt(h, L, d, ki)
        ctx_len = ks.question_start(r.tok, ids[0].tolist())
        for mode in ks.MODES:
            for p, press in [("full", None)] + pairs:
                for b in ([None] if press is None else budgets):
                    if press is None and mode != "whole":
                        continue
                    key = dict(r.base_key, kind="kvpress", press=press, mode=mode, budget=b,
                               press_params=ks.press_params(press), haystack=h,
                               filler=r.filler_digest[h], needle=a.needle, chat=r.chat, length=L,
                               depth=d, key_idx=ki, seed=a.seed, max_new_tokens=a.max_new_tokens,
                               kvpress=ks.KVPRESS_VERSION)
                    rid = len(keyed)
                    keyed[rid] = (key, p, press, mode, b, L, d, ki, answer)
                    if r.cache.get(key) is None:      # a hit counts once, here
                        requests.append(dict(id=rid, input_ids=ids[0].tolist(), ctx_len=ctx_len,
                                             press=press, mode=mode, budget=b,
                                             params=ks.press_params(press),
                                             max_new_tokens=a.max_new_tokens))
    if requests and a.cached_only:
        r.missing += len(requests)
    elif requests:
        bar = tqdm(total=len(requests), desc="kvpress: kvpress side", unit="cell",
                   dynamic_ncols=True)

        def on_result(res):
            key, *_rest, answer = keyed[res["id"]]
            text = r.tok.decode(res["tokens"], skip_special_tokens=True)
            got = extract_answer(text)
            r.cache.put(key, dict(answer=answer, got=got, text=text[:80], correct=got == answer,
                                  kept=res.get("kept"), wall_s=res.get("wall_s")))
            bar.update(1)

        err = ks.run_worker(py, model_dir, requests, device=r.device.type, dtype=a.dtype,
                            on_result=on_result)
        bar.close()
        if err:
            notes.append(f"kvpress worker: {err}")
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
    return dict(rows=rows, venv=str(venv), kvpress_version=ks.KVPRESS_VERSION,
                modes=ks.MODE_DOC, press_params={p: ks.press_params(s) for p, s in pairs},
                flex_params={p: ks.flex_params(p) for p, _ in pairs},
                wall_s=round(time.perf_counter() - t0, 1), lengths=lengths, depths=depths,
                budgets=budgets, keys=keys, haystack=hs)


# =========================================================================== aggregation
def _mean(xs):
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
            row[b] = (_mean(vals), len(sel))
        out[p] = row
    return out


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


# =========================================================================== plots
def _plt():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


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


def plot_lines(out_dir: Path, fname: str, title: str, ylabel: str, series: dict, xs, baseline=None,
               logy=False, xlabel="budget (tokens kept per head)", logx=True) -> str | None:
    plt = _plt()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
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


# =========================================================================== report
def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                             capture_output=True).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               text=True, capture_output=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except OSError:
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or "cpu"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def default_grid_policies() -> list[str]:
    """The policies the default grid runs now: every registered one, plus the +vam variants."""
    return policy_names(None, DEFAULT_GRID["vam_variants"])[0]


def estimate_default_grid(res: dict) -> dict | None:
    """Wall time of the default grid, extrapolated from the measured times of this run's cells
    (for cached cells, the time measured when they ran): a passkey cell's time scales linearly with its prompt length (the
    prefill dominates), a PPL run's with its number of streamed tokens."""
    def measured(cells):          # cached cells carry the time measured when they ran
        return [c for c in cells if "wall_s" in c]

    pk = measured(res.get("passkey", {}).get("cells", []))
    pp = measured(res.get("ppl", {}).get("cells", []) + res.get("vam", {}).get("cells", []))
    if not pk and not pp:
        return None
    g = DEFAULT_GRID
    pols = default_grid_policies()
    free = sum(budgetless(p) for p in pols)
    n_pol_b = free + (len(pols) - free) * len(g["budgets"])
    per_prompt = len(g["haystacks"]) * len(g["depths"]) * g["keys"] * n_pol_b
    est = dict(policies=len(pols))
    if pk:
        per_tok = sum(c["wall_s"] for c in pk) / sum(c["length"] for c in pk)
        rates = sorted(c["wall_s"] / c["length"] for c in pk)
        fast = rates[len(rates) // 10]          # the fastest decile: closest to an idle machine
        est["passkey_cells"] = per_prompt * len(g["lengths"])
        est["passkey_s_per_1k_prompt_tokens"] = round(1e3 * per_tok, 2)
        est["passkey_h"] = round(per_tok * per_prompt * sum(g["lengths"]) / 3600, 1)
        est["passkey_h_at_fastest_decile"] = round(fast * per_prompt * sum(g["lengths"]) / 3600, 1)
    if pp:
        per_step = sum(c["wall_s"] for c in pp) / sum(c["tokens"] for c in pp)
        from flexkv.policies import available

        vam_runs = 0
        if "<policy>+vam" in available():
            vam_runs = sum((1 if budgetless(b) else len(g["budgets"])) * (1 + len(g["alphas"]))
                           for b in g["vam_bases"] if b in available())
        est["ppl_runs"] = n_pol_b
        est["vam_runs"] = vam_runs
        est["ppl_s_per_token"] = round(per_step, 4)
        est["ppl_h"] = round(per_step * g["ppl_tokens"] * n_pol_b / 3600, 1)
        est["vam_h"] = round(per_step * g["ppl_tokens"] * vam_runs / 3600, 1)
    est["total_h"] = round(sum(v for k, v in est.items() if k.endswith("_h")), 1)
    if "passkey_h_at_fastest_decile" in est:
        est["total_h_at_fastest_decile"] = round(est["total_h"] - est["passkey_h"] +
                                                 est["passkey_h_at_fastest_decile"], 1)
    return est


def report(out_dir: Path, name: str, meta: dict, cfg: dict, policies: list[str], res: dict,
           notes: list[str]) -> str:
    L = [f"# Quality: {name}", "",
         f"`{meta['command']}`  ",
         f"commit {meta['commit']}, device {meta['device']}, torch {meta['torch']}, "
         f"transformers {meta['transformers']}, model {meta['model']} ({meta['dtype']}), "
         f"wall {meta['wall_s']} s ({meta['cells_computed']} cells computed, "
         f"{meta['cells_cached']} from the cell cache)", "",
         f"Policies (registered at run time): {', '.join(policies)}", ""]
    pngs = []
    pk = res.get("passkey")
    if pk:
        budgets = cfg["budgets"]
        cells = pk["cells"]
        L += ["## Passkey retrieval", "",
              f"Exact match of the first digit run of the greedy answer ({meta['max_new_tokens']} "
              f"new tokens). Chat template, question at the end, answer prefilled with \"The pass "
              f"key is\". Lengths {cfg['lengths']}, depths {cfg['depths']}, {cfg['keys']} key(s) "
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
    pp = res.get("ppl")
    if pp:
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
    vm = res.get("vam")
    if vm:
        alphas = cfg["alphas"]
        L += ["## VAM alpha sweep (streaming PPL)", "",
              "VAM acts at decode steps only, so it is swept on the streaming PPL (in the passkey "
              "task only the few answer tokens are decoded). alpha = 0 must equal the base policy.",
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
    kv = res.get("kvpress")
    if kv:
        sys.path.insert(0, str(ROOT))
        import kvpress_side as ks

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
                row.append(f"{_mean([float(r['flexkv_correct']) for r in fl if r['flexkv_correct'] is not None]) or 0:.2f}")
                for m in ks.MODES:
                    ms = [r for r in sel if r["mode"] == m]
                    row.append(f"{_mean([float(r['kvpress_correct']) for r in ms]):.2f}" if ms else "-")
                agree = [r["kvpress_got"] == r["flexkv_got"] for r in fl]
                row.append(f"{sum(agree)}/{len(agree)}")
                kept = [_mean([r["kvpress_kept"] for r in sel if r["mode"] == m
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
    est = meta.get("estimate")
    if est:
        L += ["## Wall time of the default grid", "",
              f"Estimated from this run's measured per-cell times ({meta['device']}): " +
              ", ".join(f"{k} = {v}" for k, v in est.items()) + ". This is an "
              "extrapolation (per-cell times x the default grid's cell count), not a measurement "
              "of the full grid.", ""]
    if notes:
        L += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    if pngs:
        L += ["Plots: " + ", ".join(f"`{p}`" for p in pngs), ""]
    return "\n".join(L)


# =========================================================================== main
def _floats(s):
    return [float(x) for x in s.split(",") if x.strip()]


def _ints(s):
    return [int(x) for x in s.split(",") if x.strip()]


def _strs(s):
    return [x.strip() for x in s.split(",") if x.strip()]


def _depths(s):
    if "," not in s and "." not in s:
        n = int(s)
        if n < 1:
            raise argparse.ArgumentTypeError("--depths N needs N >= 1")
        return [round(i / (n - 1), 3) for i in range(n)] if n > 1 else [0.5]
    return _floats(s)


def build_parser():
    ap = argparse.ArgumentParser(prog="flexkv bench quality",
                                 description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="a few cells (1K tokens, 3 depths, budgets 64/128, 1 key, a handful of "
                    "policies, PPL over 1K tokens): <= 10 min on a 2-core CPU")
    ap.add_argument("--name", help="result file stem (default: quick / default)")
    ap.add_argument("--suites", type=_strs, default=None,
                    help="comma-separated of passkey, ppl, vam, kvpress (default passkey,ppl,vam)")
    ap.add_argument("--kvpress", action="store_true", help="add the kvpress suite")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="known model name or HF checkpoint dir")
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda if available)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                    help="compile the decode step (auto: on CUDA only)")
    g = ap.add_argument_group("grid (defaults: the issue's grid, or --quick's)")
    g.add_argument("--policies", type=_strs, help="comma-separated (default: every registered one)")
    g.add_argument("--vam-variants", type=_strs, help="bases that also run as <base>+vam "
                   "(default full,h2o,snapkv; '' for none)")
    g.add_argument("--lengths", type=_ints, help="prompt lengths in tokens (default 1024,2048,4096)")
    g.add_argument("--depths", type=_depths, help="needle depths: N (evenly 0..1) or a list "
                   "(default 11)")
    g.add_argument("--budgets", type=_ints, help="default 64,128,256,512")
    g.add_argument("--keys", type=int, help="random keys per cell (default 3)")
    g.add_argument("--seed", type=int, default=0, help="seed of the keys")
    g.add_argument("--haystacks", type=_strs, help="classic, prose, file (default classic,prose)")
    g.add_argument("--filler", type=Path, help="a text file for the 'file' haystack")
    g.add_argument("--needle", default=None, help="needle template with {key} (default: passkey's)")
    g.add_argument("--max-new-tokens", type=int, default=8)
    g.add_argument("--heatmap-budget", type=int, help="budget of the heatmaps (default 128)")
    p = ap.add_argument_group("streaming perplexity / VAM")
    p.add_argument("--text", type=Path, help="text file for the PPL (default: pydoc_data.topics prose)")
    p.add_argument("--ppl-tokens", type=int, help="scored tokens (default 4096)")
    p.add_argument("--ppl-prompt", type=int, help="prompt tokens before streaming (default 16)")
    p.add_argument("--ppl-budgets", type=_ints, help="default: the passkey budgets")
    p.add_argument("--ppl-policies", type=_strs, help="default: the passkey policies")
    p.add_argument("--alphas", type=_floats, help="VAM alphas (default 0,0.05,0.1,0.2,0.35)")
    p.add_argument("--vam-bases", type=_strs, help="default full,h2o,snapkv")
    k = ap.add_argument_group("kvpress side by side")
    k.add_argument("--kvpress-venv", default=str(ROOT / ".kvpress-venv"))
    k.add_argument("--kvpress-setup", action=argparse.BooleanOptionalAction, default=True,
                   help="create the kvpress virtualenv when missing (pip; default on)")
    k.add_argument("--kvpress-lengths", type=_ints)
    k.add_argument("--kvpress-depths", type=_depths)
    k.add_argument("--kvpress-budgets", type=_ints)
    k.add_argument("--kvpress-keys", type=int)
    o = ap.add_argument_group("output")
    o.add_argument("--out", type=Path, default=RESULTS)
    o.add_argument("--cells", type=Path, help="cell cache (default <out>/cells/cells.jsonl)")
    o.add_argument("--fresh", action="store_true", help="ignore cached cells (recompute)")
    o.add_argument("--cached-only", action="store_true",
                   help="compute nothing: report the cached cells of the grid (missing ones are "
                   "left out and counted)")
    return ap


def config(args) -> dict:
    cfg = dict(QUICK_GRID if args.quick else DEFAULT_GRID)
    for k in ("lengths", "depths", "budgets", "keys", "haystacks", "policies", "vam_variants",
              "ppl_tokens", "ppl_prompt", "ppl_budgets", "ppl_policies", "alphas", "vam_bases",
              "heatmap_budget"):
        v = getattr(args, k, None)
        if v is not None:
            cfg[k] = v
    if cfg["heatmap_budget"] not in cfg["budgets"]:
        cfg["heatmap_budget"] = cfg["budgets"][min(1, len(cfg["budgets"]) - 1)]
    return cfg


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = build_parser()
    args = ap.parse_args(argv)
    cfg = config(args)
    suites = args.suites or ["passkey", "ppl", "vam"]
    if args.kvpress and "kvpress" not in suites:
        suites.append("kvpress")
    bad = sorted(set(suites) - {"passkey", "ppl", "vam", "kvpress"})
    if bad:
        ap.error(f"--suites: unknown {bad}; allowed: passkey, ppl, vam, kvpress")
    if not cfg["lengths"] or not cfg["depths"] or not cfg["budgets"] or cfg["keys"] < 1:
        ap.error("the grid needs at least one length, depth, budget and key")
    if any(not 0 <= d <= 1 for d in cfg["depths"]):
        ap.error("--depths must lie in [0, 1]")
    if any(b < 1 for b in cfg["budgets"]):
        ap.error("--budgets must be >= 1")
    if cfg["ppl_prompt"] < 1 or cfg["ppl_tokens"] < 2:
        ap.error("--ppl-prompt must be >= 1 and --ppl-tokens >= 2")
    args.ppl_tokens, args.ppl_prompt = cfg["ppl_tokens"], cfg["ppl_prompt"]
    if args.max_new_tokens < 1:
        ap.error("--max-new-tokens must be >= 1")
    name = args.name or ("quick" if args.quick else "default")
    if not re.fullmatch(r"[\w.-]+", name):
        ap.error("--name: letters, digits, '_', '-', '.' only")

    import flexkv
    from flexkv.cli import _device

    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    notes: list[str] = []
    policies, pn = policy_names(cfg["policies"], cfg["vam_variants"])
    notes += pn
    if cfg.get("ppl_policies") is not None:
        cfg["ppl_policies_resolved"], pn2 = policy_names(cfg["ppl_policies"], [])
        notes += [n for n in pn2 if n not in notes]
    device = _device(args.device)
    print(f"[quality] loading {args.model} ({device}, {args.dtype}) ...", file=sys.stderr, flush=True)
    model, tok = flexkv.load_model(args.model, device=device, dtype=getattr(torch, args.dtype))
    if tok is None:
        raise ValueError(f"--model {args.model}: the checkpoint has no tokenizer")
    cache = CellCache(args.cells or args.out / "cells" / "cells.jsonl", fresh=args.fresh)
    r = Runner(args, model, tok, cache)
    r.chat = bool(getattr(tok, "chat_template", None))
    if not r.chat:
        notes.append("the tokenizer has no chat template: plain passkey prompts")
    r.haystacks, r.filler_digest, hs_desc = {}, {}, {}
    for hs in cfg["haystacks"]:
        filler, desc = haystack_filler(hs, args.filler)
        r.haystacks[hs] = (filler, desc)
        r.filler_digest[hs] = "default" if filler is None else digest(filler)
        hs_desc[hs] = desc
    print(f"[quality] policies: {', '.join(policies)}; suites: {', '.join(suites)}",
          file=sys.stderr, flush=True)

    res: dict = {}
    if "passkey" in suites:
        res["passkey"] = run_passkey(r, cfg, policies)
    if "ppl" in suites:
        res["ppl"] = run_ppl(r, cfg, policies)
    if "vam" in suites:
        v = run_vam(r, cfg, notes)
        if v:
            res["vam"] = v
    if "kvpress" in suites:
        kv = run_kvpress(r, cfg, policies, notes)
        if kv:
            res["kvpress"] = kv
    if r.missing:
        notes.append(f"--cached-only: {r.missing} cell(s) of the grid were not in the cache and "
                     "are left out of the tables")
    notes += [f"{suite}: {pol} at budget {b} not run ({n} cell(s)): {msg}"
              for (suite, pol, b, msg), n in r.errors.items()]

    import transformers

    wall = time.perf_counter() - t_start
    meta = dict(command="python bench/quality.py " + shlex.join(argv), commit=git_commit(),
                device=device_name(torch.device(device)), torch=torch.__version__,
                transformers=transformers.__version__, python=platform.python_version(),
                wall_s=round(wall, 1), model=r.model_tag, dtype=args.dtype, suites=suites,
                max_new_tokens=args.max_new_tokens, haystacks=hs_desc, compile=args.compile,
                cells_computed=cache.computed, cells_cached=cache.hits,
                registered=flexkv.policies.available(), date=time.strftime("%Y-%m-%d %H:%M:%S"))
    meta["estimate"] = estimate_default_grid(res)
    args.out.mkdir(parents=True, exist_ok=True)
    cfg_out = {k: v for k, v in cfg.items() if k != "ppl_policies_resolved"}
    md = report(args.out, name, meta, cfg, policies, res, notes)
    (args.out / f"{name}.md").write_text(md)
    (args.out / f"{name}.json").write_text(json.dumps(
        dict(meta=meta, config=cfg_out, policies=policies, notes=notes, results=res),
        indent=1, default=str))
    print(md)
    print(f"[quality] wrote {args.out / (name + '.md')} and .json ({wall:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
