"""Benchmark workloads, per-request metrics and reports: pure data and arithmetic, no engine."""
