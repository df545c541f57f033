"""The sparsity methods' lines in the method registry (kept here so methods.py stays one line per family)."""
from __future__ import annotations


def register_all(register) -> None:
    from .methods.base import SparseDecoding, sparse_model
    from .methods.cats import Cats
    from .methods.dejavu import DejaVu
    from .methods.ffsplit import FFSplit
    from .methods.teal import Teal

    def lossy(engine, sparsifier):
        return SparseDecoding(sparsifier.name, sparse_model(engine, sparsifier), sparsifier)

    register("teal", lambda engine, sparsity=0.5, alloc="uniform": lossy(engine, Teal(sparsity, alloc)), lossless=False,
             help="TEAL: drop small inputs of every linear (sparsity=0.5, alloc=uniform|greedy); lossy")
    register("cats", lambda engine, sparsity=0.5: lossy(engine, Cats(sparsity)), lossless=False,
             help="CATS: drop MLP neurons with small |SiLU(gate)| (sparsity=0.5); lossy")
    register("dejavu", lambda engine, sparsity=0.5, heads=0.0, rank=64: lossy(engine, DejaVu(sparsity, heads, rank)),
             lossless=False, help="Deja Vu: learned predictors (rank=64) pick MLP neurons one step ahead (heads=share "
                                  "of attention heads to skip too); lossy")
    register("ffsplit", lambda engine, sparsity=0.5, heavy=0.1: lossy(engine, FFSplit(sparsity, heavy)), lossless=False,
             help="FFSplit: heavy-hitter neurons dense (heavy=0.1 of them), the rest gate-thresholded; lossy")

    def sparse_draft(engine, sparsity=0.6, method="teal", k=4, adaptive=1):
        from ..decoding.drafters.sparse_draft import SparseDraft
        makers = {"teal": Teal, "cats": Cats, "dejavu": DejaVu, "ffsplit": FFSplit}
        if method not in makers:
            from ..methods import UnknownMethodError
            raise UnknownMethodError(f"sparse-draft method must be one of {', '.join(makers)} (got {method!r})")
        sparsifier = makers[method](sparsity)
        return SparseDraft(engine, sparse_model(engine, sparsifier), sparsifier.name, int(k), bool(adaptive))

    register("sparse-draft", sparse_draft,
             help="the model made sparse drafts for itself, lossless (sparsity=0.6, method=teal, k=4, adaptive=1)")
