"""What every quality suite shares: text sources, the cell cache, policy helpers, the runner that
holds the model and computes one cell, and the run's provenance (commit, device)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1]          # bench/
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))
from stamp import commit_id  # noqa: E402
RESULTS = BENCH / "results" / "quality"
DEFAULT_MODEL = "smollm2-135m-instruct"

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover - tqdm is a dependency of flexkv
    def tqdm(it=None, **_):
        return it


# =========================================================================== text sources
def pydoc_prose(no_digits: bool = False, min_chars: int = 160) -> str:
    """English prose that ships with Python: the prose paragraphs of `pydoc_data.topics` (the
    language reference's topics; code blocks, grammar, tables and headings dropped), in sorted
    topic order. `no_digits` drops paragraphs containing digits (a clean passkey haystack)."""
    from pydoc_data import topics

    paras = []
    for name in sorted(topics.topics):
        for block in re.split(r"\n\s*\n", topics.topics[name]):
            lines = block.split("\n")
            if not lines or any(ln.startswith((" ", "\t")) for ln in lines):
                continue                                  # indented: code, grammar, lists
            para = " ".join(ln.strip() for ln in lines).strip()
            if len(para) < min_chars or re.search(r"\*\*\*|===|---|\|", para):
                continue                                  # headings, tables
            if no_digits and re.search(r"\d", para):
                continue
            letters = sum(c.isalpha() or c == " " for c in para) / len(para)
            if letters < 0.85 or para[-1] not in ".:)\"":
                continue
            paras.append(para)
    return "\n\n".join(paras)


def prose_source() -> str:
    return (f"pydoc_data.topics (the Python {platform.python_version()} language reference "
            "topics that ship with Python), prose paragraphs only")


def haystack_filler(name: str, filler_file: Path | None):
    """(filler text or None for passkey's default, description)."""
    if name == "classic":
        return None, "classic repeated sentences (flexkv.passkey.DEFAULT_FILLER)"
    if name == "prose":
        return pydoc_prose(no_digits=True), prose_source() + ", paragraphs with digits dropped"
    if name == "file":
        if filler_file is None:
            raise ValueError("haystack 'file' needs --filler FILE")
        return filler_file.read_text(), f"file {filler_file.name}"
    raise ValueError(f"unknown haystack {name!r}; allowed: classic, prose, file")


def digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:12]


# =========================================================================== cell cache
class CellCache:
    """JSON lines, one cell per line: {"key": {...params...}, "result": {...}}. Later lines win."""

    def __init__(self, path: Path, fresh: bool = False):
        self.path = path
        self.cells: dict[str, dict] = {}
        self.hits = 0
        self.computed = 0
        if path.exists() and not fresh:
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                    self.cells[self.ident(rec["key"])] = rec["result"]
                except (ValueError, KeyError, TypeError):
                    continue                              # a torn last line of a killed run

    @staticmethod
    def ident(key: dict) -> str:
        return json.dumps(key, sort_keys=True, separators=(",", ":"))

    def get(self, key: dict):
        res = self.cells.get(self.ident(key))
        if res is not None:
            self.hits += 1
        return res

    def peek(self, key: dict):
        """Like get, without counting a cache hit."""
        return self.cells.get(self.ident(key))

    def put(self, key: dict, result: dict) -> None:
        self.cells[self.ident(key)] = result
        self.computed += 1
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps({"key": key, "result": result}, sort_keys=True) + "\n")
            f.flush()


# =========================================================================== policies
def policy_names(requested, vam_variants) -> tuple[list[str], list[str]]:
    """(policies to run, notes). Bases come from flexkv.policies.available() at run time."""
    from flexkv.policies import available, make_policy

    avail = available()
    bases = [a for a in avail if not a.startswith("<policy>+")]
    mods = [a.split("+", 1)[1] for a in avail if a.startswith("<policy>+")]
    notes = []
    if requested is None:
        pols = list(bases)
    else:
        pols = []
        for p in requested:
            base = p.split("+")[0]
            if base not in bases:
                notes.append(f"policy {p!r} skipped: not registered (available: {', '.join(bases)})")
                continue
            make_policy(p, budget=None if base == "full" else 64)   # unknown modifier -> error
            pols.append(p)
    if "full" in pols:
        pols.remove("full")
    pols.insert(0, "full")
    for b in vam_variants or []:
        if "vam" not in mods:
            notes.append("+vam variants skipped: the vam modifier is not registered")
            break
        if b in bases and f"{b}+vam" not in pols:
            pols.append(f"{b}+vam")
    return pols, notes


def budgetless(policy: str) -> bool:
    return policy.split("+")[0] == "full"


def resolved_params(policy: str, budget, params=None) -> dict | None:
    """Every parameter of the policy after its defaults (budget aside), for the cell cache keys:
    a changed default then never serves a cell computed under the old one. `prefill_only` enters
    only when set (off, it is what every cell cached before it existed computed)."""
    import dataclasses

    from flexkv.policies import make_policy

    try:
        pol = make_policy(policy, budget=None if budgetless(policy) else budget, **(params or {}))
    except ValueError:
        return None
    out = {}
    while pol is not None and dataclasses.is_dataclass(pol):
        names = [f.name for f in dataclasses.fields(pol) if f.init]
        for n in names:
            if n not in ("budget", "base") and not (n == "prefill_only" and not pol.prefill_only):
                v = getattr(pol, n)
                ok = v is None or isinstance(v, (bool, int, float, str, tuple, list))
                out[f"{type(pol).name}.{n}"] = v if ok else type(v).__name__
        pol = getattr(pol, "base", None) if "base" in names else None
    return out


def prefill_only(policy: str, budget=64) -> bool:
    """True for policies that compress the prompt only (decode appends without eviction)."""
    from flexkv.policies import make_policy

    pol = make_policy(policy, budget=None if budgetless(policy) else budget)
    return not pol.evicts_at_decode and not budgetless(policy)


def eos_ids(tokenizer, model) -> list[int]:
    from flexkv.generate import stop_token_ids
    return stop_token_ids(tokenizer, model)


def compression_budget(prompt_len: int, ratio: float) -> int:
    """kvpress's `compression_ratio`: the fraction of the prompt's KV pairs removed."""
    return max(1, round(prompt_len * (1.0 - ratio)))


def comp_budget(comp, prompt_len: int):
    """The budget of a compression spec: None (no compression), ("ratio", x) of the prompt or
    ("budget", b) tokens."""
    if comp is None:
        return None
    kind, x = comp
    return compression_budget(prompt_len, x) if kind == "ratio" else x


# =========================================================================== runner
class PolicyError(Exception):
    """A policy refused a cell (e.g. a budget below its window): noted in the report, not fatal."""


class Runner:
    """The model, the tokenizer and the cell cache; `generate` runs one cell."""

    def __init__(self, args, model, tok, cache: CellCache):
        self.args = args
        self.model = model
        self.tok = tok
        self.cache = cache
        self.device = model.lm_head.weight.device
        self.eos = eos_ids(tok, model) or None
        self.model_tag = args.model if not Path(str(args.model)).is_dir() else \
            f"dir:{Path(args.model).resolve().name}"
        self.base_key = dict(model=self.model_tag, dtype=args.dtype, device=self.device.type)
        self.missing = 0
        self.errors: dict[tuple, int] = {}   # (suite, policy, budget, message) -> cells
        self._long_text = None
        self._long_ids = None
        # full-cache references this run computed, shared by the suites that need the same one
        # (fidelity's log-probs, also read by the vam suite): key -> tensor
        self.references: dict[tuple, object] = {}

    def long_text(self) -> tuple[str, dict]:
        """The long text of the ppl and fidelity suites: --text, else the Paul Graham essays that
        RULER's data ships (flexkv.ruler fetches them on first use)."""
        if self._long_text is None:
            if self.args.text:
                text, src = Path(self.args.text).read_text(), f"file {Path(self.args.text).name}"
            else:
                from flexkv import ruler

                text = ruler.essays()
                src = (f"the Paul Graham essays of RULER's data ({ruler.DATA_PACKAGE}=="
                       f"{ruler.DATA_VERSION}), concatenated in file order")
            self._long_text = (text, dict(source=src, text_sha1=digest(text)))
        return self._long_text

    def long_ids(self) -> tuple[list[int], dict]:
        """The long text's token ids (tokenized once per run: the essays are ~3 MB)."""
        if self._long_ids is None:
            text, src = self.long_text()
            self._long_ids = (self.tok(text, add_special_tokens=False)["input_ids"], src)
        return self._long_ids

    def compile_for(self) -> bool:
        c = self.args.compile
        if c in ("on", "off"):
            return c == "on"
        # auto: on CUDA only. On CPU a compile costs minutes per (policy, budget) graph (measured:
        # ~200 s on the 2-core dev machine) while an eager decode step costs ~50 ms there.
        return self.device.type == "cuda"

    def error(self, suite, policy, budget, e, params=None):
        msg = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        k = (suite, policy + (f" {params}" if params else ""), budget, msg)
        self.errors[k] = self.errors.get(k, 0) + 1

    def key(self, kind: str, policy: str, budget, params=None, **fields) -> dict:
        """A cell's cache key: the run's model/dtype/device, the suite's fields, and every
        resolved policy parameter (a changed default never serves a cell of the old one)."""
        k = dict(self.base_key, kind=kind, policy=policy, budget=budget, **fields)
        resolved = resolved_params(policy, budget, params)
        if resolved:
            k["resolved"] = resolved
        if params:
            k["params"] = params
        return k

    def lookup(self, key):
        """A cached cell, a `missing` marker under --cached-only, or None (compute it)."""
        hit = self.cache.get(key)
        if hit is not None:
            return dict(hit, cached=True)
        if self.args.cached_only:
            self.missing += 1
            return dict(missing=True)
        return None

    def generate(self, suite: str, ids, policy: str, budget, params=None, **kw):
        """flexkv.generate for one cell -> (output, wall seconds); PolicyError when the policy
        refuses the cell (noted once per message)."""
        import flexkv

        comp = self.compile_for()
        if comp:
            import torch._dynamo

            torch._dynamo.reset()    # every (policy, budget) is a new graph: no recompile limit
        t0 = time.perf_counter()
        try:
            out = flexkv.generate(self.model, ids.to(self.device), policy=policy,
                                  budget=None if budgetless(policy) else budget, compile=comp,
                                  **kw, **(params or {}))
        except (ValueError, RuntimeError, NotImplementedError) as e:   # a policy's limitation
            self.error(suite, policy, budget, e, params)
            raise PolicyError(str(e)[:300]) from e
        return out, time.perf_counter() - t0


def kept_value_norm(cache) -> float:
    """Mean L2 norm of the values a cache holds (valid slots, averaged over layers)."""
    return float(torch.stack([lc.v[lc.pos >= 0].float().norm(dim=-1).mean()
                              for lc in cache.layers]).mean())


def block_means(x: torch.Tensor, block: int):
    return [x[i:i + block].mean() for i in range(0, x.numel(), block)]


def nll_of(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[N, V] logits, [N] targets -> [N] next-token NLL (float64, on the CPU)."""
    logits = logits.double()
    return torch.nn.functional.cross_entropy(logits, targets.to(logits.device),
                                             reduction="none").cpu()


# =========================================================================== provenance
def git_commit() -> str:
    return commit_id()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or "cpu"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
