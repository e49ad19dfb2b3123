"""Tokenizers: the interface, single-scale VQ (LlamaGen), multi-scale residual VQ (VAR), stage-1 training."""

from arzoo.tokenizers.base import Tokenizer, TokenizerOutput, build_tokenizer
from arzoo.tokenizers.checkpoint import load_tokenizer
from arzoo.tokenizers.frequency_vq import FrequencyVQTokenizer
from arzoo.tokenizers.module import TokenizerModule
from arzoo.tokenizers.multiscale_vq import MultiScaleVQTokenizer
from arzoo.tokenizers.vq import VQTokenizer

__all__ = [
    "FrequencyVQTokenizer",
    "MultiScaleVQTokenizer",
    "Tokenizer",
    "TokenizerModule",
    "TokenizerOutput",
    "VQTokenizer",
    "build_tokenizer",
    "load_tokenizer",
]
