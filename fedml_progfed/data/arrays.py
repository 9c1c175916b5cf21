"""An image-classification data set held whole in numpy arrays, before scaling or partitioning.

Readers of a file format (:mod:`fedml_progfed.data.fashion_mnist`) return an
:class:`ArrayDataset`; :func:`fedml_progfed.data.federated.federate_arrays` splits it
over clients.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ArrayDataset:
    """A whole data set as numpy arrays, before any scaling or partitioning.

    Attributes
    ----------
    x_train, x_test : numpy.ndarray
        ``uint8`` images of shape (N, C, H, W).
    y_train, y_test : numpy.ndarray
        ``int64`` labels of shape (N,).
    num_classes : int
    mean, std : float or tuple of float
        Statistics of the [0, 1]-scaled training images, used to normalise (the
        published values, so tiny fixtures normalise alike): one number for all
        channels, or one per channel (CIFAR).
    name : str
        Registry name of the data set.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    mean: float | tuple[float, ...]
    std: float | tuple[float, ...]
    name: str

    def __post_init__(self) -> None:
        # Catch loader bugs here rather than as shape errors deep in training.
        for split, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            if x.ndim != 4 or x.dtype != np.uint8:
                raise ValueError(f"{self.name}: x_{split} must be uint8 (N, C, H, W), got {x.dtype} {x.shape}")
            if y.ndim != 1 or y.dtype != np.int64 or y.shape[0] != x.shape[0]:
                raise ValueError(f"{self.name}: y_{split} must be int64 ({x.shape[0]},), got {y.dtype} {y.shape}")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(f"{self.name}: train images {self.x_train.shape[1:]} differ from test {self.x_test.shape[1:]}")
        for stat in (self.mean, self.std):
            if isinstance(stat, tuple) and len(stat) != self.x_train.shape[1]:
                raise ValueError(f"{self.name}: {len(stat)} per-channel statistics for {self.x_train.shape[1]} channels")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.x_train.shape[1:]
        return int(c), int(h), int(w)
