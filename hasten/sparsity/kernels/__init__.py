"""Sparse matmul kernels: C++ for the CPU (cpu.py), Triton for CUDA (triton.py); dispatch by device."""
