"""Triton kernels for SD-Zero distillation losses (imported as sdzero_kernels)."""
