"""KV-cache policies. `available()` lists the names accepted by `flexkv.generate(policy=...)`."""
from flexkv.policies.base import ChunkInfo, DecodeContext, Policy, PrefillContext
from flexkv.policies.registry import available, make_policy, register, register_modifier
from flexkv.policies.full import Full

__all__ = ["Policy", "PrefillContext", "DecodeContext", "ChunkInfo", "available", "make_policy",
           "register", "register_modifier", "Full"]
from flexkv.policies.streaming import Streaming
from flexkv.policies.h2o import H2O

__all__ += ["Streaming", "H2O"]
from flexkv.policies.tova import TOVA
from flexkv.policies.keydiff import KeyDiff

__all__ += ["TOVA", "KeyDiff"]
from flexkv.policies.laprox import LaProx

__all__ += ["LaProx"]
from flexkv.policies.weightedkv import WeightedKV
from flexkv.policies.cam import CaM

__all__ += ["WeightedKV", "CaM"]
from flexkv.policies.snapkv import SnapKV
from flexkv.policies.pyramidkv import PyramidKV
from flexkv.policies.adakv import AdaKV

__all__ += ["SnapKV", "PyramidKV", "AdaKV"]
from flexkv.policies.kvmerger import KVMerger
from flexkv.policies.vam import VAM

__all__ += ["KVMerger", "VAM"]
