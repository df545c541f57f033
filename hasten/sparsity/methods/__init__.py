"""Sparsifiers, one file each: TEAL, CATS, Deja Vu, FFSplit (see base.py for the protocol)."""
