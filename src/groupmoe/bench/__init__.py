"""Benchmarks (run on a device): ``python -m groupmoe.bench.<name> --out FILE.json``."""
