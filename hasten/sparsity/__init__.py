"""Activation sparsity: calibration, sparsifiers (TEAL, CATS, Deja Vu, FFSplit) and the kernels that skip reads."""
