"""CPU prefill and end to end: flexkv against kvpress (on transformers) on the same prompt, one run.

    python bench/prefill_cpu.py                    # 4K passkey prompt + 32 greedy tokens, 3 trials,
                                                  # every policy both have (PAIRS)
    python bench/prefill_cpu.py --length 1024 --trials 1 --no-kvpress     # a quick look
    python bench/prefill_cpu.py --out bench/results/prefill/mine.md      # elsewhere
    python bench/prefill_cpu.py --prefill-chunk 512 --no-kvpress --pairs full,streaming,snapkv,h2o,tova
                                                  # flexkv's chunked prefill (cpu-4096-chunk512)
    python bench/prefill_cpu.py --prefill-only --pairs streaming,tova,keydiff,h2o --flexkv-only ""
                                                  # the same work as kvpress's presses
    python bench/prefill_cpu.py --dtype bfloat16 --out bench/results/prefill/cpu-4096-bf16
                                                  # both sides in bf16 (AMX on CPUs that have it)

Rows, per policy: flexkv `generate` (eager decode, as `flexkv demo` runs on CPU; exactly
`--new-tokens` greedy tokens, no stop token) and kvpress 0.5.5's press for the same method on
transformers (`model(prompt)` under the press, then the same number of greedy decode steps on its
`DynamicCache`; a press compresses the prompt only, the cache then grows; flexkv's decode-time
policies evict at every decode step unless `--prefill-only` runs them with `prefill_only=True`,
which is the presses' work): wall time end to end, prefill time, decode tokens/s, and the ratios flexkv /
kvpress and (flexkv) policy prefill / `full` prefill. kvpress runs in its own virtualenv
(bench/.kvpress-venv, created on first use by bench/kvpress_side.py) as a worker process that
stays up for the whole run and answers one request at a time, so the two sides never run at the
same time and their trials interleave (the same load drifts over both). transformers uses SDPA
attention (its default, the faster one here) except for ObservedAttentionPress, which needs the
eager attention's weights.

Timing: `--trials` rounds (each configuration once per round, after a warm-up on a short prompt);
the table reports each configuration's minimum over the rounds (the least disturbed one) and,
for the flexkv / kvpress ratio, also the median over rounds of each round's ratio (the two sides
of a policy run back to back, so a round's ratio sees one machine state); the json keeps every
trial, and `python bench/prefill_cpu.py render <results path>` rewrites the table from it.
Other jobs on a shared machine slow any trial: the load average is recorded before and after
each measurement and in the results; compare ratios taken in one run.
Results: `<out>.md` and `<out>.json` (default bench/results/prefill/cpu-<length>), stamped with
the command, commit, torch/transformers/kvpress versions, threads and wall time.

This file must not import flexkv at module level: the kvpress venv runs it as the worker
(`python prefill_cpu.py worker`).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "prefill"
sys.path.insert(0, str(ROOT))
from stamp import commit_id  # noqa: E402

# flexkv policy -> kvpress press (None: no press, the full cache) and whether it needs eager
# attention; "Outer(Inner)" is a press wrapping a scorer press (kvpress's AdaKVPress)
PAIRS = {
    "full": (None, False),
    "streaming": ("StreamingLLMPress", False),
    "snapkv": ("SnapKVPress", False),
    "tova": ("TOVAPress", False),
    "h2o": ("ObservedAttentionPress", True),
    "keydiff": ("KeyDiffPress", False),
    "pyramidkv": ("PyramidKVPress", False),
    "adakv": ("AdaKVPress(SnapKVPress)", False),
}


def split_press(name: str) -> tuple[str | None, str]:
    """A press name -> (wrapping press or None, scorer press): `AdaKVPress(SnapKVPress)` ->
    ("AdaKVPress", "SnapKVPress"), `TOVAPress` -> (None, "TOVAPress")."""
    if name.endswith(")") and "(" in name:
        outer, inner = name[:-1].split("(", 1)
        return outer, inner
    return None, name


def make_press(kvpress, name: str, ratio: float, params: dict):
    """kvpress's press `name` at `compression_ratio=ratio`; for "Outer(Inner)" the inner scorer
    press takes the ratio and `params`, the outer one wraps it (`AdaKVPress(press=...)`)."""
    outer, inner = split_press(name)
    press = getattr(kvpress, inner)(compression_ratio=ratio, **params)
    return press if outer is None else getattr(kvpress, outer)(press=press)


# =========================================================================== worker (kvpress venv)
def _worker() -> int:
    """Reads one JSON request per line on stdin, answers one JSON line on stdout."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    import kvpress

    torch.set_grad_enabled(False)
    models: dict[str, object] = {}
    spec = None
    for line in sys.stdin:
        r = json.loads(line)
        if r["op"] == "init":
            spec = r
            torch.set_num_threads(r["threads"])
            import importlib.metadata as md
            print(json.dumps(dict(transformers=md.version("transformers"),
                                  kvpress=md.version("kvpress"), torch=torch.__version__,
                                  threads=torch.get_num_threads())), flush=True)
            continue
        if r["op"] == "quit":
            break
        attn = r["attn"]
        if attn not in models:
            models[attn] = AutoModelForCausalLM.from_pretrained(
                spec["model_dir"], dtype=getattr(torch, spec.get("dtype", "float32")),
                attn_implementation=attn).eval()
        model = models[attn]
        ids = torch.tensor([r["input_ids"]])
        T = ids.shape[1]
        press = None
        if r["press"] is not None and r["budget"] < T:
            ratio = 1.0 - (r["budget"] + 0.5) / T
            press = make_press(kvpress, r["press"], ratio, r["params"])
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        cache = DynamicCache()
        if press is not None:
            with press(model):
                out = model(input_ids=ids, past_key_values=cache, logits_to_keep=1)
        else:
            out = model(input_ids=ids, past_key_values=cache, logits_to_keep=1)
        tok = out.logits[0, -1].argmax()
        t1 = time.perf_counter()
        gen = [int(tok)]
        for i in range(r["new_tokens"] - 1):  # no stop token: exactly new_tokens, as flexkv's side
            out = model(input_ids=tok.view(1, 1), past_key_values=cache,
                        position_ids=torch.tensor([[T + i]]))
            tok = out.logits[0, -1].argmax()
            gen.append(int(tok))
        t2 = time.perf_counter()
        print(json.dumps(dict(wall_s=t2 - t0, prefill_s=t1 - t0, decode_s=t2 - t1,
                              kept=int(cache.get_seq_length()), tokens=gen,
                              load=[load0, os.getloadavg()[0]])), flush=True)
    return 0


class Worker:
    """The kvpress worker process (bench/.kvpress-venv), one request at a time."""

    def __init__(self, py: Path, model_dir: str, threads: int, dtype: str = "float32"):
        env = dict(os.environ, PYTHONPATH="", TOKENIZERS_PARALLELISM="false",
                   OMP_NUM_THREADS=str(threads))
        self.proc = subprocess.Popen([str(py), str(Path(__file__).resolve()), "worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env)
        self.info = self.ask(dict(op="init", model_dir=model_dir, threads=threads, dtype=dtype))

    def ask(self, req: dict) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"kvpress worker exited ({self.proc.wait()})")
            if line.startswith("{"):
                return json.loads(line)

    def close(self):
        try:
            self.proc.stdin.write(json.dumps(dict(op="quit")) + "\n")
            self.proc.stdin.close()
        except OSError:
            pass
        self.proc.wait(timeout=60)


# =========================================================================== main side
def _stamp(argv, wall_s, threads, extra) -> dict:
    import torch

    return dict(command="python bench/prefill_cpu.py " + " ".join(argv), commit=commit_id(),
                torch=torch.__version__, threads=threads, cpu=platform.processor() or "cpu",
                cores=os.cpu_count(), wall_s=round(wall_s, 1), **extra)


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], text=True, capture_output=True).stdout.strip()
    except OSError:
        return "load average: %.2f, %.2f, %.2f" % os.getloadavg()


def run_flexkv(model, ids, policy: str, budget: int | None, new_tokens: int,
               prefill_chunk: int | None = None, prefill_only: bool = False) -> dict:
    import flexkv

    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    out = flexkv.generate(model, ids, max_new_tokens=new_tokens, policy=policy,
                          budget=None if policy == "full" else budget, prefill_chunk=prefill_chunk,
                          **_prefill_only_kw(policy, prefill_only))
    wall = time.perf_counter() - t0
    return dict(wall_s=wall, prefill_s=out.prefill_s, decode_s=out.decode_s,
                kept=int(out.cache.retained().max()), tokens=out.tokens[0, ids.shape[1]:].tolist(),
                load=[load0, os.getloadavg()[0]])


def _prefill_only_kw(policy: str, prefill_only: bool) -> dict:
    """`prefill_only=True` for a policy that evicts at decode, when the run asks for it."""
    from flexkv.policies import make_policy

    if not prefill_only or policy == "full":
        return {}
    return {"prefill_only": True} if make_policy(policy, budget=8).decode_evicts else {}


_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16"}


def _fmt(x, nd=2):
    return "-" if x is None else f"{x:.{nd}f}"


def summarize(trials: list[dict], budget, new_tokens) -> list[dict]:
    """Per (impl, policy): min over trials of wall / prefill / decode, and the ratios."""
    rows: dict[tuple, dict] = {}
    for t in trials:
        key = (t["impl"], t["policy"])
        r = rows.setdefault(key, dict(impl=t["impl"], policy=t["policy"], press=t.get("press"),
                                      attn=t.get("attn"), wall_s=[], prefill_s=[], decode_s=[],
                                      kept=t["kept"], load=[]))
        r["wall_s"].append(t["wall_s"])
        r["prefill_s"].append(t["prefill_s"])
        r["decode_s"].append(t["decode_s"])
        r["load"].extend(t["load"])
    out = []
    for r in rows.values():
        r["n"] = len(r["wall_s"])
        r["wall_min"] = min(r["wall_s"])
        r["prefill_min"] = min(r["prefill_s"])
        d = min(r["decode_s"])
        r["decode_tok_s"] = (new_tokens - 1) / d if d > 0 else None
        r["load_max"] = max(r["load"])
        out.append(r)
    full = {r["impl"]: r["prefill_min"] for r in out if r["policy"] == "full"}
    kv = {r["policy"]: r for r in out if r["impl"] == "kvpress"}
    for r in out:
        r["prefill_vs_full"] = r["prefill_min"] / full[r["impl"]] if r["impl"] in full else None
        if r["impl"] == "flexkv" and r["policy"] in kv:
            r["e2e_vs_kvpress"] = r["wall_min"] / kv[r["policy"]]["wall_min"]
            r["prefill_vs_kvpress"] = r["prefill_min"] / kv[r["policy"]]["prefill_min"]
            # the two sides of a policy run back to back in each round: their per-round ratio
            # sees the same machine state, so its median drifts less than the ratio of minima
            per_round = [a / b for a, b in zip(r["wall_s"], kv[r["policy"]]["wall_s"])]
            r["e2e_vs_kvpress_rounds"] = per_round
            r["e2e_vs_kvpress_median"] = statistics.median(per_round) if per_round else None
        else:
            r["e2e_vs_kvpress"] = r["prefill_vs_kvpress"] = r["e2e_vs_kvpress_median"] = None
    return out


def _rounds(r) -> str:
    if r.get("e2e_vs_kvpress_median") is None:
        return "-"
    each = ", ".join(_fmt(x) for x in r["e2e_vs_kvpress_rounds"])
    return f"{_fmt(r['e2e_vs_kvpress_median'])} ({each})"


def markdown(rows, meta) -> str:
    title = f"flexkv vs kvpress {meta['kvpress']}" if meta.get("kvpress") else "flexkv"
    if meta.get("prefill_chunk"):
        title += f", flexkv's prefill in chunks of {meta['prefill_chunk']}"
    if meta.get("prefill_only"):
        title += ", flexkv's decode-time policies with prefill_only=True"
    if meta.get("dtype", "float32") != "float32":
        title += f", {_DTYPE_NAMES.get(meta['dtype'], meta['dtype'])}"
    lines = [f"# CPU prefill and end to end: {title}", "",
             f"`{meta['command']}`", "",
             f"commit {meta['commit']}, torch {meta['torch']}, transformers "
             f"{meta.get('transformers', '-')}, kvpress {meta.get('kvpress', '-')}, "
             f"{meta['threads']} threads on {meta['cores']} cores ({meta['cpu']}), "
             f"wall {meta['wall_s']} s", "",
             f"Prompt: {meta['prompt_tokens']}-token passkey prompt "
             f"(`build_passkey_prompt(tok, {meta['length']}, 0.5, ...)`), default model, "
             f"{_DTYPE_NAMES.get(meta.get('dtype', 'float32'), meta.get('dtype'))} on both sides; "
             f"{meta['new_tokens']} greedy tokens (no stop token); budget {meta['budget']} "
             f"tokens per head (kvpress: compression_ratio 1 - (budget + 0.5) / T). "
             + (f"flexkv prefills in chunks of {meta['prefill_chunk']} tokens (the policy "
                "compressing between chunks). " if meta.get("prefill_chunk") else "") +
             ("flexkv's decode-time policies run with `prefill_only=True`: they compress the "
              "prompt, then decode appends, as the presses do. " if meta.get("prefill_only")
              else "flexkv's decode-time policies evict at every decode step; the presses "
              "compress the prompt only. ") +
             f"Min over {meta['trials']} trials per row (a warm-up first).", "",
             f"Load before: `{meta['load_before']}`", "",
             f"Load after: `{meta['load_after']}`", "",
             "| impl | policy (press) | attention | e2e s | prefill s | decode tok/s | kept/head "
             "| e2e flexkv/kvpress | e2e flexkv/kvpress, per round: median (each) "
             "| prefill flexkv/kvpress | prefill / full | max load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {p: i for i, p in enumerate(meta["policies"])}
    for r in sorted(rows, key=lambda r: (order.get(r["policy"], 99), r["impl"] != "flexkv")):
        name = r["policy"] + (f" ({r['press']})" if r["impl"] == "kvpress" and r["press"] else "")
        lines.append(
            f"| {r['impl']} | {name} | {r['attn'] or 'sdpa (dense mask / is_causal)'} | "
            f"{_fmt(r['wall_min'])} | {_fmt(r['prefill_min'])} | {_fmt(r['decode_tok_s'], 1)} | "
            f"{r['kept']} | {_fmt(r['e2e_vs_kvpress'])} | {_rounds(r)} | "
            f"{_fmt(r['prefill_vs_kvpress'])} | "
            f"{_fmt(r['prefill_vs_full'])} | {_fmt(r['load_max'])} |")
    lines += ["", "e2e = prefill + decode, measured around `flexkv.generate` / the worker's "
              "prefill and decode loop (tokenisation and model loading excluded). "
              "`e2e flexkv/kvpress` divides the two sides' minima; the per-round column divides "
              "each round's two runs, which ran back to back. "
              "`kept/head`: flexkv the most tokens any (layer, KV head) holds at the end; kvpress "
              "its cache's sequence length (`get_seq_length()`, layer 0's; AdaKVPress masks the "
              "entries it evicts instead of removing them, so its cache keeps the whole prompt). "
              "`max load`: the highest 1-minute load average seen around the row's trials "
              f"(the machine has {meta['cores']} cores; above that, other jobs shared them)."]
    if meta.get("notes"):
        lines += [""] + [f"- {n}" for n in meta["notes"]]
    return "\n".join(lines) + "\n"


def render(path: Path) -> str:
    """Rewrite `<path>.md` from the trials kept in `<path>.json` (the table's format changed)."""
    data = json.loads(path.with_suffix(".json").read_text())
    meta = data["meta"]
    rows = summarize(data["trials"], meta["budget"], meta["new_tokens"])
    md = markdown(rows, meta)
    path.with_suffix(".md").write_text(md)
    path.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows, trials=data["trials"]),
                                                    indent=1, default=str))
    return md


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["render"]:  # python bench/prefill_cpu.py render bench/results/prefill/cpu-4096
        print(render(Path(argv[1]).with_suffix("")))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--length", type=int, default=4096, help="passkey prompt tokens (4096)")
    ap.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated (32)")
    ap.add_argument("--budget", type=int, default=256, help="tokens kept per head (256)")
    ap.add_argument("--trials", type=int, default=3, help="rounds; the table takes the min (3)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads on both sides (2)")
    ap.add_argument("--pairs", default=",".join(PAIRS),
                    help="policies run by both (flexkv name; kvpress press from PAIRS)")
    ap.add_argument("--flexkv-only", default="weightedkv", help="policies only flexkv runs")
    ap.add_argument("--no-kvpress", action="store_true", help="flexkv side only")
    ap.add_argument("--kvpress-venv", default=str(ROOT / ".kvpress-venv"))
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", choices=tuple(_DTYPE_NAMES), default="float32",
                    help="the model's dtype on both sides (float32; bfloat16 uses AMX where the "
                         "CPU has it)")
    ap.add_argument("--note", action="append", default=[], help="a line for the results' notes")
    ap.add_argument("--prefill-only", action="store_true",
                    help="flexkv's decode-time policies with prefill_only=True (the presses' work)")
    ap.add_argument("--prefill-chunk", type=int, default=None,
                    help="flexkv prefills in chunks of this many tokens (needs --no-kvpress: "
                    "kvpress has no chunked prefill to compare with)")
    ap.add_argument("--out", default=None, help="results path without suffix "
                    "(default bench/results/prefill/cpu-<length>[-chunk<N>])")
    args = ap.parse_args(argv)
    if args.prefill_chunk is not None and (args.prefill_chunk < 1 or not args.no_kvpress):
        ap.error("--prefill-chunk: a positive token count, with --no-kvpress "
                 f"(got {args.prefill_chunk}{'' if args.no_kvpress else ' without --no-kvpress'})")

    import torch

    import flexkv
    from flexkv.passkey import build_passkey_prompt

    sys.path.insert(0, str(ROOT))
    import kvpress_side

    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    pairs = [p for p in args.pairs.split(",") if p]
    only = [p for p in args.flexkv_only.split(",") if p]
    for p in pairs:
        if p not in PAIRS:
            ap.error(f"--pairs: no kvpress press for {p!r} (known: {', '.join(PAIRS)})")
    load_before = _uptime()
    model, tok = flexkv.load_model(args.model, dtype=getattr(torch, args.dtype))
    ids, _ = build_passkey_prompt(tok, args.length, 0.5, "12345")
    warm_ids, _ = build_passkey_prompt(tok, 256, 0.5, "12345")
    T = ids.shape[1]
    worker, meta_extra, notes = None, {}, list(args.note)
    if not args.no_kvpress:
        py = kvpress_side.ensure_venv(Path(args.kvpress_venv), log=lambda m: print(m, file=sys.stderr))
        if py is None:
            notes.append("kvpress venv unavailable: flexkv side only")
        else:
            worker = Worker(py, kvpress_side.model_dir(args.model), args.threads, args.dtype)
            meta_extra.update(transformers=worker.info["transformers"], kvpress=worker.info["kvpress"])

    def kv_req(policy, input_ids):
        press, eager = PAIRS[policy]
        scorer = split_press(press)[1] if press else None  # the press that takes the parameters
        return dict(op="run", press=press, params=kvpress_side.press_params(scorer),
                    budget=args.budget, new_tokens=args.new_tokens,
                    attn="eager" if eager else "sdpa", input_ids=input_ids[0].tolist())

    configs = [("flexkv", p) for p in pairs + only]
    if worker is not None:
        configs += [("kvpress", p) for p in pairs]
    configs.sort(key=lambda c: (pairs + only).index(c[1]))  # each policy's two sides back to back
    print(f"[prefill_cpu] {T}-token prompt, {len(configs)} configurations x {args.trials} trials; "
          f"{load_before}", file=sys.stderr, flush=True)
    for impl, p in configs:  # warm-up: code paths, kernels, lazy init
        wb = min(args.budget, warm_ids.shape[1] - 8)
        if impl == "flexkv":
            flexkv.generate(model, warm_ids, max_new_tokens=2, policy=p,
                            budget=None if p == "full" else wb, prefill_chunk=args.prefill_chunk,
                            **_prefill_only_kw(p, args.prefill_only))
        else:
            worker.ask(dict(kv_req(p, warm_ids), budget=wb, new_tokens=2))
    trials = []
    chunked = "" if args.prefill_chunk is None else f"-chunk{args.prefill_chunk}"
    out = Path(args.out) if args.out else RESULTS / f"cpu-{args.length}{chunked}"
    out = out.with_suffix("") if out.suffix in (".md", ".json") else out
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(rounds: int) -> str:
        rows = summarize(trials, args.budget, args.new_tokens)
        meta = _stamp(argv, time.perf_counter() - t_start, args.threads, meta_extra)
        meta.update(length=args.length, prompt_tokens=T, new_tokens=args.new_tokens,
                    budget=args.budget, trials=rounds, policies=pairs + only, dtype=args.dtype,
                    prefill_chunk=args.prefill_chunk, prefill_only=args.prefill_only,
                    load_before=load_before, load_after=_uptime(), notes=notes)
        md = markdown(rows, meta)
        out.with_suffix(".md").write_text(md)
        out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows, trials=trials),
                                                       indent=1, default=str))
        return md

    md = ""
    for r in range(args.trials):
        for impl, p in configs:
            if impl == "flexkv":
                res = run_flexkv(model, ids, p, args.budget, args.new_tokens, args.prefill_chunk,
                                 args.prefill_only)
                res.update(attn=None, press=None)
            else:
                req = kv_req(p, ids)
                res = worker.ask(req)
                res.update(attn=req["attn"], press=req["press"])
            res.update(impl=impl, policy=p, trial=r)
            trials.append(res)
            print(f"[prefill_cpu] trial {r} {impl:7s} {p:10s} e2e {res['wall_s']:6.2f} s  prefill "
                  f"{res['prefill_s']:6.2f} s  load {res['load'][0]:.2f}->{res['load'][1]:.2f}",
                  file=sys.stderr, flush=True)
        md = write(r + 1)  # after every round: an interrupted run keeps its finished rounds
    if worker is not None:
        worker.close()
    print(md)
    print(f"[prefill_cpu] wrote {out.with_suffix('.md')} and .json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1] == "worker":
        sys.exit(_worker())
    sys.exit(main())
