"""The serving benchmark's harness runs end to end: a tiny random llama with a byte-level
tokenizer (as tests/test_server.py), the real server on loopback, every configuration at the
same KV memory, the sequential baseline; no compile."""
import json

import pytest

from helpers import load_bench

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")


def load_serve_bench():
    return load_bench("serve")


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tk = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(["<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from helpers import make_checkpoint

    tok = byte_tokenizer()
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
                         "--time-limit", "120", "--policies", "streaming,h2o", "--budgets", "16,32",
                         "--no-compile", "--sequential", "full,h2o@16", "--out", str(tmp_path),
                         "--name", "tiny"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    data = json.loads((tmp_path / "tiny.json").read_text())
    configs = ["full", "streaming@16", "h2o@16", "streaming@32", "h2o@32",  # budget-major
               "full (flexkv.generate, one at a time)", "h2o@16 (flexkv.generate, one at a time)"]
    assert [r["config"] for r in data["rows"]] == configs
    for r in data["rows"]:
        assert r["completed"] == r["requests"] == 6 and r["failed"] == r["lost"] == 0, r
        assert r["out_tokens"] == 6 * 6 and r["tok_s"] > 0
        assert r["ttft_p50_s"] > 0 and r["ttft_p99_s"] >= r["ttft_p50_s"]
        assert r["tpot_p50_ms"] > 0 and r["tpot_p99_ms"] >= r["tpot_p50_ms"]
        assert r["tok_cpu_s"] > 0 and r["load1"] >= 0
    slots = {r["config"]: r["slots"] for r in data["rows"]}
    assert slots["full"] == 2                              # the default kv_memory: 2 full slots
    assert slots["streaming@16"] > slots["streaming@32"] > slots["full"]  # same memory, more slots
    for key in ("command", "commit", "device", "torch", "threads", "wall_s", "load_start", "uptime"):
        assert key in data["meta"]
    md = (tmp_path / "tiny.md").read_text()
    for c in configs:
        assert f"| {c} |" in md
    assert "TTFT p99 s" in md and "out tok/CPU-s" in md and "Target (budget 256" not in md  # no budget-256 row here


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
