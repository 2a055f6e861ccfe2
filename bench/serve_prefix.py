"""Prompts that begin alike through the serving engine, with and without its prefix cache.

    python bench/serve_prefix.py --policies full,h2o,snapkv --out bench/results/serve/prefix-cpu

Two workloads, each run by an engine without and with `prefix_cache_memory` (`--prefix-memory`):
- `document`: `--questions` requests, each a `--doc-len`-token document followed by its own
  `--question-len`-token question, submitted at once (`--slots` slots);
- `chat`: `--turns` turns of one conversation, one after the other: each turn's prompt is the
  previous turn's prompt, its answer and a new `--question-len`-token message.
Every request generates `--max-tokens` greedy tokens. Reported: wall seconds from the first
submit to the last token, the mean time to first token, prefill chunks run, prompt tokens whose
prefill the cache skipped, and whether every request's tokens equal the run without the cache.
Prompts are token-id windows of real prose (`pydoc_data.topics`) through the model's tokenizer.
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
from bench.serve_n import prose_ids  # noqa: E402
from bench.stamp import commit_id, write_results  # noqa: E402
from flexkv.serve import Engine, SamplingParams  # noqa: E402

COUNTERS = ("prefill_chunks_total", "prefix_cache_hits_total", "prefix_cache_tokens_total")


def document(engine: Engine, doc: list, questions: list, params) -> list:
    handles = [engine.submit(doc + q, params) for q in questions]
    while engine.has_work():
        engine.step()
    return handles


def chat(engine: Engine, first: list, messages: list, params) -> list:
    handles, prompt = [], first
    for msg in messages:
        h = engine.submit(prompt, params)
        while engine.has_work():
            engine.step()
        handles.append(h)
        prompt = prompt + h.tokens + msg
    return handles


def measure(engine: Engine, workload) -> dict:
    before = engine.metrics()
    t0 = time.perf_counter()
    handles = workload(engine)
    wall = time.perf_counter() - t0
    after = engine.metrics()
    return {"wall_s": wall, "tokens": [h.tokens for h in handles],
            "ttft_s": statistics.mean(h.first_token_at - h.submitted_at for h in handles),
            **{k: after[k] - before.get(k, 0) for k in COUNTERS if k in after},
            "kept_mb": after.get("prefix_cache_bytes", 0) / 2**20,
            "kept_entries": after.get("prefix_cache_entries", 0)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--policies", default="full,h2o,snapkv")
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--doc-len", type=int, default=2048)
    ap.add_argument("--question-len", type=int, default=64)
    ap.add_argument("--questions", type=int, default=4)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--prefill-chunk", type=int, default=256)
    ap.add_argument("--prefix-memory", default="2GiB")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench/results/serve/prefix-cpu"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    model, tok = flexkv.load_model(a.model)
    n_msgs = max(a.questions, a.turns)
    pieces = prose_ids(tok, a.question_len, 1 + n_msgs + a.doc_len // a.question_len + 1)
    doc = [t for p in pieces[n_msgs + 1:] for t in p][:a.doc_len]
    msgs = pieces[1:1 + n_msgs]
    params = SamplingParams(max_tokens=a.max_tokens, ignore_eos=True)
    workloads = {
        "document": lambda e: document(e, doc, msgs[:a.questions], params),
        "chat": lambda e: chat(e, doc, msgs[:a.turns], params),
    }
    longest = a.doc_len + a.turns * (a.question_len + a.max_tokens)
    rows = []
    for policy in a.policies.split(","):
        budget = None if policy == "full" else a.budget
        for name, work in workloads.items():
            plain = None
            for memory in (None, a.prefix_memory):
                engine = Engine(model, tok, policy, budget=budget, max_slots=a.slots,
                                max_new_tokens=a.max_tokens, max_prompt_tokens=longest,
                                prefill_chunk=a.prefill_chunk, prefix_cache_memory=memory)
                engine.generate([msgs[0]], params)   # warm-up (one chunk: nothing kept)
                r = measure(engine, work)
                tokens = r.pop("tokens")
                plain = plain or tokens
                rows.append({"policy": policy, "workload": name, "prefix_cache": memory or "off",
                             "same_tokens": tokens == plain, **r})
                print(rows[-1], file=sys.stderr, flush=True)
    res = {"model": a.model, "budget": a.budget, "doc_len": a.doc_len, "question_len": a.question_len,
           "questions": a.questions, "turns": a.turns, "max_tokens": a.max_tokens, "slots": a.slots,
           "prefill_chunk": a.prefill_chunk, "threads": a.threads, "torch": torch.__version__,
           "commit": commit_id(("flexkv", "bench")),
           "command": "python bench/serve_prefix.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "rows": rows}
    md = [f"# Prompts that begin alike, with and without the prefix cache ({a.model}, budget "
          f"{a.budget}, a {a.doc_len}-token document, {a.question_len}-token questions, "
          f"{a.max_tokens} greedy tokens each, chunk {a.prefill_chunk}, {a.threads} threads, "
          f"torch {torch.__version__}, {res['commit']})", "", f"`{res['command']}`", "",
          f"`document`: {a.questions} questions about the document, submitted at once; `chat`: "
          f"{a.turns} turns of one conversation, each prompt the previous one + its answer + a "
          "new message.", "",
          "| policy | workload | prefix cache | wall s | mean TTFT s | prefill chunks | prompt tokens skipped | states kept (MiB) | tokens as without |",
          "|---|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['policy']} | {r['workload']} | {r['prefix_cache']} | {r['wall_s']:.2f} | "
           f"{r['ttft_s']:.2f} | {r['prefill_chunks_total']} | {r.get('prefix_cache_tokens_total', 0)} | "
           f"{r['kept_entries']} ({r['kept_mb']:.1f}) | {'yes' if r['same_tokens'] else 'NO'} |" for r in rows]
    write_results(a.out, res, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
