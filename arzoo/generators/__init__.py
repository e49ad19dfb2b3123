"""Generators: `BaseGenerator` and one module per paradigm, plus the registry of named sizes."""

from arzoo.generators.base import BaseGenerator
from arzoo.generators.callbacks import SampleGrid
from arzoo.generators.masked_hierarchical import HMARTransformer, MaskedHierarchicalGenerator
from arzoo.generators.next_frequency import NextFrequencyGenerator
from arzoo.generators.next_neighbor import NeighborTransformer, NextNeighborGenerator
from arzoo.generators.next_scale import NextScaleGenerator, NextScaleTransformer
from arzoo.generators.next_scale_mamba import MambaScaleGenerator, MVARTransformer
from arzoo.generators.random_order import RandomOrderGenerator, RandomOrderTransformer
from arzoo.generators.raster import RasterGenerator, RasterTransformer
from arzoo.generators.registry import create_generator, generator_config, list_generators, register_sizes
from arzoo.generators.sampling import TokenSampler, TopKTopPSampler, VARSampler, filter_logits, filter_logits_var, guide
from arzoo.generators.state import SamplingState

__all__ = [
    "BaseGenerator",
    "HMARTransformer",
    "MVARTransformer",
    "MambaScaleGenerator",
    "MaskedHierarchicalGenerator",
    "NeighborTransformer",
    "NextFrequencyGenerator",
    "NextNeighborGenerator",
    "NextScaleGenerator",
    "NextScaleTransformer",
    "RandomOrderGenerator",
    "RandomOrderTransformer",
    "RasterGenerator",
    "RasterTransformer",
    "SampleGrid",
    "SamplingState",
    "TokenSampler",
    "TopKTopPSampler",
    "VARSampler",
    "create_generator",
    "filter_logits",
    "filter_logits_var",
    "generator_config",
    "guide",
    "list_generators",
    "register_sizes",
]
