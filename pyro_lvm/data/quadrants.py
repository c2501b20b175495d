"""Image completion: the quadrants data module of Sohn et al. (2015)."""

from __future__ import annotations

import math
import os
from typing import Literal, Optional, Sequence

import torch
from torch.utils.data import Dataset

from .datasets import TensorDictDataset
from .modules import (
    BinarizedMNISTDataModule,
    DictDataModule,
    DigitsDataModule,
    MNISTDataModule,
)

__all__ = ["QuadrantsDataModule"]

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


class QuadrantsDataModule(DictDataModule):
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
    (:class:`~pyro_lvm.data.modules.DigitsDataModule`, :class:`~pyro_lvm.data.modules.MNISTDataModule` or
    :class:`~pyro_lvm.data.modules.BinarizedMNISTDataModule`), with its splits, binarization and
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
            self.images: DictDataModule = DigitsDataModule(
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
