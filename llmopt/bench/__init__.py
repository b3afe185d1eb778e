"""Benchmarks: pure metric math, the offline runner, and reports (table, JSON, Markdown, PNG)."""
