"""The compiled decode step writes the cache in place: no temporary the size of a layer's K or V
in inductor's generated code. Writing one slot per head with `scatter_` made inductor copy the
whole buffer out and back every step (it does not reinplace `scatter`): two extra passes over
the K/V cache per layer and step, which on a GPU is bandwidth the decode step exists to save.
`LayerCache.put` (an `index_put_`) is written in place (bench/NOTES.md, session 14), provided
nothing reads the buffer's old value after the write (`decode_compile_options`, session 15)."""
from __future__ import annotations

import pytest

import flexkv.models.llama as llama
from helpers import kv_sized_ops, kv_sized_temporaries


@pytest.mark.slow
@pytest.mark.parametrize("name, params, regions", [
    ("streaming", dict(budget=12, n_sink=2), "on"),  # write and evict, in layer regions
    ("h2o+vam", dict(budget=12, recent=3), "on"),   # + vam rewrites the new token's value
    # a merge into a kept token's value after attention, which only o_proj reads (inductor's
    # reorder_for_locality, off in `decode_compile_options`, would move P @ V after it)
    ("weightedkv", dict(budget=12, window=4, bias="log_mass"), "off"),
])
def test_no_full_size_cache_temporary(monkeypatch, name, params, regions):
    monkeypatch.setattr(llama, "LAYER_REGIONS", regions)
    assert kv_sized_temporaries(name, params) == [], f"{name}: a copy of a K/V buffer"


@pytest.mark.parametrize("name, params", [
    ("streaming", dict(budget=12, n_sink=2)),
    ("tova", dict(budget=12)),
    ("weightedkv", dict(budget=12, window=4, bias="log_mass")),
    ("cam", dict(budget=12, n_sink=2, merge_tokens=3)),   # merges into 3 receivers per step
    ("cam", dict(budget=12, n_sink=2, merge_tokens=3, denominator="max", bias="log_mass")),
    ("h2o+vam", dict(budget=12, recent=3)),
])
def test_no_whole_cache_operation(monkeypatch, name, params):
    """A decode step touches a few slots of K and V besides attention's read: no op over a
    whole K/V buffer (cam's merge once added a masked update to every slot of V)."""
    monkeypatch.setattr(llama, "LAYER_REGIONS", "off")
    assert kv_sized_ops(name, params) == {}, f"{name}: an op over the whole of K or V"
