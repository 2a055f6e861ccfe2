"""The compiled decode step writes the cache in place: no temporary the size of a layer's K or V
in inductor's generated code. Writing one slot per head with `scatter_` made inductor copy the
whole buffer out and back every step (it does not reinplace `scatter`): two extra passes over
the K/V cache per layer and step, which on a GPU is bandwidth the decode step exists to save.
`LayerCache.put` (an `index_put_`) is written in place (bench/NOTES.md, session 14)."""
from __future__ import annotations

import pytest

import flexkv.models.llama as llama
from helpers import kv_sized_temporaries


@pytest.mark.slow
@pytest.mark.parametrize("name, params, regions", [
    ("full", {}, "off"),                            # write only, layers unrolled
    ("streaming", dict(budget=12, n_sink=2), "on"),  # write and evict, in layer regions
    ("h2o+vam", dict(budget=12, recent=3), "on"),   # + vam rewrites the new token's value
])
def test_no_full_size_cache_temporary(monkeypatch, name, params, regions):
    monkeypatch.setattr(llama, "LAYER_REGIONS", regions)
    assert kv_sized_temporaries(name, params) == [], f"{name}: a copy of a K/V buffer"
