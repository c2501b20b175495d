"""Data as tensors: checks, binarization, the dataset of dict rows, its sampler and its batches."""

from __future__ import annotations

import os
from typing import Any, Literal, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

__all__ = [
    "check_data",
    "check_unit_interval",
    "check_binarization",
    "binarize_once",
    "EpochShuffleSampler",
    "TensorDictDataset",
    "collate_batch",
]

Binarization = Literal["none", "static", "dynamic"]


_BINARIZATIONS = ("none", "static", "dynamic")


_PathLike = Union[str, os.PathLike]


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


def check_unit_interval(x: torch.Tensor, name: str) -> None:
    if x.numel() == 0:
        return
    low, high = float(x.min()), float(x.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(
            f"Binarizing {name} needs intensities in [0, 1]; got min={low:g}, max={high:g}. "
            "Rescale the data (e.g. divide 8-bit pixels by 255) or use binarize='none'."
        )


def check_binarization(binarize: str) -> None:
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
    check_unit_interval(x, "the data")
    generator = torch.Generator().manual_seed(seed)
    return torch.bernoulli(x.to(torch.float32), generator=generator)


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
        check_binarization(binarize)
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
            check_unit_interval(x, "x")
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
