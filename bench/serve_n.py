"""`n` choices of one prompt through the serving engine: shared prefill against n prefills.

    python bench/serve_n.py --prompt-len 1024 --max-tokens 32 --n 1,2,4 --out bench/results/serve/n-cpu

For each n, the engine (`--policy` at `--budget`, n slots) answers n seeded sampled requests
with one prompt (each is a choice, as the server's `n` sends them: the prefill is shared), then n
requests with n different prompts of the same length (each prefilled). Wall seconds from submit
to the last token, prefill chunks and shared prefills from the engine's counters, the median of
`--trials` runs. Prompts are token-id windows of real prose (`pydoc_data.topics`) through the
model's tokenizer.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import flexkv  # noqa: E402
from bench.stamp import commit_id, write_results  # noqa: E402
from flexkv.serve import Engine, SamplingParams  # noqa: E402


def prose_ids(tok, n: int, count: int) -> list[list[int]]:
    from pydoc_data.topics import topics
    ids = tok("\n".join(topics.values()), add_special_tokens=False)["input_ids"]
    return [ids[i * n:(i + 1) * n] for i in range(count)]


def run(engine: Engine, prompts: list, params: list) -> tuple[float, dict]:
    before = engine.metrics()
    t0 = time.perf_counter()
    engine.generate(prompts, params)
    wall = time.perf_counter() - t0
    after = engine.metrics()
    return wall, {k: after[k] - before[k] for k in ("prefill_chunks_total", "prefills_shared_total")}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--policy", default="h2o")
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--n", default="1,2,4")
    ap.add_argument("--prefill-chunk", type=int, default=512)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench/results/serve/n-cpu"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    model, tok = flexkv.load_model(a.model)
    ns = [int(x) for x in a.n.split(",")]
    prompts = prose_ids(tok, a.prompt_len, max(ns))
    rows = []
    for n in ns:
        engine = Engine(model, tok, a.policy, budget=a.budget, max_slots=n,
                        max_new_tokens=a.max_tokens, max_prompt_tokens=a.prompt_len,
                        prefill_chunk=a.prefill_chunk)
        params = [SamplingParams(max_tokens=a.max_tokens, temperature=1.0, seed=j, ignore_eos=True)
                  for j in range(n)]
        run(engine, prompts[:1], params[:1])                                   # warm-up
        for label, ps in (("one prompt, n choices", [prompts[0]] * n), ("n prompts", prompts[:n])):
            trials = [run(engine, ps, params) for _ in range(a.trials)]
            wall = statistics.median(t[0] for t in trials)
            rows.append({"n": n, "case": label, "wall_s": wall, **trials[0][1],
                         "tok_s": n * a.max_tokens / wall})
    res = {"model": a.model, "policy": a.policy, "budget": a.budget, "prompt_len": a.prompt_len,
           "max_tokens": a.max_tokens, "threads": a.threads, "torch": torch.__version__,
           "commit": commit_id(("flexkv", "bench")),
           "command": "python bench/serve_n.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "rows": rows}
    md = [f"# n choices of one prompt ({a.model}, {a.policy}@{a.budget}, {a.prompt_len}-token "
          f"prompts, {a.max_tokens} tokens, {a.threads} threads, torch {torch.__version__}, "
          f"{res['commit']})", "", f"`{res['command']}`", "",
          "| n | requests | wall s (median) | out tok/s | prefill chunks | shared prefills |",
          "|---|---|---|---|---|---|"]
    md += [f"| {r['n']} | {r['case']} | {r['wall_s']:.2f} | {r['tok_s']:.1f} | "
           f"{r['prefill_chunks_total']} | {r['prefills_shared_total']} |" for r in rows]
    write_results(a.out, res, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
