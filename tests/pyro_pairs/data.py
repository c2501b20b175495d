"""Small data sets and data modules for the Pyro-style pairs: what a test trains them on."""

from typing import Optional

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from pyro_lvm.data import DigitsDataModule, QuadrantsDataModule, TensorDataModule

from .factor_analysis import factor_data
from .gmm import mixture_data


class FixedBatches(pl.LightningDataModule):
    """Serve given lists of batches as they are, in order: the same batches for pyro_lvm and for stock Pyro."""

    def __init__(self, train: list, val: Optional[list] = None):
        super().__init__()
        self.train, self.val = train, val

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val if self.val is not None else self.train[:1], batch_size=None)


def digit_tensors(labels_per_class: Optional[int] = None) -> dict:
    """Binarized 8x8 digits as flat tensors: ``x``, ``y`` (label, ``-1`` where hidden) of train and val splits.

    ``labels_per_class``: keep this many labels of each class in the training split, hide the rest.
    """
    dm = DigitsDataModule(batch_size=10_000, labels=True)
    dm.setup("fit")
    train, val = next(iter(dm.train_dataloader())), next(iter(dm.val_dataloader()))
    y = train["y"].clone()
    if labels_per_class is not None:
        keep = torch.zeros_like(y, dtype=torch.bool)
        for c in range(10):
            keep[(y == c).nonzero().flatten()[:labels_per_class]] = True
        y[~keep] = -1
    return {"x": train["x"], "y": y, "x_val": val["x"], "y_val": val["y"]}


class SemiSupervisedDigits(TensorDataModule):
    """The binarized digits with ``labels_per_class`` labels of each class kept (``y = -1`` elsewhere)."""

    def __init__(self, labels_per_class: int = 10, batch_size: int = 64):
        t = digit_tensors(labels_per_class)
        super().__init__((t["x"], t["y"]), val=(t["x_val"], t["y_val"]), test=(t["x_val"], t["y_val"]),
                         batch_size=batch_size)


class MixtureData(TensorDataModule):
    """Points of three Gaussian components (:func:`mixture_data`), one batch of all training points."""

    def __init__(self, num_train: int = 200, num_val: int = 60):
        super().__init__(mixture_data(num_train), val=mixture_data(num_val, seed=1), test=mixture_data(num_val, seed=2),
                         batch_size=num_train)


class FactorData(TensorDataModule):
    """Data of a factor model (:func:`factor_data`): 360 training and 180 held-out points."""

    def __init__(self, batch_size: int = 64, num_val: int = 180):
        super().__init__(factor_data(360), val=factor_data(num_val, seed=1), test=factor_data(num_val, seed=2),
                         batch_size=batch_size)


# what each pair trains on: a data module and its arguments (a YAML config names them too)
DATA = {
    # binary pixels for a Bernoulli pair, said: a YAML run would otherwise take the default run's grey levels
    "vae": (DigitsDataModule, {"batch_size": 64, "binarize": "static"}),
    "cvae": (QuadrantsDataModule, {"source": "digits", "batch_size": 64, "flatten": True}),
    "ssvae": (SemiSupervisedDigits, {"labels_per_class": 10, "batch_size": 64}),
    "gmm": (MixtureData, {}),
    "factor_analysis": (FactorData, {"batch_size": 64}),
}


def data_module(name: str, **options):
    """The data module each pair trains on."""
    cls, defaults = DATA[name]
    return cls(**{**defaults, **options})
