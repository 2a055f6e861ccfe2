"""The serving engine's prefix cache (`Engine(prefix_cache_memory=)`, `flexkv serve
--prefix-cache-memory`): prefill states after chunk-aligned prompt prefixes, kept so that a later
prompt that begins with the same tokens skips those chunks."""
from __future__ import annotations

from collections import OrderedDict

from flexkv.cache import KVCache


class PrefixCache:
    """Prefill states kept for later prompts that begin with the same tokens (a long system
    prompt, a shared document, the earlier turns of a chat), within `limit` bytes, least
    recently used first out.

    An entry is the state a prefill left after a chunk that was not its prompt's last (its
    one-row cache's `snapshot_row`: each layer's slots up to its last held one), with the tokens
    it holds (a multiple of the chunk length) and the policy's
    `prefix_key` of the request that made it: a request with an equal key whose prompt begins
    with those tokens holds exactly that cache at that point of its own prefill (the policy's
    contract, tests/test_prefix_cache.py), so it resumes there and gives the tokens it would
    have given from scratch."""

    def __init__(self, limit: int):
        self.limit, self.bytes = limit, 0
        self.entries: OrderedDict[tuple, tuple[tuple, list, int]] = OrderedDict()

    @staticmethod
    def _key(policy_key: tuple, tokens: tuple) -> tuple:
        return (policy_key, len(tokens), hash(tokens))

    def longest(self, prompt: list[int], chunk: int, policy_key: tuple) -> tuple[int, list] | None:
        """The longest kept prefix of `prompt` (chunk-aligned, shorter than the prompt) under
        `policy_key`: (its length, its cache's `snapshot_row`), or None."""
        for end in range((len(prompt) - 1) // chunk * chunk, 0, -chunk):
            tokens = tuple(prompt[:end])
            key = self._key(policy_key, tokens)
            hit = self.entries.get(key)
            if hit is not None and hit[0] == tokens:
                self.entries.move_to_end(key)
                return end, hit[1]
        return None

    def keep(self, prompt: list[int], end: int, policy_key: tuple, cache: KVCache) -> None:
        """Keep `cache`'s state (its one row), the state after `prompt[:end]`, unless it is
        kept already."""
        tokens = tuple(prompt[:end])
        key = self._key(policy_key, tokens)
        if key in self.entries and self.entries[key][0] == tokens:
            self.entries.move_to_end(key)
            return
        snap = cache.snapshot_row(0)
        size = sum(t.numel() * t.element_size() for layer in snap for t in layer.values())
        if size > self.limit:
            return
        while self.bytes + size > self.limit:
            _, (_, _, gone) = self.entries.popitem(last=False)
            self.bytes -= gone
        self.entries[key] = (tokens, snap, size)   # (a colliding key is replaced)
        self.bytes = sum(e[2] for e in self.entries.values())
