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
