"""A fresh process's first CPU prefill, with glibc's malloc defaults and with `flexkv.malloc`'s
settings (what the CLI applies), alternating in fresh processes.

    python bench/cold_prefill.py                       # 4K passkey prompt, 4 rounds, 2 threads
    python bench/cold_prefill.py --rounds 2 --length 1024 --out /tmp/cold   # a quick look

Each round starts one worker process per setting (the order alternates between rounds); a
worker loads the default model (fp32), optionally calls `flexkv.malloc.tune_cpu_allocator()`,
and runs one `flexkv.generate(..., policy="full", max_new_tokens=1)` on the prompt: that
generate's prefill time, the minor page faults and system CPU time around it
(`resource.getrusage`). The table gives each setting's minimum and median over the rounds and
the median of the rounds' ratios (tuned / default; a round's two runs ran back to back).
Results: `<out>.md` and `<out>.json` (default bench/results/prefill/cold-<length>).
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
SETTINGS = ("default", "tuned")


def _worker(args) -> int:
    import resource

    import torch

    import flexkv
    from flexkv.malloc import tune_cpu_allocator
    from flexkv.passkey import build_passkey_prompt

    took = tune_cpu_allocator() if args.setting == "tuned" else False
    torch.set_num_threads(args.threads)
    model, tok = flexkv.load_model(args.model)
    ids, _ = build_passkey_prompt(tok, args.length, 0.5, "12345")
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    out = flexkv.generate(model, ids, max_new_tokens=1, policy="full")
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps(dict(setting=args.setting, tuned=took, tokens=ids.shape[1],
                          prefill_s=out.prefill_s, minflt=r1.ru_minflt - r0.ru_minflt,
                          sys_s=r1.ru_stime - r0.ru_stime, user_s=r1.ru_utime - r0.ru_utime,
                          maxrss_mib=r1.ru_maxrss / 1024)), flush=True)
    return 0


def _run_worker(args, setting: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "worker", "--setting", setting,
           "--length", str(args.length), "--threads", str(args.threads), "--model", args.model]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), FLEXKV_TUNE_MALLOC="0")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker ({setting}) failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def summarise(runs: list[dict]) -> list[dict]:
    """Per setting: min / median of prefill s, median page faults and system s; the tuned row
    also the median over rounds of tuned / default prefill."""
    rows = []
    for setting in SETTINGS:
        mine = [r for r in runs if r["setting"] == setting]
        row = dict(setting=setting, runs=len(mine),
                   prefill_min=min(r["prefill_s"] for r in mine),
                   prefill_median=statistics.median(r["prefill_s"] for r in mine),
                   minflt_median=statistics.median(r["minflt"] for r in mine),
                   sys_median=statistics.median(r["sys_s"] for r in mine),
                   maxrss_median=statistics.median(r["maxrss_mib"] for r in mine))
        if setting == "tuned":
            pairs = {}
            for r in runs:
                pairs.setdefault(r["round"], {})[r["setting"]] = r["prefill_s"]
            ratios = [p["tuned"] / p["default"] for p in pairs.values() if len(p) == 2]
            row["ratio_median"] = statistics.median(ratios) if ratios else float("nan")
            row["ratios"] = ratios
        rows.append(row)
    return rows


def render(res: dict) -> str:
    m = res["meta"]
    lines = ["# A fresh process's first CPU prefill: glibc malloc defaults vs `flexkv.malloc`",
             "", f"`{m['command']}`", "",
             f"commit {m['commit']}, torch {m['torch']}, {m['threads']} threads on {m['cores']} "
             f"cores, glibc {m['glibc']}, wall {m['wall_s']:.0f} s", "",
             f"Prompt: {m['tokens']}-token passkey prompt, default model, fp32, `policy=\"full\"`; "
             "one worker process per run, the settings alternating; prefill s is "
             "`GenerateOutput.prefill_s`, faults and system time from `getrusage` around that "
             "generate.", "",
             "| malloc | runs | prefill s min | prefill s median | tuned / default (median of "
             "rounds) | minor faults (median) | system s (median) | max RSS MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        ratio = (f"{r['ratio_median']:.2f} ({', '.join(f'{x:.2f}' for x in r['ratios'])})"
                 if "ratio_median" in r else "-")
        lines.append(f"| {r['setting']} | {r['runs']} | {r['prefill_min']:.2f} | "
                     f"{r['prefill_median']:.2f} | {ratio} | {r['minflt_median']:.0f} | "
                     f"{r['sys_median']:.2f} | {r['maxrss_median']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    if argv[:1] == ["worker"]:
        p.add_argument("worker")
        p.add_argument("--setting", choices=SETTINGS, required=True)
        p.add_argument("--length", type=int, required=True)
        p.add_argument("--threads", type=int, required=True)
        p.add_argument("--model", required=True)
        return _worker(p.parse_args(argv))
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--out", default=None, help="results path without extension")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.length < 16 or args.threads < 1:
        p.error("--rounds and --threads must be >= 1, --length >= 16")
    import torch

    sys.path.insert(0, str(ROOT))
    from stamp import commit_id, write_results

    t0 = time.perf_counter()
    runs = []
    for rnd in range(args.rounds):
        order = SETTINGS if rnd % 2 == 0 else SETTINGS[::-1]
        for setting in order:
            r = _run_worker(args, setting)
            r["round"] = rnd
            runs.append(r)
            print(f"[cold_prefill] round {rnd} {setting:7s} prefill {r['prefill_s']:.2f} s  "
                  f"faults {r['minflt']}  sys {r['sys_s']:.2f} s", file=sys.stderr, flush=True)
    out = Path(args.out) if args.out else ROOT / "results" / "prefill" / f"cold-{args.length}"
    res = dict(meta=dict(command="python bench/cold_prefill.py " + " ".join(argv),
                         commit=commit_id(), torch=torch.__version__, threads=args.threads,
                         cores=os.cpu_count(), glibc=platform.libc_ver()[1] or "none",
                         tokens=runs[0]["tokens"], wall_s=time.perf_counter() - t0),
               runs=runs, rows=summarise(runs))
    write_results(out, res, render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
