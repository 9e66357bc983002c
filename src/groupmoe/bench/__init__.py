"""Benchmarks (run on a GPU for figures; every script has a CPU smoke mode for tests)."""
