"""Triton kernels of the `triton` backend, one file per kernel family, each with its launcher."""
