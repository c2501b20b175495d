"""Data for latent-variable models: readers, datasets of dict rows, and Lightning data modules.

* :mod:`~pyro_lvm.data.readers`: IDX and ``.amat`` files, and where to find them (``$PYRO_LVM_DATA``);
* :mod:`~pyro_lvm.data.datasets`: checks (NaN, the unit interval), binarization, the dataset of dict rows,
  its per-epoch shuffle and its batches;
* :mod:`~pyro_lvm.data.modules`: the data modules (the embedded 8x8 digits, MNIST, static binarized MNIST,
  your tensors);
* :mod:`~pyro_lvm.data.quadrants`: image completion from some quadrants of a digit;
* :mod:`~pyro_lvm.data.semi_supervised`: a few labels per class kept, the others hidden (``y = -1``).
"""

from .datasets import (
    Binarization,
    EpochShuffleSampler,
    TensorDictDataset,
    binarize_once,
    check_data,
    collate_batch,
)
from .modules import (
    BinarizedMNISTDataModule,
    DigitsDataModule,
    MNISTDataModule,
    TensorDataModule,
)
from .quadrants import QuadrantsDataModule
from .readers import DATA_ENV_VAR, read_amat, read_idx
from .semi_supervised import (
    SemiSupervisedDigitsDataModule,
    SemiSupervisedMNISTDataModule,
    StratifiedBatchSampler,
    balanced_labelled_subset,
)

__all__ = [
    "EpochShuffleSampler",
    "DATA_ENV_VAR",
    "Binarization",
    "check_data",
    "binarize_once",
    "collate_batch",
    "read_idx",
    "read_amat",
    "TensorDictDataset",
    "DigitsDataModule",
    "MNISTDataModule",
    "BinarizedMNISTDataModule",
    "TensorDataModule",
    "QuadrantsDataModule",
    "SemiSupervisedDigitsDataModule",
    "SemiSupervisedMNISTDataModule",
    "StratifiedBatchSampler",
    "balanced_labelled_subset",
]
