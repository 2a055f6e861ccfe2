"""Serving: `Engine` (continuous batching over static request slots, one compiled decode step)
and, in `flexkv.serve.api` (run by `flexkv.serve.server`), the OpenAI-compatible HTTP server
(needs the `serve` extra)."""
from flexkv.serve.engine import Engine, parse_bytes
from flexkv.serve.request import QueueFull, RequestHandle, SamplingParams

__all__ = ["Engine", "SamplingParams", "RequestHandle", "QueueFull", "parse_bytes"]
