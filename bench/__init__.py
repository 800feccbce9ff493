"""Benchmarks and evaluation commands."""
