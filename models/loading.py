"""Load a Hugging Face checkpoint directory (config.json + safetensors, sharded or not, tokenizer
files), one in the local Hugging Face cache by its repo id, or the packaged default model into
flexkv's standalone implementation."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from .llama import ModelArgs, Transformer
from .mistral import Mistral

SUPPORTED_MODEL_TYPES = {"llama": Transformer, "mistral": Mistral}
KNOWN_MODELS = ("smollm2-135m-instruct",)


_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _resolve(name_or_path) -> Path:
    """A checkpoint directory; a known name (provisioned on first use); or a Hugging Face repo
    id ("org/name") already in the local Hugging Face cache (`hf download org/name` fills it;
    nothing is fetched here)."""
    p = Path(str(name_or_path)).expanduser()
    if p.is_dir():
        return p
    name = str(name_or_path)
    if name.lower() in KNOWN_MODELS:
        from .provision import provision_default_model
        return provision_default_model()
    what = (f"model must be a known name {list(KNOWN_MODELS)}, a local Hugging Face checkpoint "
            f"directory, or a Hugging Face repo id in the local Hugging Face cache, got {name!r}")
    if _REPO_ID.fullmatch(name):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
        try:
            return Path(snapshot_download(name, local_files_only=True))
        except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
            raise ValueError(f"{what}: no such directory, and {name!r} is not in the local Hugging "
                             "Face cache (flexkv fetches nothing from the Hub: `hf download "
                             f"{name}` first, or pass a directory)") from None
    raise ValueError(f"{what} (no such directory)")


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        sd = {}
        for f in files:
            sd.update(load_file(str(path / f)))
        return sd
    single = path / "model.safetensors"
    if not single.exists():
        raise ValueError(f"model: {path} has neither model.safetensors nor "
                         "model.safetensors.index.json")
    return load_file(str(single))


def load_model(name_or_path="smollm2-135m-instruct", device="cpu", dtype=torch.float32,
               tokenizer: bool = True, tp=False):
    """Returns `(model, tokenizer)` (tokenizer None when the directory has none or
    `tokenizer=False`). `model.eval()` is on the requested device and dtype.

    `tp=True` (or a `torch.distributed.ProcessGroup`): tensor parallelism over the initialised
    process group; this rank loads only its shard (`flexkv.distributed`), `device="cuda"` means
    this rank's GPU (LOCAL_RANK)."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype (float32, bfloat16, float16), got {dtype!r}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be a torch device string like 'cpu' or 'cuda', got {device!r}") from e
    shard = None
    if tp is not False and tp is not None:
        from flexkv import distributed
        shard = distributed.make_shard(tp)  # ValueError without a process group
        device = distributed.rank_device(device)
    path = _resolve(name_or_path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise ValueError(f"model: {path} has no config.json (not a Hugging Face checkpoint directory)")
    cfg = json.loads(cfg_file.read_text())
    mtype = cfg.get("model_type")
    if mtype not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type {mtype!r} in {cfg_file} is not supported; supported: "
                         f"{sorted(SUPPORTED_MODEL_TYPES)}")
    args = ModelArgs.from_hf_config(cfg)
    if shard is not None:
        args = distributed.shard_args(args, shard)  # this rank's heads and MLP columns
    with torch.device("meta"):
        model = SUPPORTED_MODEL_TYPES[mtype](args)
    sd = _state_dict(path) if shard is None else distributed.read_shard(path, args, shard)
    if args.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    missing = [m for m in missing if not (args.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"model: checkpoint {path} does not match the {mtype} architecture "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    if args.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    from .llama import rope_inv_freq
    model.inv_freq = rope_inv_freq(args)
    model = model.to(device=device, dtype=dtype).eval()
    if shard is not None:
        distributed.apply_shard(model, shard)
    model.inv_freq = rope_inv_freq(args).to(device)  # keep RoPE frequencies in fp32
    tok = None
    if tokenizer and ((path / "tokenizer.json").exists() or (path / "tokenizer.model").exists()):
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(str(path))
    return model, tok
