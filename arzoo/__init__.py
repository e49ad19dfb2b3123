"""arzoo: a PyTorch Lightning zoo of visual autoregressive image generators."""

__version__ = "0.1.0"

from arzoo.generators import BaseGenerator, create_generator, list_generators  # noqa: E402
from arzoo.pretrained import from_pretrained  # noqa: E402

Generator = BaseGenerator  # `arzoo.Generator.load_from_checkpoint(path)` returns the concrete class

__all__ = ["BaseGenerator", "Generator", "__version__", "create_generator", "from_pretrained", "list_generators"]
