"""Serving benchmark: the OpenAI-compatible server under a bounded open-loop load, every
configuration at the same KV memory.

    python bench/serve.py --preset cpu      # the default model on this CPU (~9 min, shorter sizes)
    python bench/serve.py --preset gpu      # the issue's sizes: 1K-4K prompts, 128-token answers, cuda

Per configuration (`full`, then every policy x budget) the real server runs on a free loopback
port (`flexkv.serve.api.build_app` + uvicorn in a thread, over an `Engine` sized by
`kv_memory=`: a compressed slot is smaller, so the same memory holds more slots). An async httpx
client, in a process of its own (`serve.py client`: its Python must not take the GIL from the
engine's thread), sends the same seeded requests to each: Poisson arrivals at `--rate`, prompts of
`--prompt-min`..`--prompt-max` token ids (random windows of real prose, `pydoc_data.topics`,
through the model's tokenizer), `--max-tokens` greedy tokens each (`ignore_eos`), streamed.
Requests still open at `--time-limit` are cancelled and counted as lost. Per request: time to
first token (TTFT, from sending), time per output token after the first (TPOT), output tokens;
per configuration: output tokens/s over the run (first send to last answer), TTFT and TPOT p50/p99,
slots, completed / failed / lost, mean decoding batch, and from the engine's counters the share of
the run it was busy (prefill chunks + decode steps), ms per prefill chunk and per decode step, and
prefill's share of the busy time. A configuration busy well under 100 % of its run waited for
requests: its throughput is the offered load's (`--rate` x `--max-tokens`), not its capacity, and
a ratio to it is a bound, not a measurement (the target line says so). Then the same requests through
`flexkv.generate` one at a time (no server; TTFT = prefill time). Results:
`<out>/<name>.{json,md}`, stamped with the command, commit, device, torch, threads, wall time and
the machine's load average.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "serve"
sys.path.insert(0, str(ROOT))
from stamp import commit_id  # noqa: E402

PRESETS = {
    "cpu": dict(model="smollm2-135m-instruct", device="cpu", dtype="float32", prompt_min=512,
                prompt_max=1024, prompt_step=1, max_tokens=64, requests=12, rate=0.5,
                time_limit=900.0, policies="streaming,h2o", budgets="256,512", compile=False,
                compile_prefill=False, threads=1, prefill_chunk=512, full_slots=2),
    "gpu": dict(model="smollm2-135m-instruct", device="cuda", dtype="bfloat16", prompt_min=1024,
                prompt_max=4096, prompt_step=512, max_tokens=128, requests=200, rate=100.0,
                time_limit=300.0, policies="streaming,h2o,snapkv", budgets="256,512", compile=True,
                compile_prefill=False, threads=None, prefill_chunk=2048, full_slots=2),
}


def pct(xs, q):
    """The q-th percentile (linear interpolation, numpy's default); None for no data."""
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (k - lo)


# --------------------------------------------------------------------------- the workload
def make_requests(tok, n, lo, hi, step, rate, seed):
    """n prompts (token-id windows of the prose corpus) and their Poisson arrival offsets (s)."""
    from quality_suites.common import pydoc_prose
    corpus = list(tok(pydoc_prose(), add_special_tokens=False)["input_ids"])
    if len(corpus) <= hi:
        corpus = corpus * (hi // len(corpus) + 2)
    rng, t, out = random.Random(seed), 0.0, []
    for i in range(n):
        length = max(lo, rng.randint(lo, hi) // step * step)
        start = rng.randrange(len(corpus) - length)
        t += rng.expovariate(rate) if (rate > 0 and i) else 0.0
        out.append(dict(idx=i, arrival=round(t, 4), ids=corpus[start:start + length]))
    return out


def slot_bytes(model, policy, budget, prompt_max, max_tokens, dtype) -> int:
    """Bytes of K/V of one engine slot (the engine's own sizing rule)."""
    from flexkv.policies import make_policy
    a = model.args
    caps = make_policy(policy, budget=budget).max_capacities(model, prompt_max, max_tokens)
    return sum(2 * c * a.num_key_value_heads * a.head_dim * dtype.itemsize for c in caps)


def random_model(path, device, dtype):
    """(model, tokenizer): the architecture and tokenizer of the checkpoint directory `path`
    (config.json, tokenizer files; no weights needed), random weights."""
    from transformers import AutoTokenizer

    from flexkv.models.llama import ModelArgs
    from speed import random_transformer
    path = Path(path)
    if not (path / "config.json").exists():
        raise SystemExit(f"--random-weights: {path} has no config.json (bench/gpu_kit.sh makes one)")
    args = ModelArgs.from_hf_config(json.loads((path / "config.json").read_text()))
    return random_transformer(args, device, dtype), AutoTokenizer.from_pretrained(str(path))


# --------------------------------------------------------------------------- server + client
async def one_request(client, req, max_tokens, t0, rec):
    """Send `req` at its arrival time, stream the answer, fill `rec` (times relative to t0)."""
    await asyncio.sleep(max(0.0, t0 + req["arrival"] - time.perf_counter()))
    body = dict(prompt=req["ids"], max_tokens=max_tokens, temperature=0, ignore_eos=True,
                stream=True, stream_options={"include_usage": True})
    rec["sent"] = time.perf_counter() - t0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            rec["status"] = f"http {r.status_code}: {(await r.aread())[:200].decode(errors='replace')}"
            return
        reason = None
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data, now = line[6:], time.perf_counter() - t0
            if data == "[DONE]":
                break
            obj = json.loads(data)
            if "error" in obj:
                rec["status"] = f"error: {obj['error'].get('message', '')[:200]}"
                return
            if obj.get("usage"):
                rec["out_tokens"] = obj["usage"]["completion_tokens"]
            for ch in obj.get("choices") or []:
                if ch.get("text") and rec["first"] is None:
                    rec["first"] = now
                if ch.get("finish_reason"):
                    reason, rec["done"] = ch["finish_reason"], now
        rec["status"] = "ok" if reason in ("stop", "length") else "error: stream ended early"


async def drive(url, reqs, max_tokens, time_limit):
    """The open-loop load: one task per request, all cancelled at the time limit."""
    import httpx
    recs = [dict(idx=q["idx"], prompt_tokens=len(q["ids"]), arrival=q["arrival"], sent=None,
                 first=None, done=None, out_tokens=0, status="lost (time limit)") for q in reqs]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(None), limits=limits,
                                 trust_env=False) as client:
        t0 = time.perf_counter()

        async def guarded(q, rec):
            try:
                await one_request(client, q, max_tokens, t0, rec)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - a failed request is a result, not a crash
                rec["status"] = f"error: {type(e).__name__}: {str(e)[:160]}"

        tasks = [asyncio.ensure_future(guarded(q, r)) for q, r in zip(reqs, recs)]
        _, pending = await asyncio.wait(tasks, timeout=time_limit)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        elapsed = time.perf_counter() - t0
    return recs, elapsed


def summarize(name, policy, budget, slots, recs, elapsed, extra=None) -> dict:
    ok = [r for r in recs if r["status"] == "ok"]
    for r in ok:
        r["first"] = r["first"] if r["first"] is not None else r["done"]
        r["ttft"] = r["first"] - r["sent"]
        r["tpot"] = (r["done"] - r["first"]) / (r["out_tokens"] - 1) if r["out_tokens"] > 1 else None
    # the run's length: first send to last answer (to the time limit if requests were lost)
    lost = sum(r["status"].startswith("lost") for r in recs)
    end = elapsed if lost or not ok else max(r["done"] for r in ok)
    start = min((r["sent"] for r in recs if r["sent"] is not None), default=0.0)
    toks = sum(r["out_tokens"] for r in ok)
    row = dict(config=name, policy=policy, budget=budget, slots=slots, requests=len(recs),
               completed=len(ok), failed=len(recs) - len(ok) - lost, lost=lost,
               out_tokens=toks, duration_s=end - start, tok_s=toks / max(end - start, 1e-9),
               ttft_p50_s=pct([r["ttft"] for r in ok], 50), ttft_p99_s=pct([r["ttft"] for r in ok], 99),
               tpot_p50_ms=pct([1e3 * r["tpot"] for r in ok if r["tpot"]], 50),
               tpot_p99_ms=pct([1e3 * r["tpot"] for r in ok if r["tpot"]], 99))
    row.update(extra or {})
    row["tok_cpu_s"] = toks / row["cpu_s"] if row.get("cpu_s") else None
    row["errors"] = sorted({r["status"] for r in recs if r["status"] != "ok"})
    return row


def drive_elsewhere(url, reqs, max_tokens, time_limit) -> tuple[list, float]:
    """`drive` in a process of its own (`python serve.py client`, the job as JSON on stdin): the
    client's Python (streaming, SSE parsing) must not take the GIL from the engine's thread."""
    job = json.dumps(dict(url=url, reqs=reqs, max_tokens=max_tokens, time_limit=time_limit))
    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "client"], input=job,
                       text=True, capture_output=True, timeout=time_limit + 300)
    if r.returncode != 0:
        raise RuntimeError(f"the load client failed (exit {r.returncode}): {r.stderr[-3000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    return out["recs"], out["elapsed"]


def client_main() -> int:
    """`python serve.py client`: one `drive` job from stdin, its records as one JSON line."""
    job = json.loads(sys.stdin.read())
    recs, elapsed = asyncio.run(drive(job["url"], job["reqs"], job["max_tokens"], job["time_limit"]))
    print(json.dumps(dict(recs=recs, elapsed=elapsed)), flush=True)
    return 0


def engine_use(m0: dict, m1: dict) -> dict:
    """What the engine did between two `metrics()`: mean decoding batch, its busy seconds, ms per
    prefill chunk and per decode step, and prefill's share of the busy time."""
    d = {k: m1[k] - m0[k] for k in ("decode_steps_total", "tokens_generated_total",
                                     "prefill_chunks_total", "prefill_seconds_total",
                                     "decode_seconds_total")}
    steps, chunks = d["decode_steps_total"], d["prefill_chunks_total"]
    busy = d["prefill_seconds_total"] + d["decode_seconds_total"]
    return dict(mean_batch=d["tokens_generated_total"] / steps if steps else None,
                engine_s=busy, prefill_chunks=chunks, decode_steps=steps,
                prefill_ms_chunk=1e3 * d["prefill_seconds_total"] / chunks if chunks else None,
                decode_ms_step=1e3 * d["decode_seconds_total"] / steps if steps else None,
                prefill_share=d["prefill_seconds_total"] / busy if busy > 0 else None)


# --------------------------------------------------------------------------- the runs
def run_server(model, tok, cfg, policy, budget, reqs, warm) -> tuple[dict, list]:
    from flexkv.serve import Engine, SamplingParams
    name = policy if budget is None else f"{policy}@{budget}"
    eng = Engine(model, tok, policy=policy, budget=budget, kv_memory=cfg["kv_memory"],
                 max_new_tokens=cfg["max_tokens"], max_prompt_tokens=cfg["prompt_max"],
                 prefill_chunk=cfg["prefill_chunk"], max_waiting=len(reqs) + 8,
                 compile=cfg["compile"], compile_prefill=cfg["compile_prefill"])
    print(f"[serve] {name}: {eng.max_slots} slots of {eng.slot_kv_bytes / 2**20:.2f} MiB", flush=True)
    from flexkv.serve.api import build_app
    from flexkv.serve.server import BackgroundServer

    with BackgroundServer(build_app(eng, "bench")) as srv:
        t = time.perf_counter()       # warm-up through the engine thread (compiles, CUDA graphs)
        hs = [eng.submit(ids, SamplingParams(max_tokens=min(4, cfg["max_tokens"]), ignore_eos=True))
              for ids in warm]
        for h in hs:
            h.result()
        warm_s = time.perf_counter() - t
        m0, load, cpu0 = eng.metrics(), os.getloadavg()[0], time.process_time()
        recs, elapsed = drive_elsewhere(srv.url, reqs, cfg["max_tokens"], cfg["time_limit"])
        m1, cpu = eng.metrics(), time.process_time() - cpu0
    row = summarize(name, policy, budget, eng.max_slots, recs, elapsed,
                    dict(slot_mib=eng.slot_kv_bytes / 2**20, warmup_s=warm_s, load1=load, cpu_s=cpu,
                         **engine_use(m0, m1)))
    row["busy"] = row["engine_s"] / row["duration_s"] if row["duration_s"] > 0 else None
    del eng
    gc.collect()
    return row, recs


def run_sequential(model, cfg, policy, budget, reqs, warm) -> tuple[dict, list]:
    """The same requests through `flexkv.generate`, one at a time, back to back (no server)."""
    import flexkv
    dev, kw = model.lm_head.weight.device, ({} if budget is None else {"budget": budget})

    def gen(ids, n):
        x = torch.tensor([ids], device=dev)
        out = flexkv.generate(model, x, max_new_tokens=n, policy=policy, compile=cfg["compile"],
                              prefill_chunk=cfg["prefill_chunk"], **kw)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return out

    for ids in warm:                 # compiled decode: one graph per cache shape (prompt length)
        gen(ids, cfg["max_tokens"])
    recs, t0, load, cpu0 = [], time.perf_counter(), os.getloadavg()[0], time.process_time()
    for q in reqs:
        rec = dict(idx=q["idx"], prompt_tokens=len(q["ids"]), arrival=0.0, out_tokens=0,
                   status="lost (time limit)", sent=None, first=None, done=None)
        recs.append(rec)
        if time.perf_counter() - t0 > cfg["time_limit"]:
            continue
        rec["sent"] = time.perf_counter() - t0
        out = gen(q["ids"], cfg["max_tokens"])
        rec.update(status="ok", out_tokens=out.new_tokens, first=rec["sent"] + out.prefill_s,
                   done=rec["sent"] + out.prefill_s + out.decode_s)
    name = f"{policy if budget is None else f'{policy}@{budget}'} (flexkv.generate, one at a time)"
    return summarize(name, policy, budget, 1, recs, time.perf_counter() - t0,
                     dict(slot_mib=None, warmup_s=None, mean_batch=1.0, load1=load,
                          cpu_s=time.process_time() - cpu0)), recs


# --------------------------------------------------------------------------- report
def stamp(argv, wall_s, device, load_start) -> dict:
    commit = commit_id(("flexkv", "models", "bench/serve.py"))
    uptime = subprocess.run(["uptime"], text=True, capture_output=True).stdout.strip()
    dev = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    return dict(command="python bench/serve.py " + " ".join(argv), commit=commit,
                device=dev, cpus=os.cpu_count(), torch=torch.__version__, threads=torch.get_num_threads(),
                wall_s=round(wall_s, 1), load_start=load_start, load_end=list(os.getloadavg()), uptime=uptime)


COLS = [("config", "config"), ("slots", "slots"), ("completed", "completed"), ("failed", "failed"),
        ("lost", "lost"), ("tok_s", "out tok/s"), ("x_full", "x full"), ("ttft_p50_s", "TTFT p50 s"),
        ("ttft_p99_s", "TTFT p99 s"), ("tpot_p50_ms", "TPOT p50 ms"), ("tpot_p99_ms", "TPOT p99 ms"),
        ("mean_batch", "mean batch"), ("busy", "engine busy"), ("prefill_ms_chunk", "prefill ms/chunk"),
        ("decode_ms_step", "decode ms/step"), ("prefill_share", "prefill share"),
        ("duration_s", "duration s"), ("load1", "load"), ("tok_cpu_s", "out tok/CPU-s")]


def arrivals(cfg) -> str:
    """The offered load, in words."""
    if cfg["rate"] <= 0:
        return "all requests sent at once"
    return (f"Poisson arrivals at {cfg['rate']:g} req/s (offered load "
            f"{cfg['rate'] * cfg['max_tokens']:g} output tok/s)")


def verdict(rows) -> str | None:
    """The target line: the best budget-256 server against `full`'s, both judged on whether the
    run measured capacity (every request answered, the engine busy) or something else."""
    full = next((r for r in rows if r["config"] == "full"), None)
    best = [r for r in rows if r["budget"] == 256 and "one at a time" not in r["config"]]
    if not full or not full["tok_s"] or not best:
        return None
    b = max(best, key=lambda r: r["tok_s"])
    ok = b["x_full"] >= 4 and b["completed"] == b["requests"]
    line = (f"Target (budget 256 >= 4x `full` output tokens/s at equal KV memory, every request "
            f"answered): {'met' if ok else 'not met'} in this run (best budget-256 config "
            f"{b['config']}: {b['x_full']:.2f}x, {b['completed']}/{b['requests']} completed).")
    if full["completed"] < full["requests"]:
        line += (f" `full` answered only {full['completed']}/{full['requests']} requests within the "
                 "time limit, and out tok/s counts completed requests only: the ratio is inflated, "
                 "so the run does not settle the target (raise --time-limit).")
    idle = [r for r in (full, b) if r.get("busy") is not None and r["busy"] < 0.9]
    if idle:
        line += (" " + " and ".join(f"{r['config']} was busy {100 * r['busy']:.0f} %" for r in idle)
                 + " of its run: it waited for requests, so its out tok/s is the offered load's, not "
                 "its capacity" + (" (the ratio is a lower bound; raise --rate)." if b in idle else "."))
    return line


def markdown(meta, cfg, rows) -> str:
    ld = lambda xs: "/".join(f"{x:.2f}" for x in xs)  # noqa: E731
    lines = [f"# Serving benchmark: {meta['name']}", "", f"`{meta['command']}`  ",
             f"commit {meta['commit']}, device {meta['device']} ({meta['cpus']} cores), torch "
             f"{meta['torch']}, {meta['threads']} torch threads, wall {meta['wall_s']} s, load "
             f"average (1/5/15 min) {ld(meta['load_start'])} at the start, {ld(meta['load_end'])} at the end",
             "", f"Model {cfg['model']} ({cfg['dtype']}, weights: {cfg.get('weights', 'checkpoint')}), "
             f"{cfg['requests']} requests: prompts of "
             f"{cfg['prompt_min']}-{cfg['prompt_max']} tokens (random windows of pydoc_data.topics prose), "
             f"{cfg['max_tokens']} greedy tokens each (ignore_eos), {arrivals(cfg)} "
             f"(seed {cfg['seed']}), time limit {cfg['time_limit']:g} s per configuration; every "
             f"server at kv_memory = {cfg['kv_memory'] / 2**20:.1f} MiB ({cfg['full_slots']} `full` "
             f"slots at {cfg['prompt_max']} + {cfg['max_tokens']} tokens); prefill chunk "
             f"{cfg['prefill_chunk']}, compile {'on' if cfg['compile'] else 'off'}, compiled prefill "
             f"{'on' if cfg.get('compile_prefill') else 'off'}. TTFT from sending "
             "(queueing included); TPOT = (last - first token time) / (tokens - 1); out tok/s = "
             "completed output tokens / (first send to last answer); mean batch = tokens per decode step; "
             "engine busy = the engine's seconds in prefill chunks and decode steps over the run's "
             "length (well under 1: it waited for requests, and out tok/s is the offered load's, not "
             "the configuration's capacity; a little over 1: its last steps also free the finished "
             "slots after the answers went out); prefill / decode ms = per chunk / per step (a decode "
             "step includes sampling and handing the tokens out); prefill share = prefill's part of "
             "the busy time; load = the 1-minute load average when the configuration started; out "
             "tok/CPU-s = output tokens per CPU-second of the server process (engine and HTTP "
             "threads; the load generator runs in a process of its own).",
             "", "| " + " | ".join(h for _, h in COLS) + " |", "|" + "---|" * len(COLS)]
    for r in rows:
        cells = []
        for k, _ in COLS:
            v = r.get(k)
            cells.append("-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    if meta.get("target"):
        lines += ["", meta["target"]]
    errs = sorted({e for r in rows for e in r["errors"]})
    if errs:
        lines += ["", "Not completed: " + "; ".join(errs)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["client"]:
        return client_main()
    ap = argparse.ArgumentParser(prog="bench/serve.py", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--model", help="a known name (default smollm2-135m-instruct) or a checkpoint dir")
    ap.add_argument("--device")
    ap.add_argument("--dtype")
    for opt, typ in (("prompt-min", int), ("prompt-max", int), ("prompt-step", int), ("max-tokens", int),
                     ("requests", int), ("rate", float), ("time-limit", float), ("prefill-chunk", int),
                     ("threads", int), ("full-slots", int)):
        ap.add_argument(f"--{opt}", type=typ)
    ap.add_argument("--kv-memory", help="KV bytes of every server, e.g. 512MiB (default: "
                    "--full-slots slots of `full` at prompt-max + max-tokens)")
    ap.add_argument("--policies", help="comma-separated (default: the preset's)")
    ap.add_argument("--budgets", help="comma-separated (default: 256,512)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--compile-prefill", action=argparse.BooleanOptionalAction, default=None,
                    help="the servers' compile_prefill (default: the preset's, off)")
    ap.add_argument("--sequential", help="configs to also run through flexkv.generate one at a "
                    "time, e.g. full,h2o@256 (default: full; 'none' for none)", default="full")
    ap.add_argument("--random-weights", action="store_true",
                    help="--model is a directory with config.json and the tokenizer only: the "
                    "weights are drawn at random (seeded). For the lent GPU, which cannot fetch "
                    "the checkpoint; throughput does not depend on the weights (every request "
                    "runs --max-tokens tokens: ignore_eos)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--name", help="result file stem (default: the preset)")
    args = ap.parse_args(argv)
    cfg = dict(PRESETS[args.preset], seed=args.seed)
    for k in list(cfg):
        v = getattr(args, k, None)
        if v is not None:
            cfg[k] = v
    if not 1 <= cfg["prompt_min"] <= cfg["prompt_max"] or cfg["max_tokens"] < 2 or cfg["requests"] < 1:
        ap.error("need 1 <= --prompt-min <= --prompt-max, --max-tokens >= 2, --requests >= 1")
    device, dtype = torch.device(cfg["device"]), getattr(torch, cfg["dtype"])
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA GPU here (use --preset cpu)")
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    import flexkv
    from flexkv.serve.engine import parse_bytes
    t_start, load_start = time.perf_counter(), list(os.getloadavg())
    if args.random_weights:
        model, tok = random_model(cfg["model"], device, dtype)
    else:
        model, tok = flexkv.load_model(cfg["model"], device=device, dtype=dtype)
    cfg["weights"] = "random (N(0, 0.02), seed 0)" if args.random_weights else "checkpoint"
    full_bytes = slot_bytes(model, "full", None, cfg["prompt_max"], cfg["max_tokens"], dtype)
    cfg["kv_memory"] = parse_bytes(args.kv_memory) if args.kv_memory else cfg["full_slots"] * full_bytes
    reqs = make_requests(tok, cfg["requests"], cfg["prompt_min"], cfg["prompt_max"],
                         max(1, cfg["prompt_step"]), cfg["rate"], cfg["seed"])
    by_len = {len(q["ids"]): q["ids"] for q in reqs}
    lengths = sorted(by_len)
    # warm-up prompts, untimed: every distinct length where shapes compile (CUDA prefill, and
    # the sequential compiled decode: a `full` cache's size is prompt + max_tokens), else one short
    warm_all = [by_len[n] for n in lengths]
    warm = warm_all if device.type == "cuda" else [reqs[0]["ids"][:32]]
    if cfg["compile_prefill"] and device.type != "cuda":  # its graphs: a later chunk, and a
        warm += [by_len[n] for n in lengths[-2:]]         # second prompt length (snapkv's int)
    # budget-major (full, every policy at the first budget, then the next budget): a run cut
    # short by a time limit (the GPU stage) still has the budget-256 rows the target is about
    configs = [("full", None)] + [(p, int(b)) for b in str(cfg["budgets"]).split(",")
                                  for p in cfg["policies"].split(",")]
    seq = [] if args.sequential == "none" else [
        (s.split("@")[0], int(s.split("@")[1]) if "@" in s else None) for s in args.sequential.split(",")]
    rows, per_request, name = [], {}, args.name or args.preset
    print(f"[serve] kv_memory {cfg['kv_memory'] / 2**20:.1f} MiB; {len(reqs)} requests, prompts "
          f"{lengths[0]}-{lengths[-1]} tokens, {cfg['max_tokens']} new tokens", flush=True)

    def write():
        meta = dict(stamp(argv, time.perf_counter() - t_start, device, load_start), name=name)
        base = next((r["tok_s"] for r in rows if r["config"] == "full"), None)
        for r in rows:
            r["x_full"] = r["tok_s"] / base if base else None
        meta["target"] = verdict(rows)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{name}.json").write_text(json.dumps(
            dict(meta=meta, config=cfg, rows=rows, requests=per_request), indent=1))
        md = markdown(meta, cfg, rows)
        (args.out / f"{name}.md").write_text(md)
        return md

    for policy, budget in configs:
        row, recs = run_server(model, tok, cfg, policy, budget, reqs, warm)
        rows.append(row)
        per_request[row["config"]] = recs
        print(f"[serve] {row['config']}: {row['tok_s']:.2f} out tok/s, {row['completed']}/"
              f"{row['requests']} completed, {row['lost']} lost", flush=True)
        write()
    for policy, budget in seq:
        row, recs = run_sequential(model, cfg, policy, budget, reqs, warm_all if cfg["compile"] else [])
        rows.append(row)
        per_request[row["config"]] = recs
        print(f"[serve] {row['config']}: {row['tok_s']:.2f} out tok/s", flush=True)
        write()
    print(write())
    return 0


if __name__ == "__main__":
    sys.exit(main())
