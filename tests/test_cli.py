"""The `flexkv` CLI and the passkey-prompt builder.

Everything runs on a tiny random LLaMA checkpoint written on the fly (transformers
`LlamaForCausalLM.save_pretrained`) with a byte-level tokenizer built in code (256 byte tokens,
no merges, so decoding is exact and one token = one byte), with and without a chat template.
The real SmolLM2 tokenizer is used only when the default model is already provisioned.
"""
from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import torch

from flexkv import cli
from flexkv.cli import main
from helpers import BYTE_VOCAB, byte_tokenizer
from flexkv.passkey import (
    ANSWER_PREFIX,
    INTRO,
    QUESTION,
    build_passkey_prompt,
    extract_answer,
    random_key,
)

VOCAB = BYTE_VOCAB


def _make_checkpoint(d, chat: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = byte_tokenizer(chat)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=4096, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return _make_checkpoint(tmp_path_factory.mktemp("tiny-llama-chat"), chat=True)


@pytest.fixture(scope="module")
def tiny_tok(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_dir))


@pytest.fixture(scope="module")
def plain_tok():
    return byte_tokenizer(chat=False)


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


# ----------------------------------------------------------------------------- generate


def test_generate_streams_the_greedy_tokens(tiny_dir, tiny_tok, capsys):
    import flexkv

    rc = main(["generate", "--model", str(tiny_dir), "--prompt", "hello world",
               "--max-new-tokens", "5", "--device", "cpu"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "Traceback" not in cap.err
    # what was streamed is exactly the decoded greedy continuation (up to eos)
    model, tok = flexkv.load_model(str(tiny_dir))
    ids = torch.tensor([tok("hello world")["input_ids"]])
    out = flexkv.generate(model, ids, max_new_tokens=5, eos_token_id=tok.eos_token_id)
    new = out.tokens[0, ids.shape[1]:].tolist()
    if tok.eos_token_id in new:
        new = new[:new.index(tok.eos_token_id)]
    assert cap.out == tok.decode(new, skip_special_tokens=True) + "\n"
    assert "prompt" in cap.err and "KV held" in cap.err


def test_generate_chat_sampling_policy_params(tiny_dir, capsys):
    rc = main(["generate", "--model", str(tiny_dir), "--prompt", "hi", "--chat",
               "--max-new-tokens", "4", "--temperature", "0.8", "--top-k", "20", "--top-p", "0.9",
               "--seed", "3", "--policy", "streaming", "--budget", "8", "--param", "n_sink=2",
               "--prefill-chunk", "4", "--device", "cpu"])
    cap = capsys.readouterr()
    if rc != 0 and "streaming" in cap.err and "unknown" in cap.err:
        pytest.skip("policy 'streaming' (with parameter n_sink) is not registered")
    assert rc == 0, cap.err
    assert cap.out.endswith("\n")


def test_unknown_policy_is_a_one_line_error(tiny_dir, capsys):
    rc = main(["generate", "--model", str(tiny_dir), "--prompt", "hi", "--policy", "nosuch"])
    cap = capsys.readouterr()
    assert rc == 2
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nosuch" in lines[0], cap.err
    assert cap.out == ""


@pytest.mark.parametrize("argv, needle", [
    (["--param", "sink"], "name=value"),
    (["--max-new-tokens", "0"], "max-new-tokens"),
    (["--dtype", "float8"], "dtype"),
])
def test_bad_arguments_exit_2(tiny_dir, capsys, argv, needle):
    rc = main(["generate", "--model", str(tiny_dir), "--prompt", "hi", *argv])
    cap = capsys.readouterr()
    assert rc == 2 and needle in cap.err and "Traceback" not in cap.err


def test_library_value_errors_are_one_line(tiny_dir, capsys):
    # budget for 'full' is a library ValueError; too many new tokens for the model's context too
    for extra in (["--budget", "5"], ["--max-new-tokens", "100000"], ["--temperature", "-1"]):
        rc = main(["generate", "--model", str(tiny_dir), "--prompt", "hi", "--device", "cpu", *extra])
        cap = capsys.readouterr()
        assert rc == 2, (extra, cap.err)
        err = [l for l in cap.err.splitlines() if not l.startswith("[flexkv]")]
        assert len(err) == 1 and err[0].startswith("error: "), (extra, cap.err)


def test_missing_model_dir_and_empty_prompt(tmp_path, tiny_dir, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    assert "error: " in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "  "]) == 2
    assert "--prompt" in capsys.readouterr().err


def test_param_parsing():
    assert cli._param("recent=64") == ("recent", 64)
    assert cli._param("alpha=0.5") == ("alpha", 0.5)
    assert cli._param("pyramid=true") == ("pyramid", True)
    assert cli._param("flag=False") == ("flag", False)
    assert cli._param("x=None") == ("x", None)
    assert cli._param("kind=mean") == ("kind", "mean")
    with pytest.raises(Exception):
        cli._param("novalue")


def test_streamer_waits_for_complete_characters(plain_tok):
    import io

    buf = io.StringIO()
    s = cli.TextStreamer(plain_tok, eos_ids=[plain_tok.eos_token_id], out=buf)
    ids = plain_tok("héllo → ok\nnext")["input_ids"]   # multi-byte chars span several tokens
    for t in ids + [plain_tok.eos_token_id] + ids:
        s(torch.tensor([t]))
        assert "\ufffd" not in buf.getvalue()
    s.finish()
    assert buf.getvalue() == "héllo → ok\nnext\n"


def test_no_command_and_help(capsys):
    assert main([]) == 2
    assert main(["--help"]) == 0
    assert "generate" in capsys.readouterr().out


def test_python_dash_m(tmp_path):
    r = subprocess.run([sys.executable, "-m", "flexkv", "--version"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("flexkv ")


# ----------------------------------------------------------------------------- demo and bench


def test_demo_on_tiny_model(tiny_dir, capsys):
    rc = main(["demo", "--model", str(tiny_dir), "--length", "400", "--policies", "full",
               "--device", "cpu", "--no-compile", "--max-new-tokens", "3", "--seed", "1"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    key = random_key(random.Random(1))
    assert f"expected key: {key}" in cap.out
    row = [l for l in cap.out.splitlines() if l.startswith("full")]
    assert len(row) == 1 and "MiB" in row[0]
    assert "decode tok/s" in cap.out and "retained/head" in cap.out
    assert "trade-off: no compressing policy answered at budget 256" in cap.out


def test_demo_sweep_finds_the_smallest_answering_budget():
    """The sweep halves each answering policy's budget while it still answers (stopping at the
    first failure or below the floor) and ranks the policies by that budget."""
    limit = {"h2o": 64, "tova": 16, "snapkv": 256}          # answers iff budget >= limit
    calls = []

    def still(p, b):
        calls.append((p, b))
        return b >= limit[p], b * 1000

    got = cli.smallest_budgets(still, {p: (256, 256_000) for p in limit}, floor=32)
    assert got == {"h2o": (64, 64_000), "tova": (32, 32_000), "snapkv": (256, 256_000)}
    assert ("h2o", 16) not in calls and ("tova", 16) not in calls     # never below the floor
    assert [c for c in calls if c[0] == "h2o"] == [("h2o", 128), ("h2o", 64), ("h2o", 32)]
    line = cli.tradeoff_line(got, 1_024_000, 256, 32)
    assert "best tova at 32 tokens/head" in line
    assert line.index("tova at 32") < line.index("h2o at 64") < line.index("snapkv at 256")
    assert "96.9 % less than full" in line                # 1 - 32_000 / 1_024_000


def test_demo_bad_policy_and_depth(tiny_dir, capsys):
    assert main(["demo", "--model", str(tiny_dir), "--policies", "full,nosuch"]) == 2
    assert "nosuch" in capsys.readouterr().err
    assert main(["demo", "--model", str(tiny_dir), "--depth", "1.5"]) == 2
    assert "--depth" in capsys.readouterr().err


def test_demo_default_policies():
    from flexkv.policies import available

    pols = cli._demo_policies(None)
    assert pols == ["full", "streaming", "h2o", "snapkv", "weightedkv", "h2o+vam"]
    assert {"streaming", "h2o", "snapkv", "weightedkv"} <= set(available())


def test_bench_dispatch_reaches_every_benchmark(capsys):
    """`flexkv bench NAME --help` reaches bench/NAME.py's own parser for every listed benchmark."""
    for name in cli.BENCHMARKS:
        assert main(["bench", name, "--help"]) == 0, name
        assert "usage:" in capsys.readouterr().out, name


def test_bench_dispatch(tmp_path, monkeypatch, capsys):
    (tmp_path / "speed.py").write_text(
        "import json\n"
        "def main(argv):\n"
        "    print(json.dumps(argv))\n"
        "    if argv == ['--fail']:\n"
        "        raise SystemExit(2)\n"
        "    return 0\n")
    monkeypatch.setattr(cli, "bench_dir", lambda: tmp_path)
    assert main(["bench", "speed", "--steps", "3", "--help"]) == 0
    assert json.loads(capsys.readouterr().out) == ["--steps", "3", "--help"]
    assert main(["bench", "speed", "--fail"]) == 2
    assert main(["bench", "speed"]) == 0
    assert [json.loads(l) for l in capsys.readouterr().out.splitlines()] == [["--fail"], []]
    rc = main(["bench", "quality", "--x"])
    cap = capsys.readouterr()
    assert rc == 2 and "bench/ directory" in cap.err
    monkeypatch.setattr(cli, "bench_dir", lambda: None)
    assert main(["bench", "speed"]) == 2
    assert "source checkout's bench/ directory" in capsys.readouterr().err


# ----------------------------------------------------------------------------- passkey


def _needle_depth(text: str, key: str) -> float:
    """Relative offset of the needle within the haystack (0 = start, 1 = end)."""
    start = text.index(INTRO) + len(INTRO) + 1
    end = text.index("\n" + QUESTION)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    at = text.index(needle)
    return (at - start) / max(1, (end - start) - len(needle))


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.25, 0.5, 0.77, 0.9, 1.0])
def test_passkey_depth_and_length(tiny_tok, depth, chat):
    key = "48213"
    n = 1500
    ids, answer = build_passkey_prompt(tiny_tok, n, depth, key, chat=chat)
    assert answer == key
    assert ids.dtype == torch.long and ids.dim() == 2 and ids.shape[0] == 1
    assert abs(ids.shape[1] - n) <= 0.05 * n
    text = tiny_tok.decode(ids[0].tolist())
    assert text.count(key) == 2
    assert abs(_needle_depth(text, key) - depth) <= 0.10
    assert text.endswith(ANSWER_PREFIX)
    if chat:
        assert text.endswith("<|assistant|>" + ANSWER_PREFIX)


@pytest.mark.parametrize("n", [300, 1000, 3000])
def test_passkey_length_within_5_percent(plain_tok, n):
    ids, _ = build_passkey_prompt(plain_tok, n, 0.5, 12345, chat=False)
    assert abs(ids.shape[1] - n) <= 0.05 * n


def test_passkey_custom_filler_and_needle(plain_tok):
    ids, ans = build_passkey_prompt(plain_tok, 600, 0.5, 777, chat=False,
                                    filler="Lorem ipsum dolor sit amet. Consectetur adipiscing!",
                                    needle="Secret: {key}.")
    text = plain_tok.decode(ids[0].tolist())
    assert ans == "777" and "Secret: 777." in text and "Lorem ipsum" in text
    assert abs(ids.shape[1] - 600) <= 30


def test_passkey_validation(plain_tok, tiny_tok):
    with pytest.raises(ValueError, match="depth"):
        build_passkey_prompt(plain_tok, 500, 1.5, 1, chat=False)
    with pytest.raises(ValueError, match="depth"):
        build_passkey_prompt(plain_tok, 500, -0.1, 1, chat=False)
    with pytest.raises(ValueError, match="n_tokens"):
        build_passkey_prompt(plain_tok, 20, 0.5, 1, chat=False)
    with pytest.raises(ValueError, match="chat"):
        build_passkey_prompt(plain_tok, 500, 0.5, 1, chat=True)   # no chat template
    with pytest.raises(ValueError, match="needle"):
        build_passkey_prompt(tiny_tok, 500, 0.5, 1, needle="no placeholder")
    with pytest.raises(ValueError, match="key"):
        build_passkey_prompt(tiny_tok, 500, 0.5, "")


def test_extract_answer_and_random_key():
    assert extract_answer(" 48213. Remember") == "48213"
    assert extract_answer("The key is 12 or 345") == "12"
    assert extract_answer("no digits") == ""
    k = random_key(random.Random(0))
    assert len(k) == 5 and k.isdigit() and k == random_key(random.Random(0))
    assert len(random_key(torch.Generator().manual_seed(0))) == 5
    assert len(random_key(7)) == 5
    np = pytest.importorskip("numpy")
    assert len(random_key(np.random.default_rng(0))) == 5


def _default_tokenizer():
    from flexkv.models.provision import DEFAULT_MODEL, cache_root, is_complete

    d = cache_root() / DEFAULT_MODEL
    if not is_complete(d):
        pytest.skip("default model not provisioned (run `flexkv demo` once)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(d))


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_passkey_with_smollm2_tokenizer(depth, chat):
    tok = _default_tokenizer()
    ids, key = build_passkey_prompt(tok, 4096, depth, "60494", chat=chat)
    assert abs(ids.shape[1] - 4096) <= 0.02 * 4096
    text = tok.decode(ids[0].tolist())
    assert abs(_needle_depth(text, key) - depth) <= 0.10
    if chat:
        assert text.endswith("<|im_start|>assistant\n" + ANSWER_PREFIX)
    else:
        assert text.endswith(f"\n{QUESTION} {ANSWER_PREFIX}")
