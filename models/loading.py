"""Load a Hugging Face checkpoint directory (config.json + safetensors, sharded or not, tokenizer
files) or the packaged default model into flexkv's standalone implementation."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from .llama import ModelArgs, Transformer
from .mistral import Mistral

SUPPORTED_MODEL_TYPES = {"llama": Transformer, "mistral": Mistral}
KNOWN_MODELS = ("smollm2-135m-instruct",)


def _resolve(name_or_path) -> Path:
    p = Path(str(name_or_path)).expanduser()
    if p.is_dir():
        return p
    if str(name_or_path).lower() in KNOWN_MODELS:
        from .provision import provision_default_model
        return provision_default_model()
    raise ValueError(f"model must be a known name {list(KNOWN_MODELS)} or a local Hugging Face "
                     f"checkpoint directory, got {str(name_or_path)!r} (no such directory)")


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
