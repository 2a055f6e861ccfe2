"""The compiled decode step writes the cache in place: no temporary the size of a layer's K or V
in inductor's generated code. Writing one slot per head with `scatter_` made inductor copy the
whole buffer out and back every step (it does not reinplace `scatter`): two extra passes over
the K/V cache per layer and step, which on a GPU is bandwidth the decode step exists to save.
`LayerCache.put` (an `index_put_`) is written in place (bench/NOTES.md, session 14)."""
from __future__ import annotations

import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import flexkv.models.llama as llama
from flexkv.generate import decode_one_token
from helpers import decode_step_args


def _generated_code(name: str, **params) -> tuple[str, tuple[int, ...]]:
    """Inductor's code for one compiled decode step of policy `name` on a 2-layer fp32 model
    -> (all generated source, the shape of a layer's K buffer)."""
    args = decode_step_args(name, params, 2, torch.float32)
    torch._dynamo.reset()
    step = torch.compile(decode_one_token, fullgraph=True, dynamic=False)
    with torch.no_grad():
        _, code = run_and_get_code(step, *args)
    return "\n".join(code), tuple(args[1].layers[0].k.shape)


@pytest.mark.slow
@pytest.mark.parametrize("name, params, regions", [
    ("full", {}, "off"),                            # write only, layers unrolled
    ("streaming", dict(budget=12, n_sink=2), "on"),  # write and evict, in layer regions
    ("h2o+vam", dict(budget=12, recent=3), "on"),   # + vam rewrites the new token's value
])
def test_no_full_size_cache_temporary(monkeypatch, name, params, regions):
    monkeypatch.setattr(llama, "LAYER_REGIONS", regions)
    code, shape = _generated_code(name, **params)
    assert "empty_strided" in code  # the check below reads inductor's buffer allocations
    full = re.compile(r"empty_strided_\w+\(\(" + ", ".join(map(str, shape)) + r"\)")
    assert not full.search(code), f"{name}: a temporary of the K/V shape {shape} (a copy)"
