"""Standalone LLaMA / Mistral implementations and their weight loaders (installed as flexkv.models)."""
from .llama import ModelArgs, Transformer
from .mistral import Mistral
from .loading import load_model, SUPPORTED_MODEL_TYPES

__all__ = ["ModelArgs", "Transformer", "Mistral", "load_model", "SUPPORTED_MODEL_TYPES"]
