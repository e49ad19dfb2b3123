"""Metrics shared by training, validation and the benchmark harness."""

from arzoo.metrics.codebook import CodebookUsage

__all__ = ["CodebookUsage"]
