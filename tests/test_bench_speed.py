"""The speed benchmark's harness runs end to end (tiny random model, eager, one cell per policy)."""
import json

import pytest

from helpers import load_bench


def load_speed():
    return load_bench("speed")


def test_tiny_speed_grid(tmp_path, capsys):
    speed = load_speed()
    assert speed.main(["--preset", "tiny", "--no-compile", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "tiny.json").read_text())
    impls = {(r["impl"], r["policy"]) for r in data["rows"]}
    assert {("flexkv", "full"), ("flexkv", "streaming"), ("flexkv", "h2o"),
            ("transformers-eager", "full")} <= impls
    for r in data["rows"]:
        assert r["decode_ms"] > 0 and r["floor_ms"] > 0 and 0 < r["frac_floor"]
    for key in ("command", "commit", "device", "torch", "wall_s"):
        assert key in data["meta"]
    md = (tmp_path / "tiny.md").read_text()
    assert "| flexkv | h2o |" in md and "frac_floor" in md


def test_bad_arguments():
    speed = load_speed()
    with pytest.raises(SystemExit):
        speed.main(["--preset", "tiny", "--new-tokens", "1"])


@pytest.mark.slow
def test_transformers_static_compile_baseline_recompiles_nothing_while_timed():
    """The static-cache + compile baseline times warm code: transformers sizes a static cache per
    `generate` call (the longest so far), so a warm-up shorter than the timed run used to make
    the timed run recompile, and its compile time landed in decode_ms."""
    import torch

    speed = load_speed()
    _, hf = speed.build_models("tiny", torch.device("cpu"), torch.float32, True)
    ids = torch.randint(0, 100, (1, 24), generator=torch.Generator().manual_seed(0))
    row = speed.run_hf(hf, ids, "static-compile", 6, 1e10)
    assert row.recompiles == 0
    assert row.compile_s is not None and row.compile_s > 0
    assert 0 < row.decode_ms < 1e3 * row.compile_s  # a step, not a compile


@pytest.mark.slow
def test_compiled_cell_counts_recompiles_over_a_long_run(tmp_path):
    """A compiled cell records CUDA-graph skips, and the preset's long_policy gets a long run of
    the same shapes (issue 9: 0 recompiles and 0 CUDA-graph skips across 1000 decode steps on
    the GPU; 24 tokens on the tiny preset)."""
    speed = load_speed()
    assert speed.main(["--preset", "tiny", "--policies", "h2o,streaming", "--no-hf",
                       "--out", str(tmp_path)]) == 0
    rows = {r["policy"]: r for r in json.loads((tmp_path / "tiny.json").read_text())["rows"]}
    h2o, streaming = rows["h2o"], rows["streaming"]
    assert (h2o["long_steps"], h2o["long_recompiles"], h2o["long_cudagraph_skips"]) == (23, 0, 0)
    assert h2o["recompiles"] == 0 and h2o["cudagraph_skips"] == 0
    assert streaming["long_steps"] is None  # only the preset's long_policy
    assert "long_recompiles" in (tmp_path / "tiny.md").read_text()


def test_markdown_ratios_against_streaming_and_transformers_static():
    """The table's issue-9 ratios: decode time over `streaming`'s at the same prompt, budget and
    batch, and tokens/s over transformers static+compile's at the same prompt and batch; only
    where those rows exist."""
    speed = load_speed()
    nan = float("nan")

    def row(impl, policy, budget, ms, batch=1, error=None):
        return speed.Row(impl, policy, 4096, budget, batch, ms, 1e3 * batch / ms, 1.0, 1 / ms,
                         2.0, 1.0, None, None, None, None, 0, 10, error)

    rows = [row("flexkv+compile", "streaming", 512, 5.0), row("flexkv+compile", "h2o", 512, 5.5),
            row("flexkv+compile", "h2o", 512, 9.0, batch=8),  # no streaming row at batch 8
            row("transformers-static-compile", "full", None, 20.0),
            row("flexkv+compile", "tova", 512, nan, error="skipped: time budget")]
    md = speed.markdown(dict(preset="p", command="c", commit="x", device="d", torch="t",
                             wall_s=1), rows, 1e12)
    head, _, *body = [line for line in md.splitlines() if line.startswith("|")]
    cols = [c.strip() for c in head.strip("|").split("|")]
    table = [dict(zip(cols, (c.strip() for c in line.strip("|").split("|")))) for line in body]
    assert [(t["policy"], t["batch"], t["x_streaming_ms"], t["x_hf_static_tok_s"])
            for t in table] == [("streaming", "1", "1", "4"), ("h2o", "1", "1.1", "3.64"),
                                ("h2o", "8", "-", "-"), ("full", "1", "-", "-"),
                                ("tova", "1", "-", "-")]
    assert [t["x_plain_prefill"] for t in table] == ["2", "2", "2", "-", "-"]  # prefill 2 s / 1 s
    plain = speed.markdown(dict(preset="p", command="c", commit="x", device="d", torch="t",
                                wall_s=1), rows[3:4], 1e12)
    assert "x_streaming_ms" not in plain and "x_plain_prefill" not in plain
