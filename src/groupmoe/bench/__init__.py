"""Benchmarks (run as modules, e.g. ``python -m groupmoe.bench.kernels``)."""
