"""How long one request's own work holds the server's other requests (its event loop).

    python bench/serve_stall.py --out bench/results/serve/stall-cpu

The real server (`build_app` + uvicorn in a thread) over the default model streams one request
(the victim: greedy, `--tokens` tokens, ignore_eos) while one heavy request arrives, a case at a
time: a 4M-character prompt (tokenized, then refused for its length), 2,000,000 messages, a
body of 7,000,000 token ids (62 MB), a 3 MB JSON Schema, and a legal answer of many logprobs
(`--n` choices of `--heavy-tokens` tokens with 20 logprobs each). Meanwhile a probe asks
`/health` every 50 ms. Reported per case: the heavy request's status and seconds, the victim's
longest gap between two streamed events while it ran against its median gap, and the longest
`/health` answer. The server is `flexkv serve` in a process of its own; `--code-root DIR` serves
another checkout's flexkv (a worktree of an older commit: `git worktree add /tmp/old <sha>`),
to compare.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cases(n: int, heavy_tokens: int) -> dict:
    """name -> (path, body bytes)."""
    from pydoc_data.topics import topics
    prose = " ".join(topics.values())
    text = (prose * (4_000_000 // len(prose) + 1))[:4_000_000]
    wide = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(100_000)}}
    bodies = {
        "prompt of 4,000,000 characters": ("/v1/completions", {"prompt": text, "max_tokens": 1}),
        "2,000,000 messages": ("/v1/chat/completions",
                               {"messages": [{"role": "user", "content": ""}] * 2_000_000}),
        "7,000,000 token ids": ("/v1/completions",
                                {"prompt": list(range(7_000_000)), "max_tokens": 1}),
        "JSON Schema of 3 MB": ("/v1/completions", {"prompt": "hi", "max_tokens": 1,
                                "response_format": {"type": "json_schema", "json_schema": {
                                    "name": "wide", "schema": wide}}}),
        f"{n} choices x {heavy_tokens} tokens, 20 logprobs": (
            "/v1/chat/completions", {"messages": [{"role": "user", "content": "Tell a story."}],
                                     "n": n, "max_tokens": heavy_tokens, "logprobs": True,
                                     "top_logprobs": 20, "temperature": 1.0, "seed": 0,
                                     "ignore_eos": True}),
    }
    return {k: (p, json.dumps(b).encode()) for k, (p, b) in bodies.items()}


def one_case(httpx, url: str, path: str, body: bytes, victim_tokens: int) -> dict:
    events, health = [], []
    done = threading.Event()

    def victim():
        with httpx.stream("POST", f"{url}/v1/completions", timeout=600, json={
                "prompt": "Once upon a time", "max_tokens": victim_tokens, "ignore_eos": True,
                "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(time.perf_counter())
        done.set()

    def probe():
        while not done.is_set():
            t0 = time.perf_counter()
            httpx.get(f"{url}/health", timeout=600)
            health.append((t0, time.perf_counter() - t0))
            time.sleep(0.05)
    threads = [threading.Thread(target=victim), threading.Thread(target=probe)]
    for t in threads:
        t.start()
    while len(events) < 5:                 # the victim streams
        time.sleep(0.01)
    start = time.perf_counter()
    r = httpx.post(f"{url}{path}", content=body, timeout=600,
                   headers={"content-type": "application/json"})
    end = time.perf_counter()
    for t in threads:
        t.join()
    gaps = [(b, b - a) for a, b in zip(events, events[1:])]
    during = [g for t, g in gaps if start <= t <= end + 1.0] or [0.0]
    return {"status": r.status_code, "seconds": end - start,
            "max_gap_ms": 1e3 * max(during), "median_gap_ms": 1e3 * statistics.median(g for _, g in gaps),
            "health_max_ms": 1e3 * max([d for t0, d in health if start <= t0 <= end] or [0.0])}


def start_server(code_root: Path, model: str, slots: int, max_new: int, port: int):
    """`flexkv serve` of `code_root`'s flexkv in a process of its own (the clients here share no
    interpreter lock with it), once it answers /health."""
    import httpx

    cmd = [sys.executable, "-m", "flexkv", "serve", "--model", model, "--policy", "streaming",
           "--budget", "64", "--max-slots", str(slots), "--max-new-tokens", str(max_new),
           "--max-waiting", "64", "--port", str(port), "--no-compile"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(code_root)}
    proc = subprocess.Popen(cmd, cwd=code_root, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not start in 300 s")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tokens", type=int, default=400, help="the victim's tokens")
    ap.add_argument("--n", type=int, default=16, help="choices of the logprobs case")
    ap.add_argument("--heavy-tokens", type=int, default=128, help="tokens of each of its choices")
    ap.add_argument("--code-root", type=Path, default=ROOT, help="the checkout whose flexkv serves")
    ap.add_argument("--port", type=int, default=8431)
    ap.add_argument("--out", type=Path, default=Path("bench/results/serve/stall-cpu"))
    a = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import httpx

    from bench.stamp import write_results
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=a.code_root, text=True,
                            capture_output=True).stdout.strip()
    rows = []
    proc, url = start_server(a.code_root.resolve(), a.model, a.n + 1, max(a.tokens, a.heavy_tokens),
                             a.port)
    try:
        for name, (path, body) in cases(a.n, a.heavy_tokens).items():
            row = {"case": name, "body_mb": len(body) / 1e6,
                   **one_case(httpx, url, path, body, a.tokens)}
            print(row, file=sys.stderr, flush=True)
            rows.append(row)
    finally:
        proc.terminate()
        proc.wait(60)
    res = {"model": a.model, "commit": commit, "code_root": str(a.code_root),
           "command": "python bench/serve_stall.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "victim_tokens": a.tokens, "rows": rows}
    md = [f"# What one request's own work holds (flexkv at {commit}, {a.model}, CPU)", "",
          f"`{res['command']}`", "",
          "`flexkv serve` (streaming@64, one torch thread, eager) in a process of its own streams "
          f"a request (the victim, {a.tokens} tokens) while each heavy request arrives; its "
          "longest gap between two events while the heavy one ran (and 1 s after), against its "
          "median gap, and the longest `/health` answer meanwhile (asked every 50 ms).", "",
          "| heavy request | body MB | status | its seconds | victim's longest gap ms | median gap ms | /health longest ms |",
          "|---|---|---|---|---|---|---|"]
    md += [f"| {r['case']} | {r['body_mb']:.1f} | {r['status']} | {r['seconds']:.2f} | "
           f"{r['max_gap_ms']:.0f} | {r['median_gap_ms']:.0f} | {r['health_max_ms']:.0f} |" for r in rows]
    write_results(a.out, res, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
