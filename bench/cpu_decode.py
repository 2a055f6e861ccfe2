"""The eager CPU decode step with the projections on packed weights (`flexkv.cpu_gemm`) and on
plain `F.linear` (`FLEXKV_CPU_PACKED_GEMM=0`), per dtype, thread count and batch rows.

    python bench/cpu_decode.py                                  # the table in the README
    python bench/cpu_decode.py --rows 8 --dtypes float32 --threads 1 --rounds 1 --out /tmp/d

For each cell (dtype, threads, rows) `flexkv.generate` runs on the default model (random prompt
ids of `--prompt` tokens, `--policy` at `--budget` (0: none), greedy, `--steps` decode steps) with
the setting switched on and off in turn in this one process, `--rounds` times each (the order
alternating); a cell's time is the minimum over rounds of `GenerateOutput.decode_s / steps` (ms a
step), after one warm-up run per setting. Both settings give the same tokens here (checked: the table's last column).
Results: `<out>.md` and `<out>.json` (default bench/results/decode/cpu-packed).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SETTINGS = ("packed", "plain")


def measure(model, rows: int, prompt: int, policy: str, budget: int | None, steps: int,
            rounds: int) -> dict:
    """ms a decode step per setting (min over rounds) and whether their tokens agree."""
    import torch

    import flexkv

    ids = torch.randint(0, model.args.vocab_size, (rows, prompt),
                        generator=torch.Generator().manual_seed(rows))
    kw = dict(policy=policy, budget=budget) if budget else dict(policy=policy)
    best, tokens, before = {}, {}, os.environ.get("FLEXKV_CPU_PACKED_GEMM")
    for rnd in range(rounds + 1):                      # round 0 warms up both settings
        for setting in (SETTINGS if rnd % 2 == 0 else SETTINGS[::-1]):
            os.environ["FLEXKV_CPU_PACKED_GEMM"] = "1" if setting == "packed" else "0"
            out = flexkv.generate(model, ids, max_new_tokens=steps + 1, **kw)
            tokens[setting] = out.tokens
            if rnd:
                ms = 1e3 * out.decode_s / steps
                best[setting] = min(best.get(setting, float("inf")), ms)
    if before is None:
        os.environ.pop("FLEXKV_CPU_PACKED_GEMM", None)
    else:
        os.environ["FLEXKV_CPU_PACKED_GEMM"] = before
    return dict(packed_ms=best["packed"], plain_ms=best["plain"],
                same_tokens=bool(torch.equal(tokens["packed"], tokens["plain"])))


def render(res: dict) -> str:
    m = res["meta"]
    lines = ["# CPU decode step: projections on packed weights vs plain `F.linear`", "",
             f"`{m['command']}`", "",
             f"commit {m['commit']}, torch {m['torch']}, {m['cores']} cores, wall {m['wall_s']:.0f} s",
             "", f"Default model, {m['prompt']}-token random prompts, `{m['policy']}`"
             + (f" at budget {m['budget']}" if m["budget"] else "")
             + f", {m['steps']} greedy decode steps; ms a step, min of {m['rounds']} rounds "
             "(settings alternating in one process). Packed: `flexkv.cpu_gemm` (fp32: MKL's "
             "packed sgemm from 4 rows on; bf16: oneDNN's reordered weight); plain: "
             "`FLEXKV_CPU_PACKED_GEMM=0`.", "",
             "| dtype | threads | rows | packed ms/step | plain ms/step | packed / plain | same tokens |",
             "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['dtype']} | {r['threads']} | {r['rows']} | {r['packed_ms']:.1f} | "
                     f"{r['plain_ms']:.1f} | {r['packed_ms'] / r['plain_ms']:.2f} | "
                     f"{'yes' if r['same_tokens'] else 'no'} |")
    return "\n".join(lines) + "\n"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=_ints, default=[1, 4, 8])
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--threads", type=_ints, default=[1, 2])
    p.add_argument("--prompt", type=int, default=300)
    p.add_argument("--policy", default="streaming")
    p.add_argument("--budget", type=int, default=256, help="0: none (for --policy full)")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--out", default=None, help="results path without extension")
    args = p.parse_args(argv)
    dtypes = [d for d in args.dtypes.split(",") if d]
    if (min(args.rows + args.threads, default=0) < 1 or args.steps < 1 or args.rounds < 1
            or args.prompt < 1 or not dtypes):
        p.error("--rows, --threads, --steps, --rounds and --prompt must be >= 1")
    if any(d not in ("float32", "bfloat16", "float16") for d in dtypes):
        p.error(f"--dtypes: float32, bfloat16 or float16, not {args.dtypes!r}")
    import torch

    import flexkv
    sys.path.insert(0, str(ROOT))
    from stamp import commit_id, write_results

    t0, rows = time.perf_counter(), []
    for dtype in dtypes:
        model, _ = flexkv.load_model(args.model, dtype=getattr(torch, dtype))
        for threads in args.threads:
            torch.set_num_threads(threads)
            for n in args.rows:
                r = dict(dtype=dtype, threads=threads, rows=n,
                         **measure(model, n, args.prompt, args.policy, args.budget, args.steps,
                                   args.rounds))
                rows.append(r)
                print(f"[cpu_decode] {dtype} {threads} threads {n} rows: packed "
                      f"{r['packed_ms']:.1f} plain {r['plain_ms']:.1f} ms/step", file=sys.stderr,
                      flush=True)
        del model
    out = Path(args.out) if args.out else ROOT / "results" / "decode" / "cpu-packed"
    res = dict(meta=dict(command="python bench/cpu_decode.py " + " ".join(argv), commit=commit_id(),
                         torch=torch.__version__, cores=os.cpu_count(), prompt=args.prompt,
                         policy=args.policy, budget=args.budget, steps=args.steps,
                         rounds=args.rounds, wall_s=time.perf_counter() - t0),
               rows=rows)
    write_results(out, res, render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
