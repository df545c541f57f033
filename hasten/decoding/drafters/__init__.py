"""Drafters: one file each, one protocol (base.Drafter). They propose token trees; the target decides."""
from .base import DecodeState, Drafter, NoDraft

__all__ = ["DecodeState", "Drafter", "NoDraft"]
