"""Whole networks (nn.Modules with the official state-dict keys), one file per family; the
paradigms in `arzoo.generators` wrap them. Built from `arzoo.nn` layers only."""

from arzoo.networks.hmar import HMARTransformer
from arzoo.networks.llamagen import LlamaGenTrunk, RasterTransformer
from arzoo.networks.mvar import MVARTransformer
from arzoo.networks.nar import NeighborTransformer
from arzoo.networks.var import NextScaleTransformer

__all__ = ["HMARTransformer", "LlamaGenTrunk", "MVARTransformer", "NeighborTransformer", "NextScaleTransformer", "RasterTransformer"]
