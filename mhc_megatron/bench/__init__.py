"""Benchmarks (scripts that print tables; never pass/fail tests)."""
