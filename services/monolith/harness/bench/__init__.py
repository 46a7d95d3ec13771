"""Benchmarks: each prints one JSON line; speeds are ratios to a baseline in the same run."""
