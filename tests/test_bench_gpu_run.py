"""bench/gpu_run.py without a GPU: which decode-probabilities path a speed stage runs with (the
environment, else this call's candidates, else the copy an earlier call on the machine left), and
the summary naming it."""
import json

from helpers import load_bench


def _candidates(path, fastest):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(rows=[], fastest=fastest)))


def test_decode_probs_for(tmp_path, monkeypatch):
    gr = load_bench("gpu_run")
    out, state = tmp_path / "out", tmp_path / "state"
    out.mkdir()
    monkeypatch.setattr(gr, "STATE", state)
    monkeypatch.delenv("FLEXKV_DECODE_PROBS", raising=False)
    keys = ["S=32769 B=1", "S=4097 B=1"]
    path, why = gr.decode_probs_for(keys, out)
    assert path is None and "default" in why
    _candidates(state / "decode-candidates.json", {"S=4097 B=1": "flex_lse"})  # an earlier call
    assert gr.decode_probs_for(keys, out)[0] == "flex_lse"                 # the fallback key
    _candidates(out / "decode-candidates.json", {"S=32769 B=1": "triton", "S=4097 B=1": "lowp"})
    path, why = gr.decode_probs_for(keys, out)                             # this call's, first key
    assert path == "triton" and "S=32769 B=1" in why
    assert gr.decode_probs_for(["S=4097 B=8"], out)[0] is None             # no such key anywhere
    monkeypatch.setenv("FLEXKV_DECODE_PROBS", "explicit")                  # the environment wins
    path, why = gr.decode_probs_for(keys, out)
    assert path is None and why.startswith("explicit")


def test_summary_names_the_path(tmp_path):
    gr = load_bench("gpu_run")
    res = [dict(stage="speed-4k", status="ok", seconds=1.0,
                decode_probs="triton (fastest in decode-candidates at S=4097 B=1)")]
    text = gr.write_summary(tmp_path, dict(torch="x"), res)
    row = "| speed-4k | ok | 1.0 | - | triton (fastest in decode-candidates at S=4097 B=1) |"
    assert row in text
    assert (tmp_path / "summary.md").read_text() == text
