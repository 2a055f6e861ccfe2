"""flexkv: KV-cache compression for LLaMA/Mistral models in one compiled decode step."""
from flexkv import policies
from flexkv.cache import KVCache, LayerCache
from flexkv.generate import GenerateOutput, generate, sample
from flexkv.models.loading import load_model

__version__ = "0.1.0"
__all__ = ["load_model", "generate", "sample", "GenerateOutput", "KVCache", "LayerCache", "policies"]
