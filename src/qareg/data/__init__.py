"""Datasets as uint8 tensors, their train/val/test splits, augmentation and batch loading."""

from qareg.data import cifar10, fashion_mnist  # noqa: F401  (importing registers the datasets)
from qareg.data.augment import Augment, random_crop, random_flip
from qareg.data.loader import BatchLoader
from qareg.data.splits import DatasetSplits, TensorData, list_datasets, load_dataset

__all__ = [
    "Augment",
    "BatchLoader",
    "DatasetSplits",
    "TensorData",
    "list_datasets",
    "load_dataset",
    "random_crop",
    "random_flip",
]
