"""Pictures: loss curves, reconstructions next to their inputs, samples from the prior."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from matplotlib.figure import Figure

__all__ = ["as_images", "image_grid", "plot_reconstructions", "plot_samples", "plot_loss_curves"]


def as_images(x: torch.Tensor, image_shape: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Reshape a batch to ``(N, H, W)`` (grey) or ``(N, H, W, C)`` for plotting.

    Flat vectors of a square length (64, 784, ...) become square images.

    Example:
        >>> as_images(torch.zeros(5, 64)).shape
        torch.Size([5, 8, 8])
    """
    x = x.detach().float().cpu()
    if image_shape is not None:
        x = x.reshape(-1, *image_shape)
    elif x.dim() == 2:
        side = math.isqrt(x.shape[1])
        if side * side != x.shape[1]:
            raise ValueError(
                f"Cannot show vectors of length {x.shape[1]} as images; pass image_shape=(H, W)."
            )
        x = x.reshape(-1, side, side)
    if x.dim() == 4:  # (N, C, H, W)
        x = x[:, 0] if x.shape[1] == 1 else x.permute(0, 2, 3, 1)
    return x.clamp(0, 1)


def image_grid(rows: Sequence[torch.Tensor], path: Union[str, Path], titles: Sequence[str] = ()) -> Path:
    """Save rows of images (each ``(N, H, W[, C])``) as one PNG; returns the path."""
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    # Figure, not pyplot: no global backend is touched, so this works on servers and in notebooks
    fig = Figure(figsize=(n_cols * 0.8, n_rows * 0.9))
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for i, row in enumerate(rows):
        for j in range(n_cols):
            ax = axes[i][j]
            ax.axis("off")
            if j < len(row):
                ax.imshow(row[j].numpy(), cmap="gray", vmin=0, vmax=1)
        if i < len(titles):
            axes[i][0].set_title(titles[i], fontsize=8, loc="left")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path


def plot_reconstructions(
    model, x: torch.Tensor, path: Union[str, Path], num: int = 10,
    image_shape: Optional[Sequence[int]] = None,
) -> Path:
    """Inputs (top) above ``model.reconstruct(x)`` (bottom)."""
    x = x[:num]
    recon = model.reconstruct(x)
    return image_grid(
        [as_images(x, image_shape), as_images(recon, image_shape)], path,
        titles=["input", "reconstruction"],
    )


def plot_samples(
    model, path: Union[str, Path], num: int = 30, per_row: int = 10,
    image_shape: Optional[Sequence[int]] = None,
) -> Path:
    """``model.sample(num)``: E[x | z] for z drawn from the prior."""
    images = as_images(model.sample(num), image_shape)
    rows = [images[i : i + per_row] for i in range(0, num, per_row)]
    return image_grid(rows, path, titles=["samples"])


def plot_loss_curves(metrics_csv: Union[str, Path], path: Union[str, Path]) -> Path:
    """Training loss and validation -ELBO per epoch from a Lightning ``metrics.csv``."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            for key, label in (("train/loss_epoch", "train -ELBO_beta"), ("val/elbo", "validation -ELBO")):
                if row.get(key):
                    xs, ys = series.setdefault(label, ([], []))
                    xs.append(float(row["epoch"]))
                    ys.append(-float(row[key]) if key == "val/elbo" else float(row[key]))
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", markersize=3, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per data point")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path
