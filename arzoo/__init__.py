"""arzoo: a PyTorch Lightning zoo of visual autoregressive image generators."""

__version__ = "0.1.0"
