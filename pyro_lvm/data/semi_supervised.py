r"""Semi-supervised data: a few labels per class kept in the training split, the others hidden (``y = -1``).

The labelled subset is balanced (``labels_per_class`` of each class) and fixed by a seed
(:func:`balanced_labelled_subset`); the validation and test splits keep every label, so that a classifier's error
can be measured on them. Training batches are drawn uniformly from the whole training split, or with
``labelled_per_batch`` a fixed number of labelled points in every batch (:class:`StratifiedBatchSampler`, as
semi-supervised training usually does when labels are rare: 100 of 50,000 MNIST images are 0.2 labels per batch
of 100). Each point of such a batch then carries a ``weight`` that makes the weighted batch an unbiased estimate of
the uniform batch's sum (see :class:`StratifiedBatchSampler`), which :class:`pyro_lvm.SemiSupervisedVAE` applies
to its ELBO terms.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from .datasets import Binarization, EpochShuffleSampler, collate_batch
from .modules import DigitsDataModule, MNISTDataModule

__all__ = [
    "balanced_labelled_subset",
    "StratifiedBatchSampler",
    "SemiSupervisedDigitsDataModule",
    "SemiSupervisedMNISTDataModule",
]


def _check_labels_per_class(labels_per_class: Any) -> None:
    if isinstance(labels_per_class, bool) or not isinstance(labels_per_class, int) or labels_per_class < 0:
        raise ValueError(f"labels_per_class must be an integer >= 0; got {labels_per_class!r}.")


def balanced_labelled_subset(y: torch.Tensor, labels_per_class: int, seed: int = 0) -> torch.Tensor:
    """The sorted positions of ``labels_per_class`` points of each class of ``y``, chosen at random by ``seed``.

    Each class's points are shuffled by a generator seeded with ``seed`` (classes in increasing order), and the first
    ``labels_per_class`` kept: the same ``y`` and seed give the same subset on every machine.

    Example:
        >>> y = torch.tensor([0, 1, 0, 1, 0, 1, 2, 2])
        >>> subset = balanced_labelled_subset(y, 2, seed=0)
        >>> y[subset].bincount().tolist(), torch.equal(subset, balanced_labelled_subset(y, 2, seed=0))
        ([2, 2, 2], True)
    """
    _check_labels_per_class(labels_per_class)
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in torch.unique(y[y >= 0]).tolist():
        positions = (y == c).nonzero().flatten()
        if len(positions) < labels_per_class:
            raise ValueError(
                f"Class {c} has {len(positions)} training points, fewer than labels_per_class={labels_per_class}. "
                "Choose a smaller labels_per_class."
            )
        chosen.append(positions[torch.randperm(len(positions), generator=generator)[:labels_per_class]])
    return torch.cat(chosen).sort().values if chosen else torch.zeros(0, dtype=torch.long)


class StratifiedBatchSampler(Sampler):
    r"""Batches of ``labelled_per_batch`` labelled points and ``batch_size - labelled_per_batch`` unlabelled ones.

    An epoch is one pass over the unlabelled points (shuffled by ``(seed, epoch)``, the last partial batch dropped);
    the labelled points are reshuffled and cycled as often as needed. With :math:`N_l` labelled and :math:`N_u`
    unlabelled points (:math:`N = N_l + N_u`), :math:`k` labelled per batch of :math:`B`, the weights

    .. math::

        w_l = \frac{B N_l}{N k}, \qquad w_u = \frac{B N_u}{N (B - k)}

    (:attr:`weights`) make :math:`\sum_{i \in \text{batch}} w_i f(x_i)` an unbiased estimate of
    :math:`\frac BN \sum_{i=1}^N f(x_i)`, what a uniform batch of :math:`B` estimates. Lightning sets the epoch
    through :attr:`sampler` (an :class:`~pyro_lvm.data.EpochShuffleSampler`, whose per-epoch generator dynamic
    binarization also draws from).

    Example:
        >>> sampler = StratifiedBatchSampler(torch.arange(4), torch.arange(4, 40), batch_size=10, labelled_per_batch=2)
        >>> batches = list(sampler)
        >>> len(batches), [sum(i < 4 for i in b) for b in batches]
        (4, [2, 2, 2, 2])
        >>> [round(w, 4) for w in sampler.weights]  # labelled, unlabelled
        [0.5, 1.125]
    """

    def __init__(self, labelled: torch.Tensor, unlabelled: torch.Tensor, batch_size: int, labelled_per_batch: int,
                 seed: int = 0):
        if not 0 < labelled_per_batch < batch_size:
            raise ValueError(
                f"labelled_per_batch must lie in 1..batch_size - 1 = {batch_size - 1}; got {labelled_per_batch}."
            )
        unlabelled_per_batch = batch_size - labelled_per_batch
        if len(labelled) == 0 or len(unlabelled) < unlabelled_per_batch:
            raise ValueError(
                f"labelled_per_batch={labelled_per_batch} needs labelled points and at least "
                f"{unlabelled_per_batch} unlabelled ones; got {len(labelled)} and {len(unlabelled)}. Use "
                "labelled_per_batch=None (uniform batches)."
            )
        self.labelled, self.unlabelled = labelled, unlabelled
        self.batch_size, self.labelled_per_batch = batch_size, labelled_per_batch
        self.seed = seed
        self.sampler = EpochShuffleSampler(len(unlabelled), seed)
        n_l, n_u = len(labelled), len(unlabelled)
        n = n_l + n_u
        #: the weights of a labelled and of an unlabelled point
        self.weights = (batch_size * n_l / (n * labelled_per_batch), batch_size * n_u / (n * unlabelled_per_batch))

    def __len__(self) -> int:
        return len(self.unlabelled) // (self.batch_size - self.labelled_per_batch)

    def __iter__(self) -> Iterator[list[int]]:
        k, m = self.labelled_per_batch, self.batch_size - self.labelled_per_batch
        unlabelled = self.unlabelled[torch.tensor(list(self.sampler), dtype=torch.long)]
        state = np.random.SeedSequence([self.seed, self.sampler.epoch, 1]).generate_state(1)
        generator = torch.Generator().manual_seed(int(state[0]))
        rounds = -(-len(self) * k // len(self.labelled))
        order = torch.cat([torch.randperm(len(self.labelled), generator=generator) for _ in range(rounds)])
        labelled = self.labelled[order]
        for b in range(len(self)):
            yield labelled[b * k:(b + 1) * k].tolist() + unlabelled[b * m:(b + 1) * m].tolist()


class _WeightedBatches:
    """A ``collate_fn``: :func:`~pyro_lvm.data.collate_batch`, plus ``"weight"`` from whether ``y >= 0``."""

    def __init__(self, labelled_weight: float, unlabelled_weight: float):
        self.labelled_weight, self.unlabelled_weight = labelled_weight, unlabelled_weight

    def __call__(self, batch: Any) -> dict[str, torch.Tensor]:
        batch = collate_batch(batch)
        labelled = batch["y"] >= 0
        batch["weight"] = torch.where(labelled, self.labelled_weight, self.unlabelled_weight).to(torch.float32)
        return batch


class _SemiSupervised:
    """What the semi-supervised data modules add to their fully labelled parents (listed first among the bases)."""

    labels_per_class: int
    labelled_per_batch: Optional[int]

    def _load(self) -> dict:
        splits = super()._load()  # type: ignore[misc]
        train = splits["train"]
        subset = balanced_labelled_subset(train.y, self.labels_per_class, self.seed)  # type: ignore[attr-defined]
        y = torch.full_like(train.y, -1)
        y[subset] = train.y[subset]
        splits["train"] = train._replace(y=y)
        return splits

    @property
    def labelled_index(self) -> torch.Tensor:
        """The positions in the training split of the points whose label is kept (sorted)."""
        return (self.datasets["train"].y >= 0).nonzero().flatten()  # type: ignore[attr-defined]

    def train_dataloader(self) -> DataLoader:
        """Uniform shuffled batches, or with ``labelled_per_batch`` stratified, weighted ones."""
        if self.labelled_per_batch is None:
            return super().train_dataloader()  # type: ignore[misc]
        dataset = self.datasets["train"]  # type: ignore[attr-defined]
        labelled = dataset.y >= 0
        sampler = StratifiedBatchSampler(labelled.nonzero().flatten(), (~labelled).nonzero().flatten(),
                                         self.batch_size, self.labelled_per_batch, self.seed)  # type: ignore[attr-defined]
        dataset.generator = sampler.sampler.generator
        workers = self.num_workers  # type: ignore[attr-defined]
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=_WeightedBatches(*sampler.weights),
                          num_workers=workers, pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0)


class SemiSupervisedDigitsDataModule(_SemiSupervised, DigitsDataModule):
    """The 8x8 digits (:class:`~pyro_lvm.data.DigitsDataModule`) with ``labels_per_class`` training labels per class.

    Batches hold ``x``, ``index`` and ``y`` (``-1`` where the label is hidden; every validation and test label is
    kept), and with ``labelled_per_batch`` a ``weight`` per training point (:class:`StratifiedBatchSampler`).

    Arguments:
        labels_per_class: training labels kept per class, chosen by ``seed`` (:func:`balanced_labelled_subset`).
        labelled_per_batch: ``None`` (uniform batches) or the labelled points in every training batch.
        batch_size, binarize, val_fraction, test_fraction, flatten, seed, num_workers: as
            :class:`~pyro_lvm.data.DigitsDataModule` (``seed`` also chooses the labels and orders the batches).

    Example:
        >>> dm = SemiSupervisedDigitsDataModule(labels_per_class=10, batch_size=64)
        >>> dm.setup("fit")
        >>> y = dm.datasets["train"].y
        >>> y[y >= 0].bincount().tolist(), int((y == -1).sum()), bool((dm.datasets["val"].y >= 0).all())
        ([10, 10, 10, 10, 10, 10, 10, 10, 10, 10], 1337, True)
    """

    def __init__(
        self,
        labels_per_class: int = 10,
        labelled_per_batch: Optional[int] = None,
        batch_size: int = 64,
        binarize: Binarization = "static",
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        flatten: bool = True,
        seed: int = 0,
        num_workers: int = 0,
    ):
        super().__init__(batch_size, binarize, val_fraction, test_fraction, flatten, True, seed, num_workers)
        self.labels_per_class = labels_per_class
        self.labelled_per_batch = labelled_per_batch
        _check_labels_per_class(labels_per_class)


class SemiSupervisedMNISTDataModule(_SemiSupervised, MNISTDataModule):
    """MNIST (:class:`~pyro_lvm.data.MNISTDataModule`) with ``labels_per_class`` training labels per class.

    The classic task of Kingma et al. (2014) is ``labels_per_class=10`` (100 labels) of the 50,000 training images,
    the 10,000 validation and test images keeping their labels. Batches as
    :class:`SemiSupervisedDigitsDataModule`'s.

    Arguments:
        root: folder with the IDX files; ``None`` searches ``$PYRO_LVM_DATA``.
        labels_per_class: training labels kept per class, chosen by ``seed`` (:func:`balanced_labelled_subset`).
        labelled_per_batch: ``None`` (uniform batches) or the labelled points in every training batch.
        batch_size, binarize, val_size, flatten, seed, num_workers, fashion: as
            :class:`~pyro_lvm.data.MNISTDataModule` (``seed`` also chooses the labels and orders the batches).

    Example:
        >>> dm = SemiSupervisedMNISTDataModule(root="/data/mnist", labels_per_class=10)  # doctest: +SKIP
        >>> dm.setup(); len(dm.labelled_index), dm.num_train  # doctest: +SKIP
        (100, 50000)
    """

    def __init__(
        self,
        root: Optional[str] = None,
        labels_per_class: int = 10,
        labelled_per_batch: Optional[int] = None,
        batch_size: int = 100,
        binarize: Binarization = "dynamic",
        val_size: int = 10000,
        flatten: bool = True,
        seed: int = 0,
        num_workers: int = 0,
        fashion: bool = False,
    ):
        super().__init__(root, batch_size, binarize, val_size, flatten, True, seed, num_workers, fashion)
        self.labels_per_class = labels_per_class
        self.labelled_per_batch = labelled_per_batch
        _check_labels_per_class(labels_per_class)
