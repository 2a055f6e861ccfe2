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
