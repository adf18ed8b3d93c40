"""Data side of DINOv2 training: block masking and multi-crop collation (augmentations in ``model.data.augmentations``)."""

from model.data.collate import collate_data_and_cast
from model.data.masking import MaskingGenerator

__all__ = ["MaskingGenerator", "collate_data_and_cast"]
