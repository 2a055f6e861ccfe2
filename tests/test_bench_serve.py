"""The serving benchmark's harness runs end to end: a tiny random llama with a byte-level
tokenizer (as tests/test_server.py), the real server on loopback, every configuration at the
same KV memory, the sequential baseline; no compile."""
import json

import pytest

from helpers import byte_tokenizer, load_bench

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")


def load_serve_bench():
    return load_bench("serve")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from helpers import make_checkpoint

    tok = byte_tokenizer(chat=False, specials=("<s>", "</s>"))
    d = make_checkpoint(tmp_path_factory.mktemp("tiny-serve-bench"), "llama", seed=0,
                        vocab_size=len(tok), max_position_embeddings=256,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    tok.save_pretrained(str(d))
    return d


def test_tiny_serve_bench(tiny_dir, tmp_path):
    import torch

    bench = load_serve_bench()
    threads = torch.get_num_threads()
    try:
        rc = bench.main(["--preset", "cpu", "--model", str(tiny_dir), "--prompt-min", "48",
                         "--prompt-max", "96", "--max-tokens", "6", "--requests", "6", "--rate", "50",
                         "--time-limit", "120", "--policies", "h2o", "--budgets", "16,32",
                         "--no-compile", "--sequential", "h2o@16", "--out", str(tmp_path),
                         "--name", "tiny"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    data = json.loads((tmp_path / "tiny.json").read_text())
    # budget-major, then the sequential runs (each configuration's load client is a process of
    # its own, ~2.5 s of CI apiece: one policy here)
    configs = ["full", "h2o@16", "h2o@32", "h2o@16 (flexkv.generate, one at a time)"]
    assert [r["config"] for r in data["rows"]] == configs
    for r in data["rows"]:
        assert r["completed"] == r["requests"] == 6 and r["failed"] == r["lost"] == 0, r
        assert r["out_tokens"] == 6 * 6 and r["tok_s"] > 0
        assert r["ttft_p50_s"] > 0 and r["ttft_p99_s"] >= r["ttft_p50_s"]
        assert r["tpot_p50_ms"] > 0 and r["tpot_p99_ms"] >= r["tpot_p50_ms"]
        assert r["tok_cpu_s"] > 0 and r["load1"] >= 0
        if "one at a time" not in r["config"]:   # the engine's own counters, per configuration
            # busy can pass 1 a little: the last step also frees the finished slots after the
            # answer went out (on a run this short, a noticeable part of it)
            assert 0 < r["busy"] <= 1.5 and r["engine_s"] > 0, r
            assert r["prefill_chunks"] >= 6 and r["decode_steps"] >= 5, r   # >= 1 chunk per prompt
            assert r["prefill_ms_chunk"] > 0 and r["decode_ms_step"] > 0 and 0 < r["prefill_share"] < 1
    slots = {r["config"]: r["slots"] for r in data["rows"]}
    assert slots["full"] == 2                              # the default kv_memory: 2 full slots
    assert slots["h2o@16"] > slots["h2o@32"] > slots["full"]  # same memory, more slots
    for key in ("command", "commit", "device", "torch", "threads", "wall_s", "load_start", "uptime"):
        assert key in data["meta"]
    md = (tmp_path / "tiny.md").read_text()
    for c in configs:
        assert f"| {c} |" in md
    assert "TTFT p99 s" in md and "out tok/CPU-s" in md and "Target (budget 256" not in md  # no budget-256 row here
    assert "engine busy" in md and "prefill ms/chunk" in md and "offered load 300 output tok/s" in md


def row(config, budget, tok_s, busy, completed=96, requests=96):
    return dict(config=config, budget=budget, tok_s=tok_s, busy=busy, completed=completed,
                requests=requests)


def with_ratios(rows):
    for r in rows:
        r["x_full"] = r["tok_s"] / rows[0]["tok_s"]
    return rows


def test_verdict_says_when_the_run_measured_capacity():
    """The target line: met / not met, and when the run cannot settle it: `full` cut at the time
    limit (its tok/s counts completed requests only), or a server that waited for requests (its
    tok/s is the offered load's, a lower bound on its capacity)."""
    v = load_serve_bench().verdict
    assert v([row("full", None, 100.0, 1.0)]) is None                       # no budget-256 row
    met = v(with_ratios([row("full", None, 100.0, 0.99), row("h2o@256", 256, 450.0, 0.97),
                         row("streaming@256", 256, 420.0, 0.98)]))
    assert "Target" in met and ": met in this run" in met and "h2o@256: 4.50x" in met
    assert "busy" not in met and "inflated" not in met
    idle = v(with_ratios([row("full", None, 100.0, 0.99), row("h2o@256", 256, 300.0, 0.40)]))
    assert "not met" in idle and "h2o@256 was busy 40 %" in idle and "lower bound" in idle
    cut = v(with_ratios([row("full", None, 100.0, 1.0, completed=60), row("h2o@256", 256, 500.0, 1.0)]))
    assert ": met in this run" in cut and "60/96" in cut and "does not settle" in cut
    lost = v(with_ratios([row("full", None, 100.0, 1.0), row("h2o@256", 256, 500.0, 1.0, completed=90)]))
    assert "not met" in lost and "90/96 completed" in lost


def test_engine_use_from_two_metrics_snapshots():
    m0 = dict(decode_steps_total=10, tokens_generated_total=30, prefill_chunks_total=4,
              prefill_seconds_total=1.0, decode_seconds_total=2.0)
    m1 = dict(decode_steps_total=110, tokens_generated_total=530, prefill_chunks_total=14,
              prefill_seconds_total=1.5, decode_seconds_total=3.5)
    u = load_serve_bench().engine_use(m0, m1)
    assert u["mean_batch"] == 5.0 and u["decode_steps"] == 100 and u["prefill_chunks"] == 10
    assert u["engine_s"] == 2.0 and u["prefill_share"] == 0.25
    assert u["prefill_ms_chunk"] == 50.0 and u["decode_ms_step"] == 15.0


def test_bad_arguments():
    bench = load_serve_bench()
    with pytest.raises(SystemExit):
        bench.main(["--prompt-min", "100", "--prompt-max", "50"])


def test_random_weights_from_config_and_tokenizer_only(tiny_dir, tmp_path):
    """`--random-weights` (the GPU serve stage: the checkpoint cannot be carried) needs only the
    directory's config.json and tokenizer; a directory without config.json is refused."""
    import shutil

    import torch

    kit = tmp_path / "kit"
    kit.mkdir()
    for f in tiny_dir.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, kit / f.name)
    bench = load_serve_bench()
    threads = torch.get_num_threads()
    try:
        rc = bench.main(["--preset", "cpu", "--model", str(kit), "--random-weights",
                         "--prompt-min", "40", "--prompt-max", "60", "--max-tokens", "3",
                         "--requests", "2", "--rate", "0", "--policies", "h2o", "--budgets", "16",
                         "--no-compile", "--sequential", "none", "--out", str(tmp_path),
                         "--name", "rnd"])
        with pytest.raises(SystemExit, match="no config.json"):
            bench.main(["--model", str(tmp_path / "nowhere"), "--random-weights"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    data = json.loads((tmp_path / "rnd.json").read_text())
    assert [r["config"] for r in data["rows"]] == ["full", "h2o@16"]
    assert all(r["completed"] == 2 and r["out_tokens"] == 6 for r in data["rows"])
    assert data["config"]["weights"].startswith("random")
    assert "weights: random" in (tmp_path / "rnd.md").read_text()
