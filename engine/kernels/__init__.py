"""Triton kernels for the engine; each one has a PyTorch reference with the same signature."""
