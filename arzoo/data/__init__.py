"""Image data: the embedded digits, HF hub datasets and local image folders."""

from arzoo.data.datamodule import ImageDataModule
from arzoo.data.image_grid import make_grid, save_image_grid

__all__ = ["ImageDataModule", "make_grid", "save_image_grid"]
