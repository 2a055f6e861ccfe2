"""The compiled decode step's layer regions (`flexkv.models.llama.LAYER_REGIONS`): each decoder
layer is a nested compile region, traced once and stamped out for every later layer, wherever all
layers' caches have the same buffers; per-layer capacities stay unrolled. What the step computes
with them is checked by the compiled property tests (tests/test_policies.py, three-layer models);
these tests check the structure of the traced graph (dynamo only, no inductor: fast)."""
from __future__ import annotations

import pytest
import torch

import flexkv.models.llama as llama
from flexkv.generate import decode_one_token
from flexkv.testing import simplest
from helpers import decode_step_args
from policy_cases import CASES, COMPILED

T, NEW = 24, 8


def _traced_step(name: str, fixed: dict, n_layers: int = 3):
    """Trace one compiled decode step of policy `name` (its compiled-test parameters) on an
    n-layer model after an eager prefill -> (the dynamo graph, the cache)."""
    kw = simplest(CASES[name], T)
    kw.update(fixed)
    if not name.startswith("full"):
        kw["budget"] = 12
    args = decode_step_args(name, kw, n_layers, T=T, new=NEW)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    step = torch.compile(decode_one_token, backend=capture, fullgraph=True, dynamic=False)
    with torch.no_grad():
        step(*args)
    assert len(graphs) == 1
    return graphs[0], args[1]


def _regions(gm) -> tuple[int, int]:
    """(region calls, distinct region bodies) in a dynamo graph."""
    calls = [n for n in gm.graph.nodes
             if n.op == "call_function" and n.target is torch.ops.higher_order.invoke_subgraph]
    return len(calls), len({n.args[0].target for n in calls})


@pytest.mark.parametrize("name, fixed", COMPILED, ids=[f"{n}-{i}" for i, (n, _) in enumerate(COMPILED)])
def test_one_region_body_for_all_layers(name, fixed):
    """Every compiled variant: one region body called once per layer, but pyramidkv, whose
    per-layer capacities keep the layers unrolled."""
    gm, cache = _traced_step(name, fixed)
    uniform = name != "pyramidkv"
    assert llama.uniform_layers(cache) == uniform
    assert _regions(gm) == ((3, 1) if uniform else (0, 0)), f"{name} {fixed}: {_regions(gm)}"


@pytest.mark.parametrize("mode, expected", [("off", (0, 0)), ("on", (3, 1)), ("auto", (3, 1))])
def test_layer_regions_setting(monkeypatch, mode, expected):
    monkeypatch.setattr(llama, "LAYER_REGIONS", mode)
    gm, _ = _traced_step("tova", {})
    assert _regions(gm) == expected
    assert llama.layer_regions_on(torch.device("cuda")) == (mode == "on")


def test_bad_layer_regions_setting(monkeypatch):
    monkeypatch.setattr(llama, "LAYER_REGIONS", "yes")
    with pytest.raises(ValueError, match="LAYER_REGIONS must be one of"):
        llama.layer_regions_on(torch.device("cpu"))
