"""Lightning data modules that yield dict batches: embedded digits, MNIST, binarized MNIST, tensors."""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from functools import partial
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, NamedTuple, Optional, Sequence, Union

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

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
]

DATA_ENV_VAR = "PYRO_LVM_DATA"
"""Environment variable naming the folder that holds the data sets (``mnist/``, ``binarized_mnist/``, ...)."""

Binarization = Literal["none", "static", "dynamic"]
_BINARIZATIONS = ("none", "static", "dynamic")

_PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------- checks


def check_data(x: torch.Tensor, name: str = "data") -> None:
    """Raise a ``ValueError`` if ``x`` holds NaN or infinite values.

    Every data module calls this on every split in ``setup()``, before any
    binarization, so that a NaN is reported instead of being thresholded to 0 or
    turning into a NaN loss hundreds of steps later.

    Arguments:
        x: the data, any shape.
        name: what to call ``x`` in the message.

    Example:
        >>> check_data(torch.zeros(3, 2))
        >>> x = torch.tensor([[0.0, float("nan")], [float("inf"), 1.0]])
        >>> check_data(x, name="train split")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: train split contains 2 non-finite values (1 NaN, 1 inf), the first at index (0, 1). ...
    """
    if not (torch.is_floating_point(x) or torch.is_complex(x)):
        return  # integer and boolean tensors cannot hold NaN or inf
    if x.numel() == 0 or torch.isfinite(x.sum()):
        return  # NaN and inf propagate into the sum, which is five times cheaper than isfinite(x)
    bad = ~torch.isfinite(x)
    if not bad.any():
        return  # the sum overflowed, the data are fine
    num_nan = int(torch.isnan(x).sum())
    num_bad = int(bad.sum())
    first = tuple(bad.nonzero()[0].tolist())
    raise ValueError(
        f"{name} contains {num_bad} non-finite value{'s' if num_bad > 1 else ''} "
        f"({num_nan} NaN, {num_bad - num_nan} inf), the first at index {first}. "
        "Drop or impute them before training, e.g. keep the finite rows with "
        "x[torch.isfinite(x).flatten(1).all(1)]."
    )


def _check_unit_interval(x: torch.Tensor, name: str) -> None:
    if x.numel() == 0:
        return
    low, high = float(x.min()), float(x.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(
            f"Binarizing {name} needs intensities in [0, 1]; got min={low:g}, max={high:g}. "
            "Rescale the data (e.g. divide 8-bit pixels by 255) or use binarize='none'."
        )


def _check_binarization(binarize: str) -> None:
    if binarize not in _BINARIZATIONS:
        raise ValueError(
            f"Unknown binarize={binarize!r}; choose one of {list(_BINARIZATIONS)} "
            "('none' keeps grey levels, 'static' thresholds at 0.5 once, "
            "'dynamic' draws x ~ Bernoulli(intensity) for every minibatch)."
        )


def binarize_once(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Draw ``x ~ Bernoulli(intensity)`` once with a private generator seeded by ``seed``.

    This is how the validation and test sets are binarized under dynamic
    binarization (Burda et al. 2015, "Importance Weighted Autoencoders",
    https://arxiv.org/abs/1509.00519): the same seed gives the same set, so
    held-out log-likelihoods are comparable between runs, and the global torch
    RNG is left untouched.

    Arguments:
        x: intensities in [0, 1].
        seed: the seed of the private generator.

    Example:
        >>> x = torch.full((2, 5), 0.5)
        >>> torch.equal(binarize_once(x, seed=0), binarize_once(x, seed=0))
        True
        >>> binarize_once(x, seed=0).unique().tolist()
        [0.0, 1.0]
    """
    _check_unit_interval(x, "the data")
    generator = torch.Generator().manual_seed(seed)
    return torch.bernoulli(x.to(torch.float32), generator=generator)


# --------------------------------------------------------------------------- dataset


class EpochShuffleSampler(torch.utils.data.Sampler):
    """Shuffles ``range(n)`` with a permutation that depends only on ``(seed, epoch)``.

    Lightning calls :meth:`set_epoch` before every epoch. Because the order (and
    the per-epoch :attr:`generator` that dynamic binarization draws from) owes
    nothing to torch's global RNG, a run resumed from a checkpoint sees exactly
    the batches of an uninterrupted run.

    Example:
        >>> s = EpochShuffleSampler(5, seed=0)
        >>> s.set_epoch(1); first = list(s)
        >>> s.set_epoch(1); first == list(s)
        True
    """

    def __init__(self, n: int, seed: int = 0):
        self.n = n
        self.seed = seed
        self.generator = torch.Generator()
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        state = np.random.SeedSequence([self.seed, epoch]).generate_state(2)
        self.generator.manual_seed(int(state[0]))  # in place: the dataset holds it
        self._order_seed = int(state[1])

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self._order_seed))
        yield from order.tolist()

    def __len__(self) -> int:
        return self.n


class TensorDictDataset(Dataset):
    """A map-style dataset over in-memory tensors that yields ``{"x", "index"[, "y"]}`` dicts.

    ``"index"`` is the position of the example in this dataset (its split), as
    per-datapoint guides need. Fetching is vectorised: the ``DataLoader`` hands
    a whole list of indices to :meth:`__getitems__`, which gathers (and, under
    dynamic binarization, samples) the batch in one tensor operation; pass
    :func:`collate_batch` as the loader's ``collate_fn``.

    Arguments:
        x: data of shape ``(N, *event_shape)``; cast to float32.
        y: optional integer labels of shape ``(N,)``.
        binarize: ``"none"`` returns ``x`` as is; ``"static"`` thresholds once
            at 0.5 (values at or above 0.5 become 1); ``"dynamic"`` draws
            ``x ~ Bernoulli(intensity)`` afresh on every fetch, from
            ``generator`` when one is set (the data modules give it the
            training sampler's per-epoch generator, see :class:`EpochShuffleSampler`),
            else from torch's global RNG.

    Example:
        >>> ds = TensorDictDataset(torch.full((4, 3), 0.5), y=torch.arange(4), binarize="dynamic")
        >>> batch = collate_batch(ds.__getitems__([0, 3]))
        >>> batch["x"].shape, batch["index"], batch["y"]
        (torch.Size([2, 3]), tensor([0, 3]), tensor([0, 3]))
        >>> ds[1]["index"]
        tensor(1)
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: Optional[torch.Tensor] = None,
        binarize: Binarization = "none",
    ):
        _check_binarization(binarize)
        x = torch.as_tensor(x).to(torch.float32)
        if x.dim() < 2:
            raise ValueError(
                f"x must have shape (N, *event_shape); got shape {tuple(x.shape)}. "
                "Add a feature dimension, e.g. x.unsqueeze(-1)."
            )
        check_data(x, "x")
        if y is not None:
            y = torch.as_tensor(y)
            if y.shape != (len(x),) or torch.is_floating_point(y):
                raise ValueError(
                    f"y must hold one integer label per example, shape ({len(x)},); "
                    f"got shape {tuple(y.shape)} and dtype {y.dtype}."
                )
            y = y.to(torch.int64)
        if binarize != "none":
            _check_unit_interval(x, "x")
        if binarize == "static":
            x = (x >= 0.5).to(torch.float32)
        self.x = x
        self.y = y
        self.binarize = binarize
        self.generator: Optional[torch.Generator] = None

    @property
    def event_shape(self) -> torch.Size:
        """The shape of one example."""
        return self.x.shape[1:]

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if i < 0:
            i += len(self)  # so that "index" is always the non-negative position
        return {key: value[0] for key, value in self.__getitems__([i]).items()}

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.int64)
        x = self.x[index]
        if self.binarize == "dynamic":
            x = torch.bernoulli(x, generator=self.generator)
        batch = {"x": x, "index": index}
        if self.y is not None:
            batch["y"] = self.y[index]
        return batch


def collate_batch(batch: Union[Mapping[str, torch.Tensor], Sequence[Any]]) -> dict[str, torch.Tensor]:
    """Collate function for :class:`TensorDictDataset`.

    A dict (already batched by ``__getitems__``) passes through; a list of
    per-example dicts (e.g. from a wrapper dataset without ``__getitems__``) is
    stacked as ``torch.utils.data.default_collate`` does.

    Example:
        >>> collate_batch([{"x": torch.zeros(2), "index": torch.tensor(0)},
        ...                {"x": torch.ones(2), "index": torch.tensor(1)}])["index"]
        tensor([0, 1])
    """
    if isinstance(batch, Mapping):
        return dict(batch)
    return default_collate(list(batch))


# --------------------------------------------------------------------------- file readers

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: _PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST / Fashion-MNIST format), gzipped or raw.

    The header is a magic number ``0x0000TTNN`` (``TT`` the element type,
    ``NN`` the number of dimensions) followed by ``NN`` big-endian uint32 sizes;
    the file must hold exactly that many elements. Gzip is recognised by its
    magic bytes, not the file name.

    Arguments:
        path: the file.

    Returns:
        An array in native byte order with the shape given by the header.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = Path(folder) / "tiny-labels-idx1-ubyte.gz"
        ...     header = struct.pack(">BBBBI", 0, 0, 0x08, 1, 3)
        ...     _ = path.write_bytes(gzip.compress(header + bytes([7, 8, 9])))
        ...     read_idx(path)
        array([7, 8, 9], dtype=uint8)
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as error:
            raise ValueError(
                f"{path} is gzipped but cannot be decompressed ({error}); the download is "
                "probably incomplete. Download the file again."
            ) from error
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise ValueError(
            f"{path} is not an IDX file: its magic number is 0x{raw[:4].hex()}, expected "
            "0x0000TTNN with type TT in 08, 09, 0b, 0c, 0d, 0e and NN >= 1 dimensions. "
            "Check that it is one of the MNIST IDX files and download it again if needed."
        )
    ndim = raw[3]
    start = 4 + 4 * ndim
    if len(raw) < start:
        raise ValueError(
            f"{path} is truncated: its header announces {ndim} dimensions ({start} bytes) "
            f"but the file has {len(raw)} bytes. Download the file again."
        )
    shape = struct.unpack(f">{ndim}I", raw[4:start])
    dtype = _IDX_DTYPES[raw[2]]
    expected = start + math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(
            f"{path} has {len(raw)} bytes but its header promises shape {shape} of {dtype.name} "
            f"({expected} bytes): the file is {'truncated' if len(raw) < expected else 'padded'}. "
            "Download the file again."
        )
    array = np.frombuffer(raw, dtype=dtype, offset=start).reshape(shape)
    # a copy: frombuffer is read-only, which torch.from_numpy warns about
    return array.astype(dtype.newbyteorder("="), copy=True)


def read_amat(path: _PathLike, dim: int = 784) -> np.ndarray:
    """Read a binarized-MNIST ``.amat`` text file: one example a line, ``dim`` 0/1 values.

    Larochelle & Murray (2011, "The Neural Autoregressive Distribution
    Estimator", http://proceedings.mlr.press/v15/larochelle11a.html) published
    the static binarized MNIST as ``binarized_mnist_{train,valid,test}.amat``.
    Parsing is vectorised over the bytes, so the 50,000-line training file reads
    in well under a second.

    Arguments:
        path: the file.
        dim: values per line.

    Returns:
        A uint8 array of shape ``(lines, dim)`` with values in {0, 1}.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = Path(folder) / "tiny.amat"
        ...     _ = path.write_text("0 1 1\\n1 0 0\\n")
        ...     read_amat(path, dim=3)
        array([[0, 1, 1],
               [1, 0, 0]], dtype=uint8)
    """
    path = Path(path)
    raw = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    # element-wise comparisons: np.isin or a table look-up are ten times slower on 80 MB
    is_bit = (raw - np.uint8(ord("0"))) < 2
    bad = ~(is_bit | (raw == ord(" ")) | (raw == ord("\n")) | (raw == ord("\r")) | (raw == ord("\t")))
    # two adjacent digits form a number such as "10", which is not a pixel either
    bad[:-1] |= is_bit[:-1] & is_bit[1:]
    if bad.any():
        position = int(np.argmax(bad))
        line = int(np.count_nonzero(raw[:position] == ord("\n"))) + 1
        token = bytes(raw[position : position + 10]).split()[0].decode(errors="replace")
        raise ValueError(
            f"{path}, line {line}: found {token!r}; a binarized-MNIST .amat file holds only the "
            "values 0 and 1 separated by spaces. Check that this is the right file."
        )
    starts = np.concatenate([[0], np.flatnonzero(raw == ord("\n")) + 1])
    starts = starts[starts < len(raw)]
    counts = np.add.reduceat(is_bit.view(np.uint8), starts, dtype=np.uint32) if len(raw) else np.zeros(0)
    wrong = np.flatnonzero((counts != 0) & (counts != dim))
    if len(wrong):
        raise ValueError(
            f"{path}, line {int(wrong[0]) + 1}: found {int(counts[wrong[0]])} values, expected "
            f"{dim}. The file is truncated or not a binarized-MNIST .amat file."
        )
    return (raw[is_bit] - ord("0")).reshape(-1, dim)


# --------------------------------------------------------------------------- locating files


def _search_dirs(
    root: Optional[_PathLike], subdir: str, system: Sequence[str] = (), env_itself: bool = True
) -> list[Path]:
    """An explicit ``root`` is searched alone; otherwise ``$PYRO_LVM_DATA`` and system folders."""
    if root is not None:
        root = Path(root).expanduser()
        return [root, root / subdir]
    dirs = []
    env = os.environ.get(DATA_ENV_VAR)
    if env:
        base = Path(env).expanduser()
        dirs += [base / subdir, base] if env_itself else [base / subdir]
    return dirs + [Path(folder) for folder in system]


def _describe_search(
    dirs: Sequence[Path], root: Optional[_PathLike], missing: Callable[[Path], list[str]]
) -> str:
    if not dirs:
        return f"no folder was searched: root is None and {DATA_ENV_VAR} is not set"
    looked = []
    for folder in dirs:
        if not folder.is_dir():
            looked.append(f"{folder} (does not exist)")
        else:
            looked.append(f"{folder} (lacks {', '.join(missing(folder))})")
    if root is None and not os.environ.get(DATA_ENV_VAR):
        looked.append(f"and {DATA_ENV_VAR} is not set")
    return f"looked in: {'; '.join(looked)}"


def _find_in(folder: Path, names: Sequence[str]) -> Optional[Path]:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    return None


def _idx_names(stem: str) -> list[str]:
    # some mirrors write "train-images.idx3-ubyte" instead of "train-images-idx3-ubyte"
    dotted = stem.replace("-idx", ".idx")
    return [stem + ".gz", stem, dotted + ".gz", dotted]


_HELD_OUT_SEED_OFFSET = {"val": 1, "test": 2}


class _Split(NamedTuple):
    x: torch.Tensor
    y: Optional[torch.Tensor]
    source_index: torch.Tensor


# --------------------------------------------------------------------------- data modules


class _DictDataModule(pl.LightningDataModule):
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
        _check_binarization(binarize)
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
                x, mode = binarize_once(x, seed=self.seed + _HELD_OUT_SEED_OFFSET[name]), "none"
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

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches of constant size (the last partial batch is dropped)."""
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        """The validation split in order, all of it (left unimplemented when there is none)."""
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        """The test split in order, all of it (left unimplemented when there is none)."""
        return self._loader("test", train=False)


class DigitsDataModule(_DictDataModule):
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


class MNISTDataModule(_DictDataModule):
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
            dirs = _search_dirs(self.root, "fashion-mnist", self.FASHION_SYSTEM_DIRS, env_itself=False)
        else:
            dirs = _search_dirs(self.root, "mnist")
        for folder in dirs:
            found = {key: _find_in(folder, _idx_names(stem)) for key, stem in self.FILES.items()}
            if all(found.values()):
                return found  # type: ignore[return-value]

        def missing(folder: Path) -> list[str]:
            return [stem for stem in self.FILES.values() if _find_in(folder, _idx_names(stem)) is None]
        if self.fashion:
            where = (
                "Install them with `apt-get install dataset-fashion-mnist` (Debian), or put the "
                f"Fashion-MNIST IDX files in $PYRO_LVM_DATA/fashion-mnist or pass root"
            )
        else:
            where = (
                "Get the IDX files from the official MNIST distribution, and pass root= or set "
                f"{DATA_ENV_VAR} to a folder holding them (or a mnist/ subfolder with them)"
            )
        raise FileNotFoundError(
            f"{'Fashion-MNIST' if self.fashion else 'MNIST'} needs the files "
            f"{', '.join(self.FILES.values())} (each may end in .gz) together in one folder; "
            f"{_describe_search(dirs, self.root, missing)}. {where}."
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


class BinarizedMNISTDataModule(_DictDataModule):
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
        dirs = _search_dirs(self.root, "binarized_mnist")
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
            f"{', '.join(self.AMAT.values())} in one folder; {_describe_search(dirs, self.root, missing)}. "
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


class TensorDataModule(_DictDataModule):
    """Serve tensors the user already has (a toy data set, a simulation) as dict batches.

    Arguments:
        train: training data of shape ``(N, *event_shape)``, or a pair
            ``(x, y)`` with integer labels ``y`` of shape ``(N,)``.
        val: validation data, same form; ``None`` for no validation.
        test: test data, same form; ``None`` for no test set.
        batch_size: examples per batch.
        binarize: ``"none"`` (default), ``"static"`` or ``"dynamic"``, as in
            :class:`TensorDictDataset`; intensities must lie in [0, 1] unless
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


# --------------------------------------------------------------------------- image completion


def _visible_quadrants(height: int, width: int, num_visible: int) -> torch.Tensor:
    """A ``(height, width)`` boolean grid, True on the first ``num_visible`` quadrants in the
    order bottom-left, top-left, top-right, bottom-right."""
    top, left = torch.zeros(height, 1, dtype=torch.bool), torch.zeros(1, width, dtype=torch.bool)
    top[: height // 2] = True
    left[:, : width // 2] = True
    quadrants = (~top & left, top & left, top & ~left, ~top & ~left)
    visible = torch.zeros(height, width, dtype=torch.bool)
    for quadrant in quadrants[:num_visible]:
        visible |= quadrant
    return visible


class _QuadrantsDataset(Dataset):
    """Wraps a split of binary images; a fetch returns the hidden-quadrant task of its batch."""

    def __init__(self, images: TensorDictDataset, visible: torch.Tensor, flatten: bool):
        self.images = images
        self.visible = visible
        self.flatten = flatten

    @property
    def generator(self) -> Optional[torch.Generator]:
        return self.images.generator

    @generator.setter
    def generator(self, generator: Optional[torch.Generator]) -> None:
        self.images.generator = generator  # dynamic binarization draws from the sampler's generator

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if i < 0:
            i += len(self)
        return {key: value[0] for key, value in self.__getitems__([i]).items()}

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        batch = self.images.__getitems__(indices)
        y = batch["x"]  # binarized here, before masking, so x's visible pixels equal y's
        x = torch.where(self.visible, y, torch.full_like(y, -1.0))
        mask = (~self.visible).expand_as(y).clone()
        if self.flatten:
            x, y, mask = x.flatten(1), y.flatten(1), mask.flatten(1)
        return {"x": x, "y": y, "mask": mask, "index": batch["index"]}


class QuadrantsDataModule(_DictDataModule):
    r"""Image completion: predict the hidden quadrants of a digit from the visible ones.

    The task of Sohn et al. (2015) for conditional generative models. Each image
    :math:`y \in \{0, 1\}^{1 \times H \times W}` (binarized first) is split into
    four quadrants, of which ``num_visible`` are shown, in the fixed order
    bottom-left, top-left, top-right (so ``num_visible=1`` shows the bottom-left
    quadrant and hides the other three; ``3`` hides only the bottom-right one).
    A batch is a dict with

    * ``"x"``: the input, ``y`` on the visible quadrants and ``-1`` on the hidden
      ones (so that a hidden pixel differs from a black one);
    * ``"y"``: the whole binary image, the target;
    * ``"mask"``: a boolean tensor of ``y``'s shape, True on the pixels to
      predict (the hidden quadrants): a conditional likelihood
      :math:`\log p(y_{\text{mask}} \mid x)` counts only these;
    * ``"index"``: the position of the example in its split.

    ``x``, ``y`` and ``mask`` have shape ``(B, 1, H, W)``, or ``(B, H * W)`` with
    ``flatten=True``. The images come from the data module named by ``source``
    (:class:`DigitsDataModule`, :class:`MNISTDataModule` or
    :class:`BinarizedMNISTDataModule`), with its splits, binarization and
    :attr:`source_index`.

    References:
        Sohn, Lee & Yan (2015), "Learning Structured Output Representation using
        Deep Conditional Generative Models", NeurIPS,
        https://papers.nips.cc/paper/5775-learning-structured-output-representation-using-deep-conditional-generative-models

    Arguments:
        source: ``"digits"`` (8x8, embedded), ``"mnist"`` (28x28 IDX files) or
            ``"binarized_mnist"`` (Larochelle & Murray's fixed binary images).
        root: folder with the MNIST files (``None`` searches ``$PYRO_LVM_DATA``);
            not used by ``"digits"``.
        num_visible: number of visible quadrants, 1, 2 or 3.
        batch_size: examples per batch.
        binarize: ``"static"`` (threshold at 0.5) or ``"dynamic"`` (a fresh
            Bernoulli draw per training batch, held-out sets drawn once); not
            used by ``"binarized_mnist"``, which is binary already.
        val_fraction: ``"digits"``: fraction of the images held out for validation.
        test_fraction: ``"digits"``: fraction of the images held out for testing.
        val_size: ``"mnist"``: training images held out for validation.
        flatten: batches of shape ``(B, H * W)`` instead of ``(B, 1, H, W)``.
        seed: seeds the split of the digits and the held-out binarization.
        num_workers: ``DataLoader`` worker processes.

    Example:
        >>> dm = QuadrantsDataModule(source="digits", batch_size=16)
        >>> batch = next(iter(dm.train_dataloader()))
        >>> batch["x"].shape, batch["y"].shape, batch["mask"].dtype, dm.num_train
        (torch.Size([16, 1, 8, 8]), torch.Size([16, 1, 8, 8]), torch.bool, 1437)
        >>> bool((batch["x"][batch["mask"]] == -1).all()), int(batch["mask"][0].sum())  # 3 of 4 quadrants
        (True, 48)
    """

    SOURCES = ("digits", "mnist", "binarized_mnist")

    def __init__(
        self,
        source: Literal["digits", "mnist", "binarized_mnist"] = "digits",
        root: Optional[str] = None,
        num_visible: int = 1,
        batch_size: int = 128,
        binarize: Literal["static", "dynamic"] = "static",
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        val_size: int = 10000,
        flatten: bool = False,
        seed: int = 0,
        num_workers: int = 0,
    ):
        if source not in self.SOURCES:
            raise ValueError(f"Unknown source={source!r}; choose one of {list(self.SOURCES)}.")
        if binarize not in ("static", "dynamic"):
            raise ValueError(
                f"QuadrantsDataModule needs binary images; got binarize={binarize!r}. Use 'static' "
                "(threshold at 0.5) or 'dynamic' (Bernoulli draws)."
            )
        if num_visible not in (1, 2, 3):
            raise ValueError(
                f"num_visible must be 1, 2 or 3 quadrants; got {num_visible!r}. (0 leaves nothing to "
                "condition on, 4 nothing to predict.)"
            )
        super().__init__(batch_size, binarize, False, seed, num_workers)
        if source == "digits":
            if root is not None:
                raise ValueError(
                    f"source='digits' is embedded and reads no files, but root={root!r} was given. "
                    "Drop root, or use source='mnist'."
                )
            self.images: _DictDataModule = DigitsDataModule(
                batch_size, binarize, val_fraction, test_fraction, flatten=False, seed=seed,
                num_workers=num_workers,
            )
            has_val = round(val_fraction * DigitsDataModule.NUM_IMAGES) > 0
            has_test = round(test_fraction * DigitsDataModule.NUM_IMAGES) > 0
        elif source == "mnist":
            self.images = MNISTDataModule(
                root, batch_size, binarize, val_size, flatten=False, seed=seed, num_workers=num_workers
            )
            has_val, has_test = val_size > 0, True
        else:
            self.images = BinarizedMNISTDataModule(
                root, batch_size, flatten=False, seed=seed, num_workers=num_workers
            )
            has_val, has_test = True, True
        self.source = source
        self.root = None if root is None else os.fspath(root)
        self.num_visible = num_visible
        self.flatten = flatten
        self.save_hyperparameters()
        self.hparams["root"] = self.root
        self._drop_hooks_of_missing_splits(val=has_val, test=has_test)

    @property
    def image_shape(self) -> torch.Size:
        """The shape of one image, ``(1, H, W)``."""
        return self.images.event_shape

    @property
    def event_shape(self) -> torch.Size:
        """The shape of ``batch["x"]``, ``batch["y"]`` and ``batch["mask"]`` per example."""
        shape = self.image_shape
        return torch.Size([math.prod(shape)]) if self.flatten else shape

    @property
    def visible(self) -> torch.Tensor:
        """The ``(H, W)`` boolean grid of the visible pixels (the complement of ``mask``)."""
        _, height, width = self.image_shape
        return _visible_quadrants(height, width, self.num_visible)

    def setup(self, stage: Optional[str] = None) -> None:
        """Load the images (via the source data module) and wrap each split; later calls do nothing."""
        if self._datasets is not None:
            return
        visible = self.visible
        self._datasets = {
            name: _QuadrantsDataset(images, visible, self.flatten)  # type: ignore[misc]
            for name, images in self.images.datasets.items()
        }
        self._source_index = self.images.source_index

    @property
    def is_binary(self) -> bool:
        """``y`` is always binary (``x`` also holds -1 on the hidden quadrants)."""
        return True

    @property
    def data_range(self) -> tuple[float, float]:
        """The smallest and largest value of ``batch["x"]``: -1 (hidden) and 1."""
        return (-1.0, 1.0)
