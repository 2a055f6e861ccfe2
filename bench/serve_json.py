"""What structured output (`response_format` "json_object" or "json_schema") costs the serving engine.

    python bench/serve_json.py --out bench/results/serve/json-cpu

1. The host side, per token: the model's tokenizer splits JSON documents (real prose in string
   values, numbers, booleans, nesting, indented or compact); each token's mask is looked up
   (`JsonVocab.allowed`) and the recognizer advanced, as the engine does per produced token.
   Reported, for JSON mode and for the documents' JSON Schema (`DOC_SCHEMA`): the vocabulary
   table's build time, the distinct recognizer states the documents reach, and the mask time
   per token with the memo cold (the first pass) and warm; then per `PATTERNS` entry, a string
   schema with that pattern over one text (cold masks: each state's first).
2. End to end: the engine (`--policy` at `--budget`, `--slots` slots) generating `--max-tokens`
   greedy tokens for each of `--slots` prompts, plain, in JSON mode and with `REPLY_SCHEMA`;
   wall seconds, tokens, and the milliseconds per decode step (the figure to compare: a JSON
   request that completes its value stops there, so it produces fewer tokens).
"""
from __future__ import annotations

import argparse
import json
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
from flexkv.serve.json_mode import JsonVocab, feed, initial  # noqa: E402
from flexkv.serve.json_schema import JSON_OBJECT, compile_schema  # noqa: E402

ITEM = {"type": "object", "properties": {
    "name": {"type": "string"}, "summary": {"type": "string", "maxLength": 240},
    "rank": {"type": "number"}, "seen": {"type": "boolean"},
    "tags": {"type": "array", "prefixItems": [{"type": "string", "maxLength": 3}, {"type": "null"},
                                              {"type": "integer"}], "items": False}},
    "required": ["name", "summary", "rank", "seen", "tags"]}
DOC_SCHEMA = {"type": "object", "properties": {"doc": {"type": "integer"},
                                               "items": {"type": "array", "items": ITEM}},
              "required": ["doc", "items"]}
PATTERNS = {r"^\d{4}-\d{2}-\d{2}$": "2024-05-17", "@": "write to me at someone@example.org please",
            r"^[A-Za-z ]+$": "Hello there General Kenobi"}
REPLY_SCHEMA = {"type": "object", "properties": {
    "topic": {"type": "string", "maxLength": 40}, "sentiment": {"enum": ["positive", "neutral", "negative"]},
    "keywords": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 4}},
    "required": ["topic", "sentiment", "keywords"]}


def documents(count: int) -> list[str]:
    from pydoc_data.topics import topics
    names = sorted(topics)
    docs = []
    for d in range(count):
        items = [{"name": k, "summary": topics[k][:240], "rank": i + 0.5 * d, "seen": i % 2 == 0,
                  "tags": [k[:3], None, -i]} for i, k in enumerate(names[d * 5:d * 5 + 5])]
        docs.append(json.dumps({"doc": d, "items": items}, indent=2 if d % 2 else None))
    return docs


def mask_times(vocab: JsonVocab, grammar, ids: list[int]) -> list[float]:
    """Seconds per token of `ids`, read as the engine reads them: the state's mask looked up (or
    computed), then the recognizer advanced by the token's bytes (which the mask allows)."""
    state, times = initial(grammar), []
    for t in ids:
        t0 = time.perf_counter()
        mask, _ = vocab.allowed(grammar, state)
        state = feed(grammar, state, vocab.bytes_of[t])
        times.append(time.perf_counter() - t0)
        assert bool(mask[t]), "a text's own token was masked"
    return times


def host_side(tok, vocab_size: int, docs: list[str], grammar) -> dict:
    t0 = time.perf_counter()
    vocab = JsonVocab.from_tokenizer(tok, vocab_size)
    build = time.perf_counter() - t0
    ids = [tok(doc, add_special_tokens=False)["input_ids"] for doc in docs]
    cold, warm = ([t for doc in ids for t in mask_times(vocab, grammar, doc)] for _ in range(2))
    return {"build_s": build, "tokens": len(cold), "states": len(vocab._memo),
            "cold_mean_ms": 1e3 * statistics.mean(cold), "cold_max_ms": 1e3 * max(cold),
            "warm_mean_ms": 1e3 * statistics.mean(warm), "warm_max_ms": 1e3 * max(warm)}


def patterns(tok, vocab_size: int) -> list[dict]:
    vocab = JsonVocab.from_tokenizer(tok, vocab_size)
    rows = []
    for pattern, text in PATTERNS.items():
        times = mask_times(vocab, compile_schema({"type": "string", "pattern": pattern}),
                           tok(json.dumps(text), add_special_tokens=False)["input_ids"])
        rows.append({"pattern": pattern, "tokens": len(times), "mean_ms": 1e3 * statistics.mean(times),
                     "max_ms": 1e3 * max(times)})
    return rows


def end_to_end(model, tok, a, prompts: list) -> list[dict]:
    rows = []
    engine = Engine(model, tok, a.policy, budget=a.budget, max_slots=a.slots,
                    max_new_tokens=a.max_tokens, max_prompt_tokens=a.prompt_len,
                    prefill_chunk=a.prompt_len)
    formats = [("text", None), ("json_object", None), ("json_schema", REPLY_SCHEMA)]
    for fmt, schema in formats * 2:   # each once warm
        params = SamplingParams(max_tokens=a.max_tokens, response_format=fmt, json_schema=schema,
                                ignore_eos=fmt == "text")
        t0 = time.perf_counter()
        before = engine.metrics()
        outs = engine.generate(prompts, params)
        wall = time.perf_counter() - t0
        after = engine.metrics()
        steps = after["decode_steps_total"] - before["decode_steps_total"]
        decode_s = after["decode_seconds_total"] - before["decode_seconds_total"]
        n = sum(len(o) for o in outs)
        rows.append({"response_format": fmt, "wall_s": wall, "tokens": n, "tok_s": n / wall,
                     "decode_steps": steps, "ms_per_step": 1e3 * decode_s / max(1, steps),
                     "sample": tok.decode(outs[0])[:120]})
    return rows[len(formats):]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--policy", default="h2o")
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--documents", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench/results/serve/json-cpu"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    model, tok = flexkv.load_model(a.model)
    docs = documents(a.documents)
    host = {name: host_side(tok, model.args.vocab_size, docs, g)
            for name, g in (("json_object", JSON_OBJECT), ("json_schema", compile_schema(DOC_SCHEMA)))}
    pattern_rows = patterns(tok, model.args.vocab_size)
    prompts = prose_ids(tok, a.prompt_len, a.slots)
    rows = end_to_end(model, tok, a, prompts)
    res = {"model": a.model, "policy": a.policy, "budget": a.budget, "slots": a.slots,
           "prompt_len": a.prompt_len, "max_tokens": a.max_tokens, "threads": a.threads,
           "torch": torch.__version__, "commit": commit_id(("flexkv", "bench")),
           "command": "python bench/serve_json.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "host": host, "patterns": pattern_rows, "rows": rows}
    md = [f"# Structured output's cost ({a.model}, {a.threads} threads, torch {torch.__version__}, "
          f"{res['commit']})", "", f"`{res['command']}`", "",
          f"Host side over {a.documents} JSON documents ({host['json_object']['tokens']} tokens of "
          "the model's tokenizer), in JSON mode and with the documents' schema (`DOC_SCHEMA`): "
          "the vocabulary table's build, the distinct recognizer states (memo entries), and the "
          "mask lookup + advance per token.", "",
          "| grammar | table build s | states | cold mean ms | cold max ms | warm mean ms | warm max ms |",
          "|---|---|---|---|---|---|---|"]
    md += [f"| {name} | {h['build_s']:.2f} | {h['states']} | {h['cold_mean_ms']:.3f} | "
           f"{h['cold_max_ms']:.1f} | {h['warm_mean_ms']:.4f} | {h['warm_max_ms']:.3f} |"
           for name, h in host.items()]
    md += ["", "A string schema with a `pattern`, over one text (a new state's mask walks the "
           "vocabulary's trie as far as the pattern lets it):", "",
           "| pattern | tokens | mask + advance per token, mean ms | max ms |", "|---|---|---|---|"]
    md += [f"| `{r['pattern']}` | {r['tokens']} | {r['mean_ms']:.1f} | {r['max_ms']:.1f} |"
           for r in pattern_rows]
    md += ["", f"End to end: {a.policy}@{a.budget}, {a.slots} slots, {a.prompt_len}-token prompts, "
           f"{a.max_tokens} greedy tokens (a JSON request may stop earlier, once its value is "
           "complete; plain ones ignore eos; json_schema is `REPLY_SCHEMA`).", "",
           "| response_format | wall s | tokens | decode steps | ms per decode step (choice and delivery included) | out tok/s |",
           "|---|---|---|---|---|---|"]
    md += [f"| {r['response_format']} | {r['wall_s']:.2f} | {r['tokens']} | {r['decode_steps']} | "
           f"{r['ms_per_step']:.1f} | {r['tok_s']:.1f} |" for r in rows]
    write_results(a.out, res, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
