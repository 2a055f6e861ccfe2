"""KV-cache policies. `available()` lists the names accepted by `flexkv.generate(policy=...)`."""
from flexkv.policies.base import DecodeContext, Policy, PrefillContext
from flexkv.policies.registry import available, make_policy, register, register_modifier
from flexkv.policies.full import Full

__all__ = ["Policy", "PrefillContext", "DecodeContext", "available", "make_policy", "register",
           "register_modifier", "Full"]
from flexkv.policies.streaming import Streaming
from flexkv.policies.h2o import H2O

__all__ += ["Streaming", "H2O"]
