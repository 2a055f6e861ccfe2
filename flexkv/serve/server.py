"""Running the HTTP server: `serve(...)` loads a model, builds the engine and the app
(`flexkv.serve.api.build_app`) and runs uvicorn until interrupted (what `flexkv serve` calls);
`BackgroundServer` runs an app in a thread on a free loopback port (tests, benchmarks,
notebooks); `bind_socket` binds before the model loads, so a taken port is an error at once."""
from __future__ import annotations

import socket
import sys
import threading
import time

import uvicorn

from flexkv.models.provision import DEFAULT_MODEL
from flexkv.serve.api import build_app
from flexkv.serve.penalties import MAX_MASK_SECONDS


def bind_socket(host: str, port: int) -> socket.socket:
    """A bound (not yet listening) TCP socket for uvicorn; OSError if the address is unusable.
    Binding before the model loads turns a taken port into an error at once."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, type_, proto, _, addr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class BackgroundServer:
    """Context manager: uvicorn serving `app` in a daemon thread on `host`:<a free port> (tests,
    benchmarks, notebooks). `url` is set once constructed; entering waits until it accepts."""

    def __init__(self, app, host: str = "127.0.0.1", start_timeout_s: float = 120.0,
                 shutdown_timeout_s: float = 30.0):
        self.sock = bind_socket(host, 0)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.start_timeout_s, self.shutdown_timeout_s = start_timeout_s, shutdown_timeout_s
        cfg = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=3)
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("uvicorn stopped before it started (see its log above)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start in {self.start_timeout_s:g} s")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(self.shutdown_timeout_s)
        self.sock.close()


def serve(model: str = DEFAULT_MODEL, *, policy: str = "h2o", budget: int | None = 256,
          max_slots: int | None = None, kv_memory: str | int | None = None, max_new_tokens: int = 512,
          max_prompt_tokens: int | None = None, prefill_chunk: int = 512, max_waiting: int = 64,
          host: str = "127.0.0.1", port: int = 8000, device: str = "cpu", dtype: str = "float32",
          compile: bool | None = None, compile_prefill: bool = False,
          prefix_cache_memory: str | int | None = None, served_model_name: str | None = None,
          log_level: str = "info",
          sock: socket.socket | None = None, tp: bool = False, api_key: str | None = None,
          max_mask_seconds: float = MAX_MASK_SECONDS, **policy_params) -> None:
    """Load `model` (a known name, provisioned on first use as `flexkv demo` does, or a local HF
    checkpoint dir), build the engine and the app, and serve it with uvicorn until interrupted.
    With `api_key`, requests to the API (`/v1`, `/tokenize`, `/detokenize`) need
    `Authorization: Bearer <api_key>`. `max_mask_seconds`: the engine's time one structured-output
    request may take for its token masks (`Engine`).

    `tp=True` (every rank of an initialised process group calls this, e.g. under torchrun):
    each rank loads its shard and builds the same engine; rank 0 listens and schedules, the
    other ranks follow its plans (`Engine.follow`) until rank 0 shuts down."""
    import torch

    import flexkv
    from flexkv.distributed import shard_of
    from flexkv.serve import Engine

    t0 = time.perf_counter()
    print(f"[flexkv] loading {model} ({device}, {dtype}) ...", file=sys.stderr, flush=True)
    m, tok = flexkv.load_model(model, device=device, dtype=getattr(torch, dtype), tp=tp)
    if tok is None:
        raise ValueError(f"model {model}: the checkpoint has no tokenizer (tokenizer.json or "
                         "tokenizer.model)")
    print(f"[flexkv] loaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    slots = {"kv_memory": kv_memory} if kv_memory is not None else {"max_slots": max_slots or 8}
    engine = Engine(m, tok, policy=policy, budget=budget, max_new_tokens=max_new_tokens,
                    prefill_chunk=prefill_chunk, max_prompt_tokens=max_prompt_tokens,
                    max_waiting=max_waiting, compile=compile, compile_prefill=compile_prefill,
                    prefix_cache_memory=prefix_cache_memory, max_mask_seconds=max_mask_seconds,
                    **slots, **policy_params)
    shard = shard_of(m)
    if shard.rank != 0:
        engine.follow()
        return
    if sock is None:
        sock = bind_socket(host, port)
    name = served_model_name or model
    where = f", tensor parallel over {shard.world} ranks" if shard.active else ""
    app = build_app(engine, name, api_key=api_key)
    h, p = sock.getsockname()[:2]
    shown = f"[{h}]" if ":" in h else h
    print(f"[flexkv] serving {name} at http://{shown}:{p}/v1 (policy {policy}, budget {budget}, "
          f"{engine.max_slots} slots, up to {max_waiting} waiting{where}"
          f"{'; the API needs the --api-key' if api_key else ''}; Ctrl-C stops)", file=sys.stderr,
          flush=True)
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
