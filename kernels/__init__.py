"""Triton kernels for the hot path, each with a pure-torch reference and a dispatcher."""
