"""Lightning data modules that yield dict batches: embedded digits, MNIST, binarized MNIST, tensors."""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from .datasets import (
    Binarization,
    EpochShuffleSampler,
    TensorDictDataset,
    binarize_once,
    check_binarization,
    check_data,
    collate_batch,
)
from .readers import (
    DATA_ENV_VAR,
    describe_search,
    find_in,
    idx_names,
    read_amat,
    read_idx,
    search_dirs,
)

__all__ = [
    "HELD_OUT_SEED_OFFSET",
    "DictDataModule",
    "DigitsDataModule",
    "MNISTDataModule",
    "BinarizedMNISTDataModule",
    "TensorDataModule",
]

HELD_OUT_SEED_OFFSET = {"val": 1, "test": 2}


class _Split(NamedTuple):
    x: torch.Tensor
    y: Optional[torch.Tensor]
    source_index: torch.Tensor


class DictDataModule(pl.LightningDataModule):
    """Shared machinery: load once, check, binarize, and serve dict batches."""

    def __init__(
        self,
        batch_size: int,
        binarize: str,
        labels: bool,
        seed: int,
        num_workers: int,
    ):
        super().__init__()
        check_binarization(binarize)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1; got {batch_size}.")
        if num_workers < 0:
            raise ValueError(f"num_workers must be 0 (load in the main process) or more; got {num_workers}.")
        self.batch_size = batch_size
        self.binarize = binarize
        self.labels = labels
        self.seed = seed
        self.num_workers = num_workers
        self._datasets: Optional[dict[str, TensorDictDataset]] = None
        self._source_index: dict[str, torch.Tensor] = {}

    def _load(self) -> dict[str, _Split]:
        """Return the splits ``train`` (required), ``val``, ``test`` as intensities."""
        raise NotImplementedError

    @property
    def event_shape(self) -> torch.Size:
        """The shape of one example, ``batch["x"].shape[1:]``."""
        raise NotImplementedError

    def setup(self, stage: Optional[str] = None) -> None:
        """Load, check and binarize all splits; later calls do nothing."""
        if self._datasets is not None:
            return
        splits = self._load()
        if len(splits["train"].x) == 0:
            raise ValueError(f"{type(self).__name__} has no training examples; pass a non-empty train set.")
        for name, split in splits.items():
            check_data(split.x, f"{type(self).__name__} {name} split")
        datasets = {}
        for name, split in splits.items():
            x, mode = split.x, self.binarize
            if mode == "dynamic" and name != "train":
                # held-out sets are binarized once so that evaluation is stable (Burda et al. 2015)
                x, mode = binarize_once(x, seed=self.seed + HELD_OUT_SEED_OFFSET[name]), "none"
            datasets[name] = TensorDictDataset(x, split.y if self.labels else None, binarize=mode)
            self._source_index[name] = split.source_index
        self._datasets = datasets

    @property
    def datasets(self) -> dict[str, TensorDictDataset]:
        """The splits by name (``"train"``, ``"val"``, ``"test"``); loads the data if needed."""
        self.setup()
        assert self._datasets is not None
        return self._datasets

    @property
    def source_index(self) -> dict[str, torch.Tensor]:
        """For each split, the position of its examples in the source data (file or array)."""
        self.setup()
        return self._source_index

    @property
    def num_train(self) -> int:
        """Number of training examples (the size of a per-datapoint guide); loads the data if needed."""
        return len(self.datasets["train"])

    @property
    def is_binary(self) -> bool:
        """Whether every batch holds only 0s and 1s, as a Bernoulli likelihood needs."""
        if self.binarize != "none":
            return True
        return all(bool(((ds.x == 0) | (ds.x == 1)).all()) for ds in self.datasets.values())

    @property
    def data_range(self) -> tuple[float, float]:
        """The smallest and largest value a batch can hold."""
        if self.binarize != "none":
            return (0.0, 1.0)
        nonempty = [ds.x for ds in self.datasets.values() if ds.x.numel()]
        return (min(float(x.min()) for x in nonempty), max(float(x.max()) for x in nonempty))

    def _drop_hooks_of_missing_splits(self, **present: bool) -> None:
        for split, exists in present.items():
            if not exists:
                # Lightning skips a stage whose hook is not overridden, silently; an empty
                # loader would make it warn (an error under `filterwarnings = error`)
                hook = f"{split}_dataloader"
                setattr(self, hook, partial(getattr(pl.LightningDataModule, hook), self))

    def _loader(self, split: str, train: bool) -> DataLoader:
        dataset = self.datasets[split]
        sampler = None
        if train:
            sampler = EpochShuffleSampler(len(dataset), self.seed)
            dataset.generator = sampler.generator
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            # score-function baselines need a constant batch size; keep at least one batch
            drop_last=train and len(dataset) >= self.batch_size,
            collate_fn=collate_batch,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """A dict of tensors moved key by key (Lightning's general walk over a collection costs about a
        millisecond per batch, as much as a small model's step); anything else as Lightning moves it."""
        if isinstance(batch, dict) and all(isinstance(v, torch.Tensor) for v in batch.values()):
            return {key: value.to(device) for key, value in batch.items()}
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches of constant size (the last partial batch is dropped)."""
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        """The validation split in order, all of it (left unimplemented when there is none)."""
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        """The test split in order, all of it (left unimplemented when there is none)."""
        return self._loader("test", train=False)


class DigitsDataModule(DictDataModule):
    """The 8x8 UCI handwritten digits shipped with scikit-learn: the embedded default, no download.

    1797 images with values 0..16, scaled to [0, 1] by dividing by 16, split at
    random (by ``seed``) into train / validation / test. Splits are sorted by
    their position in ``load_digits()``, see :attr:`source_index`.

    Arguments:
        batch_size: examples per batch.
        binarize: ``"static"`` (default) thresholds at 0.5 so a Bernoulli VAE
            applies; ``"none"`` keeps values in [0, 1]; ``"dynamic"`` redraws
            the training set from Bernoulli(intensity) every batch and binarizes
            the validation (test) set once with seed ``seed + 1`` (``seed + 2``).
        val_fraction: fraction of the images held out for validation.
        test_fraction: fraction of the images held out for testing.
        flatten: batches of shape ``(B, 64)`` if true, else ``(B, 1, 8, 8)``.
        labels: add the digit class as ``batch["y"]``.
        seed: seeds the split (and the held-out binarization).
        num_workers: ``DataLoader`` worker processes.

    Example:
        >>> dm = DigitsDataModule(batch_size=32)
        >>> dm.setup("fit")
        >>> batch = next(iter(dm.train_dataloader()))
        >>> batch["x"].shape, batch["index"].dtype, sorted(batch)
        (torch.Size([32, 64]), torch.int64, ['index', 'x'])
        >>> dm.num_train, len(dm.datasets["val"]), len(dm.datasets["test"]), dm.is_binary
        (1437, 180, 180, True)
    """

    NUM_IMAGES = 1797

    def __init__(
        self,
        batch_size: int = 128,
        binarize: Binarization = "static",
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        flatten: bool = True,
        labels: bool = False,
        seed: int = 0,
        num_workers: int = 0,
    ):
        super().__init__(batch_size, binarize, labels, seed, num_workers)
        if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(
                f"val_fraction and test_fraction must lie in [0, 1) and leave training data; got "
                f"val_fraction={val_fraction}, test_fraction={test_fraction}."
            )
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.flatten = flatten
        self.save_hyperparameters()
        self._drop_hooks_of_missing_splits(
            val=round(val_fraction * self.NUM_IMAGES) > 0, test=round(test_fraction * self.NUM_IMAGES) > 0
        )

    @property
    def event_shape(self) -> torch.Size:
        return torch.Size([64] if self.flatten else [1, 8, 8])

    def _load(self) -> dict[str, _Split]:
        # imported here: scikit-learn takes a second to import and only this module needs it
        from sklearn.datasets import load_digits

        images, targets = load_digits(return_X_y=True)
        x = torch.from_numpy(images).to(torch.float32).div_(16.0).reshape(-1, *self.event_shape)
        y = torch.from_numpy(targets).to(torch.int64)
        n = len(x)
        num_test, num_val = round(self.test_fraction * n), round(self.val_fraction * n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        parts = {
            "train": order[num_test + num_val :],
            "val": order[num_test : num_test + num_val],
            "test": order[:num_test],
        }
        splits = {}
        for name, positions in parts.items():
            positions = positions.sort().values  # keep load_digits' order inside each split
            splits[name] = _Split(x[positions], y[positions], positions)
        return splits


class MNISTDataModule(DictDataModule):
    """MNIST (or Fashion-MNIST) from the four IDX files, pixels scaled to [0, 1].

    The files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each gzipped or
    not) are looked for in ``root`` (and ``root/mnist``) when it is given,
    otherwise in ``$PYRO_LVM_DATA/mnist`` and ``$PYRO_LVM_DATA``; for
    Fashion-MNIST in ``root`` (and ``root/fashion-mnist``), or
    ``$PYRO_LVM_DATA/fashion-mnist`` and
    ``/usr/share/datasets/fashion-mnist`` (``apt-get install dataset-fashion-mnist``).
    The last ``val_size`` of the 60,000 training images are the validation set,
    the 10,000 ``t10k`` images the test set.

    References:
        Burda, Grosse & Salakhutdinov (2015), "Importance Weighted Autoencoders",
        https://arxiv.org/abs/1509.00519 (dynamic binarization).

    Arguments:
        root: folder with the IDX files; ``None`` searches ``$PYRO_LVM_DATA``.
        batch_size: examples per batch.
        binarize: ``"dynamic"`` (default, as Burda et al.) redraws the training
            set from Bernoulli(pixel / 255) every batch and binarizes the
            validation and test sets once (seeds ``seed + 1`` and ``seed + 2``)
            so evaluation is stable; ``"static"`` thresholds at 0.5, which is
            *not* the static binarization of the literature's tables -- that one
            is :class:`BinarizedMNISTDataModule`; ``"none"`` keeps grey levels.
        val_size: number of training images held out for validation (0 for none).
        flatten: batches of shape ``(B, 784)`` if true, else ``(B, 1, 28, 28)``.
        labels: add the class as ``batch["y"]``.
        seed: seeds the binarization of the held-out sets.
        num_workers: ``DataLoader`` worker processes.
        fashion: read Fashion-MNIST (same file names and format) instead.

    Example:
        >>> MNISTDataModule(flatten=False).event_shape  # known before loading
        torch.Size([1, 28, 28])
        >>> dm = MNISTDataModule(root="/data/mnist")  # doctest: +SKIP
        >>> dm.setup(); dm.num_train  # doctest: +SKIP
        50000
    """

    FILES = {
        "train_images": "train-images-idx3-ubyte",
        "train_labels": "train-labels-idx1-ubyte",
        "test_images": "t10k-images-idx3-ubyte",
        "test_labels": "t10k-labels-idx1-ubyte",
    }
    FASHION_SYSTEM_DIRS = ("/usr/share/datasets/fashion-mnist",)

    def __init__(
        self,
        root: Optional[str] = None,
        batch_size: int = 128,
        binarize: Binarization = "dynamic",
        val_size: int = 10000,
        flatten: bool = True,
        labels: bool = False,
        seed: int = 0,
        num_workers: int = 0,
        fashion: bool = False,
    ):
        super().__init__(batch_size, binarize, labels, seed, num_workers)
        if val_size < 0:
            raise ValueError(f"val_size must be 0 or more; got {val_size}.")
        self.root = None if root is None else os.fspath(root)
        self.val_size = val_size
        self.flatten = flatten
        self.fashion = fashion
        self.save_hyperparameters()
        self.hparams["root"] = self.root  # a str, so that a Path given here still dumps to YAML
        self._drop_hooks_of_missing_splits(val=val_size > 0)

    @property
    def event_shape(self) -> torch.Size:
        return torch.Size([784] if self.flatten else [1, 28, 28])

    def _find_files(self) -> dict[str, Path]:
        if self.fashion:
            # not $PYRO_LVM_DATA itself: MNIST files there have the very same names
            dirs = search_dirs(self.root, "fashion-mnist", self.FASHION_SYSTEM_DIRS, env_itself=False)
        else:
            dirs = search_dirs(self.root, "mnist")
        for folder in dirs:
            found = {key: find_in(folder, idx_names(stem)) for key, stem in self.FILES.items()}
            if all(found.values()):
                return found  # type: ignore[return-value]

        def missing(folder: Path) -> list[str]:
            return [stem for stem in self.FILES.values() if find_in(folder, idx_names(stem)) is None]
        if self.fashion:
            where = (
                "Install them with `apt-get install dataset-fashion-mnist` (Debian), or put the "
                "Fashion-MNIST IDX files in $PYRO_LVM_DATA/fashion-mnist or pass root"
            )
        else:
            where = (
                "Get the IDX files from the official MNIST distribution, and pass root= or set "
                f"{DATA_ENV_VAR} to a folder holding them (or a mnist/ subfolder with them)"
            )
        raise FileNotFoundError(
            f"{'Fashion-MNIST' if self.fashion else 'MNIST'} needs the files "
            f"{', '.join(self.FILES.values())} (each may end in .gz) together in one folder; "
            f"{describe_search(dirs, self.root, missing)}. {where}."
        )

    def _read_pair(self, images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
            raise ValueError(
                f"{images_path} holds {images.dtype} data of shape {images.shape}; MNIST images are "
                "uint8 of shape (N, 28, 28). Check that the file is an MNIST image file."
            )
        if labels.shape != (len(images),):
            raise ValueError(
                f"{labels_path} holds labels of shape {labels.shape} but {images_path} has "
                f"{len(images)} images. Check that both files come from the same split."
            )
        x = torch.from_numpy(images).to(torch.float32).div_(255.0)
        return x.reshape(-1, *self.event_shape), torch.from_numpy(labels).to(torch.int64)

    def _load(self) -> dict[str, _Split]:
        files = self._find_files()
        x, y = self._read_pair(files["train_images"], files["train_labels"])
        if self.val_size >= len(x):
            raise ValueError(
                f"val_size={self.val_size} leaves no training images; {files['train_images']} has "
                f"{len(x)}. Choose a smaller val_size."
            )
        x_test, y_test = self._read_pair(files["test_images"], files["test_labels"])
        cut = len(x) - self.val_size
        positions = torch.arange(len(x))
        splits = {"train": _Split(x[:cut], y[:cut], positions[:cut])}
        if self.val_size:
            splits["val"] = _Split(x[cut:], y[cut:], positions[cut:])
        splits["test"] = _Split(x_test, y_test, torch.arange(len(x_test)))
        return splits


class BinarizedMNISTDataModule(DictDataModule):
    """Larochelle & Murray's static binarized MNIST: 50,000 / 10,000 / 10,000 fixed binary images.

    This is the "static" MNIST of the literature's tables. It is read from
    ``binarized_mnist.npz`` (uint8 arrays ``train``, ``valid``, ``test`` of
    shape ``(N, 784)``) or, if there is none, from the original text files
    ``binarized_mnist_train.amat``, ``binarized_mnist_valid.amat``,
    ``binarized_mnist_test.amat``; looked for in ``root`` (and
    ``root/binarized_mnist``) when given, else in
    ``$PYRO_LVM_DATA/binarized_mnist`` and ``$PYRO_LVM_DATA``. There are no labels.

    References:
        Larochelle & Murray (2011), "The Neural Autoregressive Distribution
        Estimator", http://proceedings.mlr.press/v15/larochelle11a.html.

    Arguments:
        root: folder with the files; ``None`` searches ``$PYRO_LVM_DATA``.
        batch_size: examples per batch.
        flatten: batches of shape ``(B, 784)`` if true, else ``(B, 1, 28, 28)``.
        seed: unused by the data (they are fixed); kept so every module takes one.
        num_workers: ``DataLoader`` worker processes.

    Example:
        >>> BinarizedMNISTDataModule().event_shape
        torch.Size([784])
        >>> dm = BinarizedMNISTDataModule(root="/data/binarized_mnist")  # doctest: +SKIP
        >>> dm.setup(); dm.num_train, dm.is_binary  # doctest: +SKIP
        (50000, True)
    """

    NPZ = "binarized_mnist.npz"
    AMAT = {
        "train": "binarized_mnist_train.amat",
        "val": "binarized_mnist_valid.amat",
        "test": "binarized_mnist_test.amat",
    }

    def __init__(
        self,
        root: Optional[str] = None,
        batch_size: int = 128,
        flatten: bool = True,
        seed: int = 0,
        num_workers: int = 0,
    ):
        super().__init__(batch_size, "none", False, seed, num_workers)
        self.root = None if root is None else os.fspath(root)
        self.flatten = flatten
        self.save_hyperparameters()
        self.hparams["root"] = self.root

    @property
    def event_shape(self) -> torch.Size:
        return torch.Size([784] if self.flatten else [1, 28, 28])

    @property
    def is_binary(self) -> bool:
        return True  # checked when the files are read

    @property
    def data_range(self) -> tuple[float, float]:
        return (0.0, 1.0)

    def _read_arrays(self) -> tuple[dict[str, np.ndarray], Path]:
        dirs = search_dirs(self.root, "binarized_mnist")
        for folder in dirs:
            if (folder / self.NPZ).is_file():
                path = folder / self.NPZ
                with np.load(path) as archive:
                    missing = [key for key in ("train", "valid", "test") if key not in archive.files]
                    if missing:
                        raise ValueError(
                            f"{path} lacks the arrays {missing}; it holds {archive.files}. A binarized "
                            "MNIST .npz needs arrays named train, valid and test."
                        )
                    return {"train": archive["train"], "val": archive["valid"], "test": archive["test"]}, path
            paths = {split: folder / name for split, name in self.AMAT.items()}
            if all(p.is_file() for p in paths.values()):
                return {split: read_amat(p) for split, p in paths.items()}, folder

        def missing(folder: Path) -> list[str]:
            return [self.NPZ] + [name for name in self.AMAT.values() if not (folder / name).is_file()]

        raise FileNotFoundError(
            f"Binarized MNIST needs either {self.NPZ} (arrays train, valid, test) or the three files "
            f"{', '.join(self.AMAT.values())} in one folder; {describe_search(dirs, self.root, missing)}. "
            "Get Larochelle & Murray's .amat files (or an .npz made from them), and pass root= or "
            f"set {DATA_ENV_VAR} to a folder holding them (or a binarized_mnist/ subfolder with them)."
        )

    def _load(self) -> dict[str, _Split]:
        arrays, source = self._read_arrays()
        splits = {}
        for name, array in arrays.items():
            if array.ndim != 2 or array.shape[1] != 784:
                raise ValueError(
                    f"The {name} split in {source} has shape {array.shape}; binarized MNIST has "
                    "784 pixels per example, shape (N, 784)."
                )
            not_binary = (array != 0) & (array != 1)
            if not_binary.any():
                raise ValueError(
                    f"The {name} split in {source} holds values other than 0 and 1 (e.g. "
                    f"{array[not_binary][0]}); this is not binarized MNIST. Use "
                    "MNISTDataModule for grey-level MNIST."
                )
            x = torch.from_numpy(np.ascontiguousarray(array)).to(torch.float32)
            splits[name] = _Split(x.reshape(-1, *self.event_shape), None, torch.arange(len(x)))
        return splits


class TensorDataModule(DictDataModule):
    """Serve tensors the user already has (a toy data set, a simulation) as dict batches.

    Arguments:
        train: training data of shape ``(N, *event_shape)``, or a pair
            ``(x, y)`` with integer labels ``y`` of shape ``(N,)``.
        val: validation data, same form; ``None`` for no validation.
        test: test data, same form; ``None`` for no test set.
        batch_size: examples per batch.
        binarize: ``"none"`` (default), ``"static"`` or ``"dynamic"``, as in
            :class:`~pyro_lvm.data.datasets.TensorDictDataset`; intensities must lie in [0, 1] unless
            ``"none"``.
        flatten: reshape every example to a vector.
        seed: seeds the held-out binarization under ``"dynamic"``.
        num_workers: ``DataLoader`` worker processes.

    Example:
        >>> z = torch.randn(300, 2)
        >>> x = z @ torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, 2.0]]) + 0.1 * torch.randn(300, 3)
        >>> dm = TensorDataModule(x[:200], val=x[200:], batch_size=64)
        >>> [b["x"].shape[0] for b in dm.train_dataloader()]
        [64, 64, 64]
        >>> [b["x"].shape[0] for b in dm.val_dataloader()]
        [64, 36]
    """

    def __init__(
        self,
        train: Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]],
        val: Optional[Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = None,
        test: Optional[Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = None,
        batch_size: int = 128,
        binarize: Binarization = "none",
        flatten: bool = False,
        seed: int = 0,
        num_workers: int = 0,
    ):
        super().__init__(batch_size, binarize, True, seed, num_workers)
        self.flatten = flatten
        self._tensors = {}
        for name, data in (("train", train), ("val", val), ("test", test)):
            if data is None:
                continue
            x, y = data if isinstance(data, (tuple, list)) else (data, None)
            x = torch.as_tensor(x)
            if x.dim() < 2:
                raise ValueError(
                    f"{name} must have shape (N, *event_shape); got shape {tuple(x.shape)}. "
                    "Add a feature dimension, e.g. x.unsqueeze(-1)."
                )
            self._tensors[name] = (x.flatten(1) if flatten else x, y)
        shapes = {name: tuple(x.shape[1:]) for name, (x, _) in self._tensors.items()}
        if len(set(shapes.values())) > 1:
            raise ValueError(f"All splits must share one event shape; got {shapes}.")
        self.save_hyperparameters(ignore=["train", "val", "test"])
        self._drop_hooks_of_missing_splits(val=val is not None, test=test is not None)

    @property
    def event_shape(self) -> torch.Size:
        return self._tensors["train"][0].shape[1:]

    def _load(self) -> dict[str, _Split]:
        return {
            name: _Split(x, None if y is None else torch.as_tensor(y), torch.arange(len(x)))
            for name, (x, y) in self._tensors.items()
        }
