"""Metrics shared by training, validation and the benchmark harness.

`GenerativeMetrics` (FID / IS via torchmetrics, k-NN precision/recall, classifier accuracy) on a
pluggable feature network (`digits`, `inception`); speed/memory/FLOP meters in `meters`;
`SampleQuality`, a Lightning callback around the same metric object (imported lazily: it needs
lightning).
"""

from typing import Any

from arzoo.metrics.codebook import CodebookUsage
from arzoo.metrics.features import FeatureNet, build_feature_net, find_inception_weights
from arzoo.metrics.generative import GenerativeMetrics, PrecisionRecall, precision_recall
from arzoo.metrics.meters import PeakMemory, Throughput, count_flops, machine_load, peak_memory

__all__ = [
    "CodebookUsage",
    "FeatureNet",
    "GenerativeMetrics",
    "PeakMemory",
    "PrecisionRecall",
    "SampleQuality",
    "Throughput",
    "build_feature_net",
    "count_flops",
    "find_inception_weights",
    "machine_load",
    "peak_memory",
    "precision_recall",
]


def __getattr__(name: str) -> Any:
    if name == "SampleQuality":  # lazy: lightning costs seconds to import
        from arzoo.metrics.callback import SampleQuality

        return SampleQuality
    raise AttributeError(f"module 'arzoo.metrics' has no attribute {name!r}")
