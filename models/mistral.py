"""Mistral: the LLaMA decoder with a sliding attention window (a `mask_mod` on positions in
`flexkv.attention.sliding_window`). Only the config differs; parameter names match HF's
`MistralForCausalLM`."""
from __future__ import annotations

from .llama import ModelArgs, Transformer


class Mistral(Transformer):
    """`args.sliding_window` (None = full attention, as Mistral v0.2+ configs set)."""

    def __init__(self, args: ModelArgs):
        args.model_type = "mistral"
        super().__init__(args)
