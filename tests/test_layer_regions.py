"""The compiled decode step's layer regions (`flexkv.models.llama.LAYER_REGIONS`): each decoder
layer is a nested compile region, traced once and stamped out for every later layer, wherever all
layers' caches have the same buffers; per-layer capacities stay unrolled. What the step computes
with them is checked by the compiled property tests (tests/test_policies.py, three-layer models);
these tests check the structure of the traced graph (dynamo only, no inductor: fast)."""
from __future__ import annotations

import pytest
import torch

import flexkv.models.llama as llama
from flexkv.generate import decode_one_token, prefill
from flexkv.policies.registry import make_policy
from flexkv.testing import simplest, tiny_model
from policy_cases import CASES, COMPILED

T, NEW = 24, 8


def _traced_step(name: str, fixed: dict, n_layers: int = 3):
    """Trace one compiled decode step of policy `name` (its compiled-test parameters) on an
    n-layer model after an eager prefill -> (the dynamo graph, the cache)."""
    model = tiny_model(n_layers, 4, 2, 16)
    kw = simplest(CASES[name], T)
    kw.update(fixed)
    if not name.startswith("full"):
        kw["budget"] = 12
    pol = make_policy(name, **kw)
    pol.validate(T, NEW, n_layers)
    cache = pol.build_cache(model, 2, T, NEW)
    ids = torch.randint(0, model.args.vocab_size, (2, T), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(T).expand(2, T)
    with torch.no_grad():
        tok = prefill(model, cache, pol, ids, pos, None, NEW).argmax(-1)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    step = torch.compile(decode_one_token, backend=capture, fullgraph=True, dynamic=False)
    with torch.no_grad():
        step(model, cache, pol, tok[:, None], pos[:, -1:] + 1, torch.ones(2, dtype=torch.bool))
    assert len(graphs) == 1
    return graphs[0], cache


def _regions(gm) -> tuple[int, int]:
    """(region calls, distinct region bodies) in a dynamo graph."""
    calls = [n for n in gm.graph.nodes
             if n.op == "call_function" and n.target is torch.ops.higher_order.invoke_subgraph]
    return len(calls), len({n.args[0].target for n in calls})


@pytest.mark.parametrize("name, fixed", COMPILED, ids=[f"{n}-{i}" for i, (n, _) in enumerate(COMPILED)])
def test_one_region_body_for_all_layers(name, fixed):
    gm, cache = _traced_step(name, fixed)
    calls, bodies = _regions(gm)
    if llama.uniform_layers(cache):
        assert (calls, bodies) == (3, 1), f"{name} {fixed}: {calls} region calls, {bodies} bodies"
    else:  # per-layer capacities (pyramidkv): the layers are unrolled
        assert (calls, bodies) == (0, 0)


def test_per_layer_capacities_are_unrolled():
    gm, cache = _traced_step("pyramidkv", dict(window=2, beta=4))
    assert not llama.uniform_layers(cache)
    assert _regions(gm) == (0, 0)


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
