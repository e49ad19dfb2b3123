"""Whole networks (nn.Modules with the official state-dict keys), one file per family, each built from
one config dataclass; the paradigms in `arzoo.generators` wrap them. Built from `arzoo.nn` layers only."""

from arzoo.networks.hmar import HMARConfig, HMARTransformer
from arzoo.networks.llamagen import LlamaGenConfig, LlamaGenTrunk, RasterTransformer
from arzoo.networks.mvar import MVARConfig, MVARTransformer
from arzoo.networks.nar import NARConfig, NeighborTransformer
from arzoo.networks.var import NextScaleTransformer, VARConfig

__all__ = [
    "HMARConfig", "HMARTransformer", "LlamaGenConfig", "LlamaGenTrunk", "MVARConfig", "MVARTransformer",
    "NARConfig", "NeighborTransformer", "NextScaleTransformer", "RasterTransformer", "VARConfig",
]
