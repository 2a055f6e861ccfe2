"""The `flexkv` command line: `generate`, `demo`, `serve`, `bench quality|speed`.

Run `flexkv <command> --help` for the options. Bad input ends with a one-line `error: ...` on
stderr and exit status 2 (no traceback; set FLEXKV_DEBUG=1 to see one).
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import random
import sys
import time
from pathlib import Path

from flexkv.models.provision import DEFAULT_MODEL

DEMO_POLICIES = ("streaming", "h2o", "snapkv", "weightedkv", "h2o+vam")
DTYPES = ("float32", "bfloat16", "float16")


class CLIError(Exception):
    """A user error found by the CLI itself (printed as `error: ...`, exit status 2)."""


# --------------------------------------------------------------------------- helpers
def _param(text: str):
    """`name=value` -> (name, value) with value parsed as bool/None/int/float/str."""
    name, sep, raw = text.partition("=")
    name = name.strip()
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected name=value (e.g. recent=64), got {text!r}")
    low = raw.strip().lower()
    if low in ("true", "false"):
        return name, low == "true"
    if low in ("none", "null"):
        return name, None
    for conv in (int, float):
        try:
            return name, conv(raw)
        except ValueError:
            pass
    return name, raw


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v}")
    return v


def _positive_seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not v > 0:      # (NaN fails this too; "inf" is no bound)
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0 (inf: no bound), got {text!r}")
    return v


def _device(name: str | None) -> str:
    import torch

    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise CLIError(f"--device must be a torch device like cpu, cuda or cuda:0, got {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return name


def _dtype(name: str):
    import torch

    return getattr(torch, name)


def _check_policy(policy: str, budget, params: dict) -> None:
    """Fail fast (before loading a model) on an unknown policy or parameter."""
    from flexkv.policies import make_policy

    make_policy(policy, budget=budget, **params).validate_prefill_only()


def _default_budget(policy: str, budget):
    return None if policy == "full" else budget


def _eos_ids(tokenizer, model) -> list[int]:
    from flexkv.generate import stop_token_ids
    return stop_token_ids(tokenizer, model)


def _torchrun_world() -> int:
    """The number of processes torchrun started (1 when not under torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _init_process(device: str) -> bool:
    """Before a model loads: glibc's malloc settings on CPU (`flexkv.malloc`: the prefill's
    large temporaries keep their pages), and under torchrun the process group (gloo on CPU,
    NCCL on CUDA). Returns whether this is tensor parallel."""
    from flexkv.distributed import init_from_env
    from flexkv.malloc import tune_for_cli

    tune_for_cli(device)
    return init_from_env(device)


def _load(model_name: str, device: str, dtype: str):
    """Under `torchrun --nproc-per-node N` (N > 1): tensor parallel over N ranks (the process
    group is initialised here: gloo on CPU, NCCL on CUDA), each rank loading its shard."""
    import flexkv

    tp = _init_process(device)
    t0 = time.perf_counter()
    where = f", tensor parallel over {_torchrun_world()} ranks" if tp else ""
    print(f"[flexkv] loading {model_name} ({device}, {dtype}{where}) ...", file=sys.stderr,
          flush=True)
    model, tok = flexkv.load_model(model_name, device=device, dtype=_dtype(dtype), tp=tp)
    if tok is None:
        raise CLIError(f"--model {model_name}: the checkpoint has no tokenizer "
                       "(tokenizer.json or tokenizer.model)")
    print(f"[flexkv] loaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return model, tok


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


class TextStreamer:
    """Incremental detokenization for one sequence: each new token re-decodes the tokens since the
    last line break and writes the new suffix (so multi-token characters and merges print right).
    Tokens after an eos are ignored."""

    def __init__(self, tokenizer, eos_ids=(), out=None):
        self.tok = tokenizer
        self.eos = set(eos_ids)
        self.out = out or sys.stdout
        self.ids: list[int] = []
        self.printed = 0
        self.stopped = False
        self.count = 0

    def __call__(self, tokens) -> None:
        if self.stopped:
            return
        t = int(tokens.reshape(-1)[0])
        if t in self.eos:
            self.stopped = True
            return
        self.count += 1
        self.ids.append(t)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):        # an incomplete multi-byte character: wait for more
            return
        self.out.write(text[self.printed:])
        self.out.flush()
        if text.endswith("\n"):            # start afresh: keeps each decode short
            self.ids, self.printed = [], 0
        else:
            self.printed = len(text)

    def finish(self) -> None:
        if self.ids:
            text = self.tok.decode(self.ids, skip_special_tokens=True)
            self.out.write(text[self.printed:])
        self.out.write("\n")
        self.out.flush()


# --------------------------------------------------------------------------- generate
def cmd_generate(args) -> int:
    import torch

    import flexkv

    params = dict(args.param or [])
    budget = args.budget
    _check_policy(args.policy, budget, params)
    if not args.prompt.strip():
        raise CLIError("--prompt must be a non-empty text")
    device = _device(args.device)
    model, tok = _load(args.model, device, args.dtype)

    if args.chat:
        if not getattr(tok, "chat_template", None):
            raise CLIError(f"--chat: the tokenizer of {args.model} has no chat template")
        text = tok.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                       add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tok(args.prompt)["input_ids"]
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    gen = None
    if args.seed is not None:
        gen = torch.Generator(device=device).manual_seed(args.seed)
    eos = _eos_ids(tok, model)
    streamer = TextStreamer(tok, eos)
    out = flexkv.generate(model, input_ids, max_new_tokens=args.max_new_tokens, policy=args.policy,
                          budget=budget, compile=args.compile, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, eos_token_id=eos or None,
                          prefill_chunk=args.prefill_chunk, generator=gen, callback=streamer,
                          **params)
    streamer.finish()
    retained = out.cache.retained().float().mean().item()
    per_rank = " per rank" if _torchrun_world() > 1 else ""
    print(f"[flexkv] policy {args.policy}, budget {budget}: prompt {out.prompt_len} tokens, "
          f"generated {streamer.count} tokens; prefill {out.prefill_s:.2f} s, "
          f"decode {_fmt_rate(out.decode_tok_s)} tok/s; KV held {_mib(out.cache.kv_bytes())}"
          f"{per_rank}, {retained:.0f} tokens/head retained", file=sys.stderr)
    return 0


def _fmt_rate(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.1f}"


# --------------------------------------------------------------------------- demo
def _demo_policies(text: str | None) -> list[str]:
    from flexkv.policies import available

    if text is None:
        names = set(available())
        return ["full"] + [p for p in DEMO_POLICIES if p.split("+")[0] in names
                           and all(f"<policy>+{m}" in names for m in p.split("+")[1:])]
    pols = [p.strip() for p in text.split(",") if p.strip()]
    if not pols:
        raise CLIError("--policies must list at least one policy, e.g. full,h2o")
    return pols


def _table(rows: list[list[str]], header: list[str]) -> str:
    cols = list(zip(header, *rows))
    w = [max(len(c) for c in col) for col in cols]
    line = lambda r: "  ".join(c.rjust(w[i]) if i else c.ljust(w[i]) for i, c in enumerate(r))
    return "\n".join([line(header), "  ".join("-" * x for x in w)] + [line(r) for r in rows])


def smallest_budgets(still_answers, answered: dict, floor: int) -> dict:
    """{policy: (smallest budget that still answers, KV bytes held there)}: from each policy's
    (budget, bytes) that answered, the budget is halved while `still_answers(policy, budget)`
    returns (True, bytes) and the budget stays >= floor."""
    out = {}
    for p, (budget, nbytes) in answered.items():
        while budget // 2 >= floor:
            ok, b_bytes = still_answers(p, budget // 2)
            if not ok:
                break
            budget, nbytes = budget // 2, b_bytes
        out[p] = (budget, nbytes)
    return out


def tradeoff_line(smallest: dict, full_bytes, budget: int, floor: int) -> str:
    """The demo's last line: the smallest budget at which the best policy still answers, next to
    the memory it saves against the full cache."""
    if not smallest:
        return (f"trade-off: no compressing policy answered at budget {budget}; try a larger "
                "--budget")
    ranked = sorted(smallest.items(), key=lambda kv: (kv[1][0], kv[1][1], kv[0]))
    parts = []
    for p, (b, nbytes) in ranked:
        saved = "" if not full_bytes else f", {100 * (1 - nbytes / full_bytes):.1f} % less than full"
        parts.append(f"{p} at {b} ({_mib(nbytes)}{saved})")
    best_p, (best_b, _) = ranked[0]
    return (f"trade-off: smallest budget that still answers (halving from {budget}, floor "
            f"{floor}; full cache {_mib(full_bytes) if full_bytes else 'not run'}): "
            f"best {best_p} at {best_b} tokens/head; " + "; ".join(parts))


def cmd_demo(args) -> int:

    import flexkv
    from flexkv.passkey import build_passkey_prompt, extract_answer, random_key

    t_start = time.perf_counter()
    pols = _demo_policies(args.policies)
    for p in pols:
        _check_policy(p, _default_budget(p, args.budget), {})
    if not (0.0 <= args.depth <= 1.0):
        raise CLIError(f"--depth must be in [0, 1], got {args.depth}")
    device = _device(args.device)
    compile_ = device.startswith("cuda") if args.compile is None else args.compile
    model, tok = _load(args.model, device, args.dtype)

    key = random_key(random.Random(args.seed))
    chat = args.chat
    if chat and not getattr(tok, "chat_template", None):
        raise CLIError(f"--chat: the tokenizer of {args.model} has no chat template")
    input_ids, answer = build_passkey_prompt(tok, args.length, args.depth, key, chat=chat)
    input_ids = input_ids.to(device)
    T = input_ids.shape[1]
    print(f"[flexkv] passkey prompt: {T} tokens, key hidden at depth {args.depth:g}"
          f"{', chat template' if chat else ', plain prompt'}; compile={compile_}",
          file=sys.stderr, flush=True)
    eos = _eos_ids(tok, model)

    def run(p, budget, quiet=False):
        if not quiet:
            print(f"[flexkv] running {p} ...", end="", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        out = flexkv.generate(model, input_ids, max_new_tokens=args.max_new_tokens, policy=p,
                              budget=budget, compile=compile_, eos_token_id=eos or None)
        if not quiet:
            print(f" {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        text = tok.decode(out.tokens[0, T:].tolist(), skip_special_tokens=True)
        return out, text, extract_answer(text) == answer

    rows, answered, kv = [], {}, {}
    for p in pols:
        budget = _default_budget(p, args.budget)
        out, text, ok = run(p, budget)
        got = extract_answer(text)
        retained = out.cache.retained().float().mean().item()
        kv[p] = out.cache.kv_bytes()
        if ok and budget is not None:
            answered[p] = (budget, kv[p])
        rows.append([p, "-" if budget is None else str(budget), got or repr(text.strip()[:12]),
                     "yes" if ok else "no", str(T), _mib(kv[p]),
                     f"{retained:.0f}", f"{out.prefill_s:.2f}", _fmt_rate(out.decode_tok_s)])
    print(f"passkey retrieval, {args.model}, {T}-token prompt, depth {args.depth:g}, "
          f"device {device}, dtype {args.dtype}")
    print(f"expected key: {answer}")
    print(_table(rows, ["policy", "budget", "answer", "correct", "prompt tok", "KV held",
                        "retained/head", "prefill s", "decode tok/s"]))
    if args.sweep:
        def still_answers(p, budget):
            print(f"[flexkv] sweep: {p} at budget {budget} ...", end="", file=sys.stderr, flush=True)
            out, _, ok = run(p, budget, quiet=True)
            print(" answers" if ok else " fails", file=sys.stderr, flush=True)
            return ok, out.cache.kv_bytes()

        smallest = smallest_budgets(still_answers, answered, args.sweep_floor)
        print(tradeoff_line(smallest, kv.get("full"), args.budget, args.sweep_floor))
    print(f"total {time.perf_counter() - t_start:.1f} s")
    return 0


# --------------------------------------------------------------------------- serve
def _port(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port in [0, 65535] (0 = any free port), got {v}")
    return v


def cmd_serve(args) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise CLIError(f"flexkv serve needs FastAPI and uvicorn ({e.name} is missing): "
                       "pip install 'flexkv[serve]'") from None
    from flexkv.serve.penalties import MAX_MASK_SECONDS
    from flexkv.serve.server import bind_socket, serve

    params = dict(args.param or [])
    budget = args.budget if args.budget is not None else (None if args.policy == "full" else 256)
    _check_policy(args.policy, budget, params)
    from flexkv.serve import parse_bytes
    if args.kv_memory is not None:
        parse_bytes(args.kv_memory)
    if args.prefix_cache_memory is not None:
        parse_bytes(args.prefix_cache_memory, "--prefix-cache-memory")
    api_key = args.api_key if args.api_key is not None else os.environ.get("FLEXKV_API_KEY")
    if api_key is not None and not api_key.strip():
        raise CLIError("--api-key (or FLEXKV_API_KEY) is empty: give a key, or leave both unset "
                       "for a server without one")
    mask_seconds = MAX_MASK_SECONDS if args.max_mask_seconds is None else args.max_mask_seconds
    device = _device(args.device)
    sock = None
    if os.environ.get("RANK", "0") == "0":  # under torchrun rank 0 listens, the others follow it
        try:      # bind first: a taken port is an error now, not after loading the model
            sock = bind_socket(args.host, args.port)
        except OSError as e:
            raise CLIError(f"--host/--port: cannot listen on {args.host}:{args.port}: "
                           f"{e.strerror or e}") from None
    tp = _init_process(device)
    if tp and args.prefix_cache_memory is not None:
        raise CLIError("--prefix-cache-memory is not supported under tensor parallelism (torchrun)")
    serve(args.model, policy=args.policy, budget=budget, max_slots=args.max_slots,
          kv_memory=args.kv_memory, max_new_tokens=args.max_new_tokens,
          max_prompt_tokens=args.max_prompt_tokens, prefill_chunk=args.prefill_chunk,
          max_waiting=args.max_waiting, host=args.host, port=args.port, device=device,
          dtype=args.dtype, compile=args.compile, compile_prefill=args.compile_prefill,
          prefix_cache_memory=args.prefix_cache_memory, served_model_name=args.served_model_name,
          sock=sock, tp=tp, api_key=api_key, max_mask_seconds=mask_seconds, **params)
    return 0


# --------------------------------------------------------------------------- bench
BENCHMARKS = ("quality", "speed", "serve", "tp_speed", "prefill_cpu", "cold_prefill",
              "cpu_decode")  # bench/<name>.py


def bench_dir() -> Path | None:
    """The source checkout's bench/ directory (next to the flexkv package), if present."""
    d = Path(__file__).resolve().parent.parent / "bench"
    return d if d.is_dir() else None


def cmd_bench(args) -> int:
    d = bench_dir()
    path = d / f"{args.which}.py" if d else None
    if path is None or not path.is_file():
        raise CLIError(f"bench {args.which}: the benchmarks live in the source checkout's bench/ "
                       f"directory (bench/{args.which}.py not found"
                       f"{'' if d is None else ' in ' + str(d)}); run from a clone of the repo "
                       "installed with `pip install -e .`")
    if str(d) not in sys.path:
        sys.path.insert(0, str(d))
    spec = importlib.util.spec_from_file_location(f"flexkv_bench_{args.which}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    if not hasattr(mod, "main"):
        raise CLIError(f"bench {args.which}: {path} has no main(argv)")
    try:
        rc = mod.main(list(args.args))
    except SystemExit as e:           # the benchmark's own argparse (--help, bad arguments)
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return rc if isinstance(rc, int) else 0


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from flexkv import __version__

    p = argparse.ArgumentParser(prog="flexkv", description="KV-cache compression for LLaMA/"
                                "Mistral models: generate, run the passkey demo, run benchmarks.")
    p.add_argument("--version", action="version", version=f"flexkv {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def common(sp, model_default):
        sp.add_argument("--model", default=model_default,
                        help="known model name, local HF checkpoint dir, or a Hugging Face repo "
                        f"id already in the local HF cache (default: {model_default})")
        sp.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda if "
                        "available, else cpu)")
        sp.add_argument("--dtype", default="float32", choices=DTYPES)

    g = sub.add_parser("generate", help="generate text from a prompt, streamed to stdout",
                       description="Generate from --prompt under a KV policy; the text streams to "
                       "stdout, statistics go to stderr.")
    common(g, DEFAULT_MODEL)
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    g.add_argument("--policy", default="full", help="KV policy (flexkv.policies.available())")
    g.add_argument("--budget", type=int, default=None, help="tokens kept per head (not for full)")
    g.add_argument("--param", action="append", type=_param, metavar="NAME=VALUE",
                   help="extra policy parameter, repeatable (e.g. --param recent=64)")
    g.add_argument("--max-new-tokens", type=_positive_int, default=256)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=None, help="sampling seed")
    g.add_argument("--prefill-chunk", type=int, default=None,
                   help="prefill this many tokens at a time (compressing between chunks)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="compile the decode step (slow first call; CUDA graphs on CUDA)")
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("demo", help="passkey retrieval under each policy, as a table",
                       description="Hide a random 5-digit key in a long prompt and ask the default "
                       "model for it under each policy; prints a table of answers, memory and speed.")
    common(d, DEFAULT_MODEL)
    d.add_argument("--policies", default=None,
                   help="comma-separated (default: full,streaming,h2o,snapkv,weightedkv,h2o+vam)")
    d.add_argument("--budget", type=_positive_int, default=256,
                   help="budget for the compressing policies (default 256)")
    d.add_argument("--length", type=_positive_int, default=4096, help="prompt tokens (default 4096)")
    d.add_argument("--depth", type=float, default=0.5, help="needle depth in [0, 1] (default 0.5)")
    d.add_argument("--max-new-tokens", type=_positive_int, default=8)
    d.add_argument("--seed", type=int, default=0, help="seed of the random key (default 0)")
    d.add_argument("--chat", action=argparse.BooleanOptionalAction, default=False,
                   help="wrap the passkey prompt in the chat template (default: plain text, "
                   "which SmolLM2-135M-Instruct answers far more reliably)")
    d.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compile the decode step (default: on CUDA only)")
    d.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True,
                   help="halve each answering policy's budget while it still answers and print "
                   "the smallest budget with the memory it saves (default on)")
    d.add_argument("--sweep-floor", type=_positive_int, default=16,
                   help="smallest budget the sweep tries (default 16)")
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (continuous batching)",
                       description="Serve the model over HTTP (FastAPI + uvicorn): POST "
                       "/v1/completions and /v1/chat/completions (stream or not), GET /v1/models, "
                       "/health, /metrics. Needs the serve extra: pip install 'flexkv[serve]'.")
    common(s, DEFAULT_MODEL)
    s.add_argument("--served-model-name", default=None,
                   help="the model id clients use (default: the --model argument)")
    s.add_argument("--policy", default="h2o", help="KV policy (default h2o)")
    s.add_argument("--budget", type=_positive_int, default=None,
                   help="tokens kept per head (default 256; none for full)")
    s.add_argument("--param", action="append", type=_param, metavar="NAME=VALUE",
                   help="extra policy parameter, repeatable (e.g. --param recent=64)")
    slots = s.add_mutually_exclusive_group()
    slots.add_argument("--max-slots", type=_positive_int, default=None,
                       help="concurrent requests (cache rows; default 8)")
    slots.add_argument("--kv-memory", default=None, metavar="SIZE",
                       help="size the slots by KV memory instead, e.g. 2GiB")
    s.add_argument("--max-new-tokens", type=_positive_int, default=512,
                   help="the largest max_tokens a request may ask for (default 512)")
    s.add_argument("--max-prompt-tokens", type=_positive_int, default=None,
                   help="longest prompt accepted (default: the model's context minus "
                   "--max-new-tokens)")
    s.add_argument("--prefill-chunk", type=_positive_int, default=512,
                   help="prompt tokens prefilled per scheduler step (default 512)")
    s.add_argument("--prefix-cache-memory", default=None, metavar="SIZE",
                   help="keep prefill states of chunk-aligned prompt prefixes in this much memory "
                   "(e.g. 1GiB), so prompts that begin alike (a system prompt, a document, a "
                   "chat's earlier turns) skip those chunks; default off")
    s.add_argument("--max-waiting", type=_positive_int, default=64,
                   help="requests that may wait for a slot; more get 429 (default 64)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=_port, default=8000, help="port (default 8000; 0 = any free)")
    s.add_argument("--api-key", default=None, metavar="KEY",
                   help="requests to /v1, /tokenize and /detokenize need 'Authorization: "
                   "Bearer KEY' (the openai client's api_key), else 401; default: the "
                   "FLEXKV_API_KEY environment variable, else no key (/health and /metrics stay "
                   "open)")
    s.add_argument("--max-mask-seconds", type=_positive_seconds, default=None, metavar="S",
                   help="the engine's time one structured-output request (response_format, "
                   "tools) may take for its token masks in all; past it the request ends with a "
                   "400 (schema_too_costly), as every other request waits on that thread "
                   "(default 10; inf: no bound)")
    s.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compile the decode step (default: the engine's choice)")
    s.add_argument("--compile-prefill", action=argparse.BooleanOptionalAction, default=False,
                   help="compile the prefill chunk too (one chunk shape, the last chunk padded; "
                   "fewer, fused kernels where eager prefill is host-bound, e.g. a small model "
                   "on a GPU; default off)")
    s.set_defaults(func=cmd_serve)

    b = sub.add_parser("bench", help="run a benchmark of bench/ (source checkout)",
                       description="Dispatch to the benchmarks in the source checkout's bench/ "
                       "directory; the remaining arguments go to the benchmark.")
    b.add_argument("which", choices=list(BENCHMARKS))
    b.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv=None) -> int:
    """Entry point of `flexkv` / `python -m flexkv`. Returns the exit status. Under torchrun
    only rank 0 prints (the other ranks' output would repeat it); another rank's crash still
    shows its traceback; a rank that finishes exits here (`flexkv.distributed.end_rank`)."""
    if _torchrun_world() <= 1:
        return _main(argv)
    from flexkv.distributed import destroy_group, end_rank

    quiet = os.environ.get("RANK", "0") != "0"
    out, err = sys.stdout, sys.stderr
    if quiet:
        sys.stdout = sys.stderr = open(os.devnull, "w")
    try:
        status = _main(argv)
    except BaseException:  # printed after this, to the real stderr
        sys.stdout, sys.stderr = out, err
        destroy_group()
        raise
    sys.stdout, sys.stderr = out, err
    end_rank(int(status or 0))


def _main(argv=None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"] and len(argv) > 2 and argv[1] in BENCHMARKS:
        # everything after the benchmark's name belongs to it (even --help)
        args = argparse.Namespace(which=argv[1], args=argv[2:], func=cmd_bench)
    else:
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:       # argparse already printed usage + error (or --help)
            return e.code if isinstance(e.code, int) else 2
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.func(args)
    except (CLIError, ValueError) as e:
        if os.environ.get("FLEXKV_DEBUG"):
            raise
        sys.stdout.flush()
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except RuntimeError as e:         # e.g. a failed download of the default model
        if os.environ.get("FLEXKV_DEBUG"):
            raise
        sys.stdout.flush()
        print(f"error: {' '.join(str(e).split())} (FLEXKV_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
