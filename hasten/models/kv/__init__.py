"""KV policies (one file each): full, native, window, hybrid; the protocol and the parser are in policy.py."""
from .policy import FULL, KVPolicy, KVPolicyError, LayerKV, parse

__all__ = ["FULL", "KVPolicy", "KVPolicyError", "LayerKV", "parse"]
