"""kvpress side by side: the passkey prompts of bench/quality.py through NVIDIA's kvpress.

kvpress is a bench-only dependency (never one of flexkv's) and kvpress 0.5.5 pins
transformers < 5.3, so it runs in its own virtualenv, created on first use and reused:

    bench/.kvpress-venv      python -m venv; pip install torch==<this torch> (first: the CPU
                             build from local disk, not a multi-GB CUDA build); pip install
                             kvpress==0.5.5; a .gitignore inside keeps it out of git

The main process (bench/quality.py, flexkv's environment) imports this module for the helpers
below; it then runs this same file with the venv's python as a worker
(`python kvpress_side.py worker REQUESTS.json`), which loads the same weights with transformers
(`AutoModelForCausalLM`, eager attention, fp32), answers every request and prints one JSON line
per result on stdout. Requests carry token ids (the exact ids flexkv saw) and results carry
token ids, so the two environments exchange nothing but JSON. This file must not import flexkv
at module level (the worker's environment has no flexkv).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KVPRESS_VERSION = "0.5.5"

# flexkv policy -> kvpress press, for the methods both implement
PRESS_FOR = {
    "streaming": "StreamingLLMPress",
    "snapkv": "SnapKVPress",
    "tova": "TOVAPress",
    "keydiff": "KeyDiffPress",
    "h2o": "ObservedAttentionPress",
}
# kvpress's own parameters (its defaults, kvpress 0.5.5) ...
PRESS_PARAMS = {
    "StreamingLLMPress": {"n_sink": 4},
    "SnapKVPress": {"window_size": 64, "kernel_size": 5},  # kvpress averages-pools (no knob)
    "TOVAPress": {},
    "KeyDiffPress": {},
    "ObservedAttentionPress": {},
}
# ... and flexkv's policies set to match them where the two share a knob: SnapKV window 64,
# kernel 5, average pooling; KeyDiff without a protected window (kvpress scores every token)
FLEX_PARAMS = {
    "streaming": {"n_sink": 4},
    "snapkv": {"window": 64, "kernel": 5, "pool": "avg"},
    "keydiff": {"window": 0},
}
MODES = ["whole", "question"]
MODE_DOC = {
    "whole": "the press compresses the whole prompt (context, question and answer prefix) in "
             "one prefill, as flexkv does; then greedy decoding",
    "question": "kvpress's pipeline protocol: the press compresses the context only; the "
                "question and answer prefix are then prefilled uncompressed on top of the "
                "compressed cache",
}
DIFFERENCES = [
    "Protocol: flexkv compresses the whole prompt, question included (the question's tokens "
    "compete for the budget and, for window-based scores, are the observation window). kvpress's "
    "pipeline compresses the context only and appends the question uncompressed, so its cache "
    "holds budget + question tokens and the scores are computed without the question "
    "('question' mode); the 'whole' mode removes that difference.",
    "Decode: flexkv's decode-time policies (streaming, h2o, tova, keydiff) keep evicting to the "
    "budget while the answer is generated; kvpress presses act at prefill only, so the cache "
    "grows by the answer tokens (at most max_new_tokens, a small effect; flexkv's "
    "prefill_only=True, not used in these runs, does what the presses do).",
    "Budget: flexkv keeps `budget` tokens per (layer, KV head); kvpress takes a compression "
    "ratio, set here to 1 - (budget + 0.5) / prompt tokens so it keeps exactly `budget`.",
    "Numerics: flexkv's FlexAttention vs transformers' eager attention, both fp32: near-ties in "
    "the scores can select different tokens; the full-cache rows show the base agreement.",
]
PAIR_NOTES = {
    "streaming": "same rule (4 sinks + the most recent tokens).",
    "snapkv": "kvpress's parameters in both (window 64, kernel 5, average pooling; flexkv's "
              "defaults are the SnapKV authors' window 32); kvpress averages the window's "
              "attention where flexkv sums it, and pools per query head before the group mean "
              "(the same ranking).",
    "tova": "same score (last query's attention, mean over the layer's heads); kvpress always "
            "keeps the last token.",
    "keydiff": "same score (negative cosine to the mean normalised key), one-shot; flexkv runs "
               "with window=0 here (kvpress protects no window; flexkv's default protects the "
               "32 newest tokens) and keeps evicting at decode.",
    "h2o": "ObservedAttentionPress keeps the top tokens by attention averaged over the queries "
           "that saw each token (no recent window); flexkv's h2o keeps the most recent budget/2 "
           "plus the top by cumulative (summed) attention, which favours early tokens.",
}


def press_params(press: str | None) -> dict:
    return dict(PRESS_PARAMS.get(press, {})) if press else {}


def flex_params(policy: str) -> dict:
    """flexkv's parameters for `policy` in the side by side (kvpress's, where they share a knob)."""
    return dict(FLEX_PARAMS.get(policy, {}))


# =========================================================================== main-process side
def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _has_kvpress(py: Path) -> bool:
    if not py.exists():
        return False
    r = subprocess.run([str(py), "-c", "import importlib.metadata as m, kvpress; "
                        "print(m.version('kvpress'))"], capture_output=True, text=True)
    return r.returncode == 0 and r.stdout.strip() == KVPRESS_VERSION


def ensure_venv(venv: Path, setup: bool = True, log=print) -> Path | None:
    """The venv's python if kvpress is installed there; with `setup`, create/install it first.
    None when it is missing (and `setup` is False) or the install failed."""
    venv = Path(venv)
    py = venv_python(venv)
    if _has_kvpress(py):
        return py
    if not setup:
        return None
    import torch

    log(f"[kvpress] creating {venv} (torch {torch.__version__.split('+')[0]}, then "
        f"kvpress=={KVPRESS_VERSION}) ...")
    try:
        if not py.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        (venv / ".gitignore").write_text("*\n")
        pip = [str(py), "-m", "pip", "install", "-q"]
        subprocess.run(pip + [f"torch=={torch.__version__.split('+')[0]}"], check=True)
        subprocess.run(pip + [f"kvpress=={KVPRESS_VERSION}"], check=True)
    except (subprocess.CalledProcessError, OSError) as e:
        log(f"[kvpress] setup failed: {e}")
        return None
    return py if _has_kvpress(py) else None


def model_dir(model) -> str:
    p = Path(str(model)).expanduser()
    if p.is_dir():
        return str(p)
    from flexkv.models.provision import provision_default_model

    return str(provision_default_model())


def question_start(tokenizer, ids: list[int], question: str | None = None,
                   at: int | None = None) -> int:
    """Index of the first token of the question block (the '\\n\\nWhat is the pass key?' that
    follows the haystack; or the one starting at character `at` of the decoded prompt, e.g. a
    RULER `Sample.question_start`): ids[:n] is the context kvpress's pipeline would compress."""
    if at is not None:
        i = at
    else:
        if question is None:
            from flexkv.passkey import QUESTION as question
        text = tokenizer.decode(ids)
        i = text.rfind("\n\n" + question)
        if i < 0:
            i = text.rfind(question)
        if i < 0:
            raise ValueError("question_start: the prompt does not contain the question")
    lo, hi = 1, len(ids)          # smallest n with len(decode(ids[:n])) > i
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer.decode(ids[:mid])) > i:
            hi = mid
        else:
            lo = mid + 1
    return lo - 1


def run_worker(py: Path, model_dir: str, requests: list[dict], device: str, dtype: str,
               on_result) -> str | None:
    """Run the worker in the kvpress venv; `on_result(dict)` for each result line as it comes.
    Returns None on success, else an error summary (results received so far were delivered)."""
    with tempfile.TemporaryDirectory() as td:
        req = Path(td) / "requests.json"
        req.write_text(json.dumps(dict(model_dir=model_dir, device=device, dtype=dtype,
                                       requests=requests)))
        err = Path(td) / "stderr.txt"
        env = dict(os.environ, PYTHONPATH="", TOKENIZERS_PARALLELISM="false")
        with err.open("w") as ef:
            proc = subprocess.Popen([str(py), str(Path(__file__).resolve()), "worker", str(req)],
                                    stdout=subprocess.PIPE, stderr=ef, text=True, env=env)
            n = 0
            for line in proc.stdout:
                line = line.strip()
                if line.startswith("{"):
                    on_result(json.loads(line))
                    n += 1
            rc = proc.wait()
        if rc != 0 or n < len(requests):
            tail = " ".join(err.read_text().strip().splitlines()[-3:])[-500:]
            return f"exit {rc}, {n}/{len(requests)} results; {tail}"
    return None


# =========================================================================== worker (kvpress venv)
def _worker(req_path: str) -> int:
    import contextlib

    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    import kvpress

    spec = json.loads(Path(req_path).read_text())
    torch.set_grad_enabled(False)
    dtype = getattr(torch, spec["dtype"])
    device = torch.device(spec["device"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=dtype,
                                                 attn_implementation="eager").to(device).eval()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])

    for r in spec["requests"]:
        t0 = time.perf_counter()
        ids = torch.tensor([r["input_ids"]], device=device)
        T, n_ctx = ids.shape[1], r["ctx_len"]
        whole = r["mode"] == "whole"
        k_len = T if whole else n_ctx
        press = None
        if r["press"] is not None and r["budget"] is not None and r["budget"] < k_len:
            ratio = 1.0 - (r["budget"] + 0.5) / k_len
            press = getattr(kvpress, r["press"])(compression_ratio=ratio, **r["params"])
        ctx = press(model) if press is not None else contextlib.nullcontext()
        cache = DynamicCache()
        if whole:
            with ctx:
                out = model(input_ids=ids, past_key_values=cache, logits_to_keep=1)
        else:
            with ctx:
                model.model(input_ids=ids[:, :n_ctx], past_key_values=cache)
            pos = torch.arange(n_ctx, T, device=device)[None]
            out = model(input_ids=ids[:, n_ctx:], past_key_values=cache, position_ids=pos,
                        logits_to_keep=1)
        kept = int(cache.get_seq_length())
        tok = out.logits[0, -1].argmax()
        gen = [int(tok)]
        for i in range(r["max_new_tokens"] - 1):
            if gen[-1] in eos:
                break
            out = model(input_ids=tok.view(1, 1), past_key_values=cache,
                        position_ids=torch.tensor([[T + i]], device=device))
            tok = out.logits[0, -1].argmax()
            gen.append(int(tok))
        print(json.dumps(dict(id=r["id"], tokens=gen, kept=kept,
                              wall_s=round(time.perf_counter() - t0, 3))), flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "worker":
        sys.exit(_worker(sys.argv[2]))
    print(__doc__)
    sys.exit(2)
