"""Compute kernels: CPU (numba) and GPU (Triton) implementations behind the model's and sparsity's modules."""
