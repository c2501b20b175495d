"""Pictures: loss curves, reconstructions, samples, latent traversals, interpolations, the 2-D manifold."""

from __future__ import annotations

import contextlib
import csv
import math
from pathlib import Path
from typing import Iterator, Literal, Optional, Sequence, Union

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .ops import standard_normal_kl

__all__ = [
    "as_images", "image_grid", "plot_reconstructions", "plot_samples", "plot_loss_curves", "kl_per_dim",
    "traversal_latents", "plot_traversals", "interpolation_latents", "plot_interpolation", "manifold_latents",
    "plot_manifold", "plot_latent_space", "plot_completions", "plot_latent_usage",
]

_PathLike = Union[str, Path]


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
                ax.imshow(row[j].detach().cpu().numpy(), cmap="gray", vmin=0, vmax=1)
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
    r"""Inputs (top row) above their reconstructions ``model.reconstruct(x)`` (bottom row).

    Arguments:
        model: a model with ``reconstruct(x)``, e.g. :math:`E[x \mid z]` at the posterior mean.
        x: a batch of inputs; the first ``num`` are shown.
        path: where to write the PNG.
        num: inputs (columns) to show.
        image_shape: shape to show one data point as, if not inferred (see :func:`as_images`).

    Example:
        >>> import tempfile, pyro_lvm
        >>> vae = pyro_lvm.VAE(data_shape=64, latent_dim=2, hidden_dims=[16])
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     plot_reconstructions(vae, torch.rand(12, 64), Path(folder) / "reconstructions.png").name
        'reconstructions.png'
    """
    x = x[:num]
    with _inference(model):
        recon = model.reconstruct(x.to(_device(model, x)))
    tiles = torch.stack([as_images(x, image_shape), as_images(recon, image_shape)])
    return save_tiles(tiles, path, ["input", "reconstruction"])


def plot_samples(
    model, path: Union[str, Path], num: int = 30, per_row: int = 10,
    image_shape: Optional[Sequence[int]] = None, title: str = "E[x | z] for z drawn from the prior",
) -> Path:
    r"""``model.sample(num)``: :math:`E[x \mid z]` for :math:`z` drawn from the prior, ``per_row`` to a row.

    Arguments:
        model: a model with ``sample(num)``.
        path: where to write the PNG.
        num: samples to draw.
        per_row: samples per row.
        image_shape: shape to show one data point as, if not inferred (see :func:`as_images`).
        title: the picture's title (a model with no latent, e.g. a flow: "draws from the model").

    Example:
        >>> import tempfile, pyro_lvm
        >>> vae = pyro_lvm.VAE(data_shape=64, latent_dim=2, hidden_dims=[16])
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     plot_samples(vae, Path(folder) / "samples.png", num=12, per_row=5).name
        'samples.png'
    """
    with _inference(model):
        images = as_images(model.sample(num), image_shape)
    n_rows = -(-num // per_row)
    blank = torch.full((n_rows * per_row - num, *images.shape[1:]), 1.0)  # white: an empty end of the last row
    tiles = torch.cat([images, blank]).reshape(n_rows, per_row, *images.shape[1:])
    return save_tiles(tiles, path, title=title)


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
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # whole epochs
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path


def plot_latent_usage(history: Sequence[dict], path: _PathLike, site: Optional[str] = None) -> Path:
    """How the code is used over training, from :attr:`pyro_lvm.training.monitor.LatentMonitor.history`.

    Left: the KL of each latent dimension per epoch (a heat map, nats per data point),
    the picture of posterior collapse (rows fading to zero). Middle: the number of
    active units and the total KL per epoch. Right, for a spatial latent map
    ``(C, H, W)``: the last epoch's KL per location (summed over channels).

    Example:
        >>> import tempfile, os
        >>> history = [{"epoch": e, "kl": 2.0 - e, "active_units": 2 - e, "sites": {"z": {
        ...     "kl": torch.tensor([1.0 - e, 1.0]), "activity": torch.ones(2)}}} for e in range(2)]
        >>> with tempfile.TemporaryDirectory() as d:
        ...     os.path.isfile(plot_latent_usage(history, os.path.join(d, "usage.png")))
        True
    """
    if not history:
        raise ValueError("No epochs in the history: train with a validation set and a LatentMonitor.")
    sites = history[-1]["sites"]
    if not sites:
        raise ValueError("The history has no local latent sites to show.")
    site = site or next(iter(sites))
    if site not in sites:
        raise ValueError(f"No site {site!r} in the history; sites: {sorted(sites)}.")
    epochs = [h["epoch"] for h in history]
    kl = torch.stack([h["sites"][site]["kl"].flatten() for h in history], dim=1)  # (D, epochs)
    shape = tuple(sites[site]["kl"].shape)
    spatial = len(shape) == 3
    fig = Figure(figsize=(4.5 * (3 if spatial else 2), 3.5))
    axes = fig.subplots(1, 3 if spatial else 2, squeeze=False)[0]
    image = axes[0].imshow(
        kl.cpu().numpy(), aspect="auto", cmap="viridis", interpolation="nearest",
        extent=(epochs[0] - 0.5, epochs[-1] + 0.5, kl.shape[0] - 0.5, -0.5),
    )
    fig.colorbar(image, ax=axes[0], label="KL (nats)")
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel(f"dimension of {site}")
    axes[0].set_title("KL per dimension", fontsize=9)
    axes[1].plot(epochs, [h["active_units"] for h in history], marker="o", markersize=3, color="C0")
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("active units", color="C0")
    axes[1].set_ylim(bottom=0)
    twin = axes[1].twinx()
    twin.plot(epochs, [h["kl"] for h in history], marker="s", markersize=3, color="C1")
    twin.set_ylabel("KL per data point (nats)", color="C1")
    axes[1].set_title("active units and KL", fontsize=9)
    for axis in (axes[0].xaxis, axes[0].yaxis, axes[1].xaxis, axes[1].yaxis):  # epochs, dimensions, units: whole
        axis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # numbers, even on a span of one
    if spatial:
        per_location = sites[site]["kl"].sum(0)
        image = axes[2].imshow(per_location.cpu().numpy(), cmap="viridis", interpolation="nearest")
        fig.colorbar(image, ax=axes[2], label="KL (nats)")
        axes[2].set_title(f"KL per location, epoch {epochs[-1]}", fontsize=9)
        axes[2].set_xticks([])
        axes[2].set_yticks([])
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path


# ----- the latent space ------------------------------------------------------------------
def kl_per_dim(loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    r"""Average KL divergence from :math:`\mathcal N(0, 1)` of each coordinate of a Gaussian :math:`q(z \mid x)`.

    For :math:`q(z_d \mid x) = \mathcal N(\mu_d, s_d^2)`, in closed form, averaged over the batch:

    .. math::

        \mathrm{KL}\big(q(z_d \mid x)\,\|\,\mathcal N(0, 1)\big)
            = \tfrac12\big(\mu_d^2 + s_d^2 - 1\big) - \log s_d .

    A coordinate with an average KL near 0 is unused: its posterior is the prior
    for every input, and the decoder ignores it. Ordering latent traversals by
    this KL shows the coordinates the model uses first (Burgess et al., 2018).

    References:
        Understanding disentangling in beta-VAE (Burgess et al., 2018), https://arxiv.org/abs/1804.03599

    Arguments:
        loc: posterior means, ``(batch, *latent_shape)``.
        scale: posterior standard deviations, the same shape.

    Example:
        >>> kl_per_dim(torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, 1.0]]))
        tensor([0., 2.])
    """
    if loc.shape != scale.shape or loc.dim() < 2:
        raise ValueError(
            f"kl_per_dim needs loc and scale of one shape (batch, *latent_shape); got "
            f"{tuple(loc.shape)} and {tuple(scale.shape)}. Pass the two outputs of model.encode(x)."
        )
    return standard_normal_kl(loc, scale).mean(0)


def traversal_latents(loc: torch.Tensor, dims: Sequence[int], values: torch.Tensor) -> torch.Tensor:
    r"""Codes that sweep one coordinate of ``loc`` at a time, the others fixed.

    Row :math:`r` and column :math:`k` of the result is ``loc`` with its
    coordinate ``dims[r]`` (an index into the flattened latent) replaced by
    ``values[k]``:

    .. math::

        z^{(r, k)}_d = \begin{cases} v_k & d = d_r \\ \mu_d & \text{otherwise.} \end{cases}

    Arguments:
        loc: one code, of shape ``latent_shape``.
        dims: indices into ``loc.flatten()`` to sweep, one row each.
        values: the values each swept coordinate takes, ``(num_steps,)``.

    Example:
        >>> traversal_latents(torch.zeros(3), dims=[1], values=torch.tensor([-1.0, 1.0]))
        tensor([[[ 0., -1.,  0.],
                 [ 0.,  1.,  0.]]])
    """
    dims = [int(d) for d in dims]
    size = loc.numel()
    if not dims or any(not -size <= d < size for d in dims):
        raise ValueError(
            f"dims must be a non-empty list of indices into the {size} latent coordinates; got {dims}."
        )
    values = torch.as_tensor(values, dtype=loc.dtype, device=loc.device)
    z = loc.reshape(1, 1, size).repeat(len(dims), len(values), 1)
    for row, d in enumerate(dims):
        z[row, :, d] = values
    return z.reshape(len(dims), len(values), *loc.shape)


def plot_traversals(
    model, x: torch.Tensor, path: _PathLike, dims: Optional[Sequence[int]] = None,
    num_steps: int = 9, span: float = 3.0, max_dims: int = 10,
    image_shape: Optional[Sequence[int]] = None,
) -> Path:
    r"""Latent traversals: one coordinate of the first input's code swept, the others fixed.

    The first input ``x[0]`` is encoded to its posterior mean :math:`\mu`; row
    :math:`r` decodes :math:`E[x \mid z]` for :math:`z = \mu` with coordinate
    :math:`d_r` set to each of ``num_steps`` evenly spaced values in
    :math:`[-\mathrm{span}, \mathrm{span}]`, in standard deviations of the prior
    :math:`z \sim \mathcal N(0, I)` (see :func:`traversal_latents`). The first
    column shows ``x[0]``. By default the rows are the (at most ``max_dims``)
    coordinates with the largest average :func:`kl_per_dim` over the batch
    ``x``, the most used first; each row is labelled with its coordinate
    (``z[d]``, or ``z[c,i,j]`` for a spatial latent of shape ``(C, H', W')``)
    and that KL in nats.

    References:
        | beta-VAE: Learning Basic Visual Concepts with a Constrained Variational Framework (Higgins et al., 2017), https://openreview.net/forum?id=Sy2fzU9gl
        | Understanding disentangling in beta-VAE (Burgess et al., 2018), https://arxiv.org/abs/1804.03599

    Arguments:
        model: a model with ``encode(x) -> (loc, scale)``, ``decode(z)`` and ``latent_shape``.
        x: a batch of inputs, ``(batch, *event_shape)``; ``x[0]`` is traversed.
        path: where to write the PNG.
        dims: indices into the flattened latent to sweep; default: the most used ones.
        num_steps: values per coordinate.
        span: the sweep covers ``[-span, span]`` prior standard deviations.
        max_dims: the most rows chosen by default.
        image_shape: shape to show one data point as, if not inferred (see :func:`as_images`).

    Example:
        >>> import tempfile, pyro_lvm
        >>> vae = pyro_lvm.VAE(data_shape=64, latent_dim=3, hidden_dims=[16])
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     plot_traversals(vae, torch.rand(8, 64), Path(folder) / "traversals.png").name
        'traversals.png'
    """
    if num_steps < 2 or span <= 0 or len(x) == 0:
        raise ValueError(
            f"plot_traversals needs at least one input, num_steps >= 2 and span > 0; got "
            f"{len(x)} inputs, num_steps={num_steps}, span={span}."
        )
    with _inference(model):
        loc, scale = _posterior(model, x, "plot_traversals")
        kl = kl_per_dim(loc, scale).flatten()
        if dims is None:
            dims = kl.argsort(descending=True)[:max_dims].tolist()
        values = torch.linspace(-span, span, num_steps)
        z = traversal_latents(loc[0], dims, values.to(loc))
        decoded = model.decode(z.flatten(0, 1))
    images = as_images(decoded, image_shape)
    inputs = as_images(x[:1], image_shape)
    tiles = torch.cat([inputs.expand(len(dims), *inputs.shape[1:])[:, None],
                       images.reshape(len(dims), num_steps, *images.shape[1:])], dim=1)
    latent_shape = tuple(loc.shape[1:])
    rows = [f"{_coordinate(d, latent_shape)}\nKL {float(kl[d]):.2f}" for d in dims]
    cols = ["input"] + [f"{v:.3g}" for v in values.tolist()]
    return save_tiles(tiles, path, rows, cols, title="latent traversals (value of the swept coordinate)")


def interpolation_latents(
    z_a: torch.Tensor, z_b: torch.Tensor, num_steps: int,
    method: Literal["linear", "slerp"] = "linear",
) -> torch.Tensor:
    r"""``num_steps`` codes from ``z_a`` to ``z_b`` (both included), stacked on a new first dimension.

    At :math:`t \in \{0, \frac{1}{n-1}, \dots, 1\}`, ``"linear"`` gives
    :math:`(1 - t)\, z_a + t\, z_b` and ``"slerp"`` (spherical interpolation,
    White 2016) gives

    .. math::

        z(t) = \frac{\sin((1 - t)\,\omega)}{\sin \omega}\, z_a + \frac{\sin(t\,\omega)}{\sin \omega}\, z_b,
        \qquad \cos \omega = \frac{\langle z_a, z_b \rangle}{\lVert z_a \rVert\, \lVert z_b \rVert},

    which keeps the norm when :math:`\lVert z_a \rVert = \lVert z_b \rVert`.
    Under a high-dimensional :math:`\mathcal N(0, I)` prior almost all mass
    lies near the sphere of radius :math:`\sqrt{\dim z}`, and the midpoint of
    a straight line between two typical codes lies well inside it, where the
    prior puts little mass; slerp stays among typical codes. Each tensor is
    one code (all its elements are one vector); for (anti)parallel codes slerp
    falls back to the straight line.

    References:
        Sampling Generative Networks (White, 2016), https://arxiv.org/abs/1609.04468

    Arguments:
        z_a: the first code, any shape.
        z_b: the last code, the same shape.
        num_steps: number of codes, at least 2.
        method: ``"linear"`` or ``"slerp"``.

    Example:
        >>> interpolation_latents(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), 3, "slerp")
        tensor([[1.0000, 0.0000],
                [0.7071, 0.7071],
                [0.0000, 1.0000]])
    """
    if z_a.shape != z_b.shape:
        raise ValueError(f"interpolation_latents needs codes of one shape; got {tuple(z_a.shape)} and {tuple(z_b.shape)}.")
    if num_steps < 2:
        raise ValueError(f"num_steps must be at least 2 (the two ends); got {num_steps}.")
    if method not in ("linear", "slerp"):
        raise ValueError(f"Unknown interpolation method {method!r}; choose 'linear' or 'slerp'.")
    t = torch.linspace(0, 1, num_steps, dtype=z_a.dtype, device=z_a.device).reshape(-1, *[1] * z_a.dim())
    if method == "slerp":
        cos = (z_a * z_b).sum() / (z_a.norm() * z_b.norm()).clamp_min(torch.finfo(z_a.dtype).tiny)
        omega = cos.clamp(-1, 1).acos()
        if omega.sin() > 1e-6:
            return (((1 - t) * omega).sin() * z_a + (t * omega).sin() * z_b) / omega.sin()
    return (1 - t) * z_a + t * z_b


def plot_interpolation(
    model, x_a: torch.Tensor, x_b: torch.Tensor, path: _PathLike, num_steps: int = 10,
    method: Literal["linear", "slerp"] = "linear", image_shape: Optional[Sequence[int]] = None,
) -> Path:
    r"""Decoded interpolations between the codes of pairs of inputs, one row per pair.

    Row :math:`i` shows ``x_a[i]``, then :math:`E[x \mid z(t)]` for
    ``num_steps`` codes :math:`z(t)` from the posterior mean of
    :math:`q(z \mid x_a[i])` (:math:`t = 0`) to that of :math:`q(z \mid x_b[i])`
    (:math:`t = 1`), then ``x_b[i]``. The codes are the posterior means, not
    draws, so the picture is deterministic; ``method="linear"`` (default) walks
    the straight line, ``method="slerp"`` the great circle, which stays among
    typical codes of a Gaussian prior (see :func:`interpolation_latents`).

    Arguments:
        model: a model with ``encode(x) -> (loc, scale)`` and ``decode(z)``.
        x_a: the inputs at the left end, ``(pairs, *event_shape)``.
        x_b: the inputs at the right end, the same shape.
        path: where to write the PNG.
        num_steps: decoded codes per row, both ends included.
        method: ``"linear"`` or ``"slerp"``.
        image_shape: shape to show one data point as, if not inferred (see :func:`as_images`).

    Example:
        >>> import tempfile, pyro_lvm
        >>> vae = pyro_lvm.VAE(data_shape=64, latent_dim=2, hidden_dims=[16])
        >>> x = torch.rand(4, 64)
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     plot_interpolation(vae, x[:2], x[2:], Path(folder) / "interpolation.png").name
        'interpolation.png'
    """
    if x_a.shape != x_b.shape or len(x_a) == 0:
        raise ValueError(
            f"plot_interpolation needs x_a and x_b of one shape (pairs, *event_shape), with at "
            f"least one pair; got {tuple(x_a.shape)} and {tuple(x_b.shape)}."
        )
    with _inference(model):
        loc_a, _ = _posterior(model, x_a, "plot_interpolation")
        loc_b, _ = _posterior(model, x_b, "plot_interpolation")
        z = torch.stack([interpolation_latents(a, b, num_steps, method) for a, b in zip(loc_a, loc_b)])
        decoded = model.decode(z.flatten(0, 1))
    images = as_images(decoded, image_shape)
    tiles = torch.cat([as_images(x_a, image_shape)[:, None],
                       images.reshape(len(x_a), num_steps, *images.shape[1:]),
                       as_images(x_b, image_shape)[:, None]], dim=1)
    t = torch.linspace(0, 1, num_steps).tolist()
    cols = ["x_a"] + [f"{v:.2g}" for v in t] + ["x_b"]
    rows = [f"pair {i + 1}" for i in range(len(x_a))]
    return save_tiles(tiles, path, rows, cols, title=f"{method} interpolation of posterior means (t)")


def manifold_latents(num: int = 15) -> torch.Tensor:
    r"""A ``num`` by ``num`` grid of 2-D codes at quantiles of the standard normal, ``(num, num, 2)``.

    The coordinates are :math:`\Phi^{-1}\big(\frac{k + 1/2}{\mathrm{num}}\big)`,
    :math:`k = 0, \dots, \mathrm{num} - 1`: an evenly spaced grid in
    :math:`(0, 1)` through the inverse CDF of :math:`\mathcal N(0, 1)`, so each
    code stands for an equal share of the prior's mass (Kingma & Welling,
    2014, Fig. 4). ``grid[i, j] = (q[j], q[num - 1 - i])``: :math:`z_1` grows
    to the right, :math:`z_2` upwards, as on a plot's axes.

    References:
        Auto-Encoding Variational Bayes (Kingma & Welling, 2014), https://arxiv.org/abs/1312.6114

    Arguments:
        num: codes per side.

    Example:
        >>> manifold_latents(3)[..., 0]
        tensor([[-0.9674,  0.0000,  0.9674],
                [-0.9674,  0.0000,  0.9674],
                [-0.9674,  0.0000,  0.9674]])
    """
    if num < 1:
        raise ValueError(f"num must be a positive number of codes per side; got {num}.")
    probabilities = (torch.arange(num, dtype=torch.float64) + 0.5) / num
    q = torch.distributions.Normal(0.0, 1.0).icdf(probabilities).float()
    z1, z2 = torch.meshgrid(q, q.flip(0), indexing="xy")
    return torch.stack([z1, z2], dim=-1)


def plot_manifold(
    model, path: _PathLike, num: int = 15, image_shape: Optional[Sequence[int]] = None,
) -> Path:
    r"""The learned 2-D manifold: :math:`E[x \mid z]` on the grid of :func:`manifold_latents`.

    Only for a model whose latent has exactly two coordinates (a ``latent_shape``
    of two elements) and a standard normal prior; for larger latents use
    :func:`plot_traversals`.

    References:
        Auto-Encoding Variational Bayes (Kingma & Welling, 2014), https://arxiv.org/abs/1312.6114

    Arguments:
        model: a model with ``decode(z)``, ``latent_shape`` and ``prior()``.
        path: where to write the PNG.
        num: codes per side.
        image_shape: shape to show one data point as, if not inferred (see :func:`as_images`).

    Example:
        >>> import tempfile, pyro_lvm
        >>> vae = pyro_lvm.VAE(data_shape=64, latent_dim=2, hidden_dims=[16])
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     plot_manifold(vae, Path(folder) / "manifold.png", num=5).name
        'manifold.png'
    """
    _check_2d_latent(model, "plot_manifold")
    _check_gaussian_prior(model, "plot_manifold")
    grid = manifold_latents(num)
    with _inference(model):
        reference = _reference(model)
        z = grid.reshape(num * num, *model.latent_shape)
        decoded = model.decode(z.to(reference) if reference is not None else z)
    images = as_images(decoded, image_shape)
    q = [f"{v:.2g}" for v in grid[0, :, 0].tolist()]
    return save_tiles(images.reshape(num, num, *images.shape[1:]), path, q[::-1], q,
                       title="E[x | z] at prior quantiles (z1 across, z2 up)", tile_inches=0.45)


def plot_latent_space(
    model, x: torch.Tensor, path: _PathLike, labels: Optional[torch.Tensor] = None,
) -> Path:
    r"""Scatter of the posterior means :math:`\mu(x)` of a 2-D latent, coloured by ``labels`` if given.

    Arguments:
        model: a model with a 2-D latent and ``encode(x) -> (loc, scale)``.
        x: inputs, ``(N, *event_shape)``.
        path: where to write the PNG.
        labels: optional integer class of each input, ``(N,)``.

    Example:
        >>> import tempfile, pyro_lvm
        >>> vae = pyro_lvm.VAE(data_shape=64, latent_dim=2, hidden_dims=[16])
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     plot_latent_space(vae, torch.rand(20, 64), Path(folder) / "latent_space.png",
        ...                       labels=torch.arange(20) % 3).name
        'latent_space.png'
    """
    _check_2d_latent(model, "plot_latent_space")
    if labels is not None and len(labels) != len(x):
        raise ValueError(f"labels must hold one label per input ({len(x)}); got {len(labels)}.")
    with _inference(model):
        loc, _ = _posterior(model, x, "plot_latent_space")
    loc = loc.reshape(len(x), 2).cpu().float().numpy()
    fig = Figure(figsize=(5, 4.2))
    ax = fig.subplots()
    if labels is None:
        ax.scatter(loc[:, 0], loc[:, 1], s=10)
    else:
        points = ax.scatter(loc[:, 0], loc[:, 1], c=np.asarray(labels.cpu()), cmap="tab10", s=10)
        fig.colorbar(points, ax=ax, label="label")
    ax.set(xlabel="$z_1$", ylabel="$z_2$", title="posterior means $E[z \\mid x]$")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path


def plot_completions(
    model, x: torch.Tensor, y: torch.Tensor, path: _PathLike, num: int = 8, num_samples: int = 3,
    image_shape: Optional[Sequence[int]] = None,
) -> Path:
    r"""Completions by a conditional model: the partial input, predicted completions, the truth.

    For a model :math:`p(y \mid x)` with ``predict(x, num_samples, mean=True)``
    (e.g. a conditional VAE, whose ``predict`` decodes :math:`E[y \mid x, z]`
    for draws :math:`z \sim p(z \mid x)`), the columns are ``num`` examples and
    the rows are the input ``x`` (hidden pixels, value -1, shown grey), one row
    per prediction, and the full image ``y``. A prediction shows the visible pixels
    of the input and the model's output on the hidden ones only (the likelihood
    never scores the visible ones, so the model's output there is meaningless).

    Arguments:
        model: a model with ``predict(x, num_samples=..., mean=True)`` returning ``(num_samples, B, *shape)``.
        x: the partial inputs, ``(B, *shape)``, -1 where hidden.
        y: the full images, the same shape.
        path: where to write the PNG.
        num: examples (columns) to show.
        num_samples: predictions per example.
        image_shape: shape to show one data point as, if not inferred (see :func:`as_images`).

    Example:
        >>> import tempfile
        >>> class Copy:  # a stand-in that "predicts" the input
        ...     def predict(self, x, num_samples=1, mean=True):
        ...         return x.clamp(0, 1).expand(num_samples, *x.shape)
        >>> x, y = torch.rand(4, 64), torch.rand(4, 64)
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     plot_completions(Copy(), x, y, Path(folder) / "completions.png").name
        'completions.png'
    """
    if x.shape != y.shape:
        raise ValueError(f"plot_completions needs x and y of one shape; got {tuple(x.shape)} and {tuple(y.shape)}.")
    if not hasattr(model, "predict"):
        raise ValueError(
            f"plot_completions needs a conditional model with predict(x, num_samples, mean); "
            f"{type(model).__name__} has none."
        )
    x, y = x[:num], y[:num]
    with _inference(model):
        predictions = model.predict(x.to(_device(model, x)), num_samples=num_samples, mean=True)
    predictions = torch.where(x < 0, predictions.to(x.device), x)
    shown = as_images(torch.where(x < 0, 0.5, x), image_shape)
    predicted = as_images(predictions.flatten(0, 1), image_shape).reshape(num_samples, *shown.shape)
    tiles = torch.stack([shown, *predicted, as_images(y, image_shape)])
    rows = ["input"] + [f"completion {k + 1}" for k in range(num_samples)] + ["truth"]
    return save_tiles(tiles, path, rows, title="completions (hidden input pixels grey)")


# ----- helpers -----------------------------------------------------------------------------
def _reference(model) -> Optional[torch.Tensor]:
    """A parameter of the model (its device and dtype), or None for a model without any."""
    parameters = getattr(model, "parameters", None)
    return next(parameters(), None) if callable(parameters) else None


def _device(model, x: torch.Tensor) -> torch.device:
    reference = _reference(model)
    return x.device if reference is None else reference.device


@contextlib.contextmanager
def _inference(model) -> Iterator[None]:
    """Evaluation mode (no dropout, batch-norm running statistics) and no gradients, then restore."""
    training = getattr(model, "training", None)
    if training is not None:
        model.train(False)
    try:
        with torch.no_grad():
            yield
    finally:
        if training is not None:
            model.train(training)


def _posterior(model, x: torch.Tensor, picture: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``model.encode(x)``, checked to be the (loc, scale) of a Gaussian q(z | x)."""
    out = model.encode(x.to(_device(model, x)))
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise ValueError(
            f"{picture} needs a Gaussian q(z | x): model.encode(x) returning (loc, scale), as "
            f"pyro_lvm.VAE's does; {type(model).__name__}.encode returns "
            f"{type(out).__name__ if not isinstance(out, torch.Tensor) else 'one tensor'}."
        )
    return out[0], out[1]


def _check_2d_latent(model, picture: str) -> None:
    latent_shape = tuple(getattr(model, "latent_shape", ()))
    if math.prod(latent_shape) != 2 or not latent_shape:
        raise ValueError(
            f"{picture} needs a model whose latent has exactly 2 coordinates; "
            f"{type(model).__name__} has latent_shape {latent_shape} ({math.prod(latent_shape)} "
            f"coordinates). Use plot_traversals for larger latents, or train with latent_dim=2."
        )


def _check_gaussian_prior(model, picture: str) -> None:
    prior = model.prior()
    while isinstance(prior, torch.distributions.Independent):
        prior = prior.base_dist
    if not isinstance(prior, torch.distributions.Normal):
        raise ValueError(
            f"{picture} places codes at quantiles of N(0, 1): it needs a Gaussian prior over z; "
            f"{type(model).__name__}.prior() is {type(prior).__name__}."
        )


def _coordinate(dim: int, latent_shape: tuple[int, ...]) -> str:
    """``z[d]`` for a flat latent, ``z[c,i,j]`` for a spatial one (``dim`` indexes the flattened latent)."""
    index = np.unravel_index(dim % math.prod(latent_shape), latent_shape)
    return f"z[{','.join(str(int(i)) for i in index)}]"


def save_tiles(
    tiles: torch.Tensor, path: _PathLike, row_labels: Sequence[str] = (),
    col_labels: Sequence[str] = (), title: str = "", tile_inches: float = 0.6,
) -> Path:
    """Save a ``(rows, cols, H, W[, 3])`` grid of images as one labelled image in a PNG.

    One ``imshow`` of the tiled canvas (1-pixel white seams) rather than one axes
    per image: a 15 x 15 manifold draws in a fraction of a second. The margins
    are fixed in inches, so each tile is ``tile_inches`` high at any grid size.
    """
    n_rows, n_cols, height, width = tiles.shape[:4]
    # a white seam after every tile, (rows, H + 1, cols, W + 1[, 3]) flattened to one image, the last seams cut
    seams = torch.nn.functional.pad(tiles.float(), (0, 0) * (tiles.dim() - 4) + (0, 1, 0, 1), value=1.0)
    canvas = seams.transpose(1, 2).reshape(n_rows * (height + 1), n_cols * (width + 1), *tiles.shape[4:])[:-1, :-1]
    left = 0.95 if row_labels else 0.1
    top, bottom, right = 0.3, 0.3 if col_labels else 0.1, 0.1
    tile_w = tile_inches * width / height
    fig_w, fig_h = left + right + n_cols * tile_w, top + bottom + n_rows * tile_inches
    fig = Figure(figsize=(fig_w, fig_h))
    ax = fig.add_axes((left / fig_w, bottom / fig_h, n_cols * tile_w / fig_w, n_rows * tile_inches / fig_h))
    ax.imshow(canvas.cpu().numpy(), cmap="gray", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    ax.set_xticks([j * (width + 1) + (width - 1) / 2 for j in range(len(col_labels))], list(col_labels), fontsize=7)
    ax.set_yticks([i * (height + 1) + (height - 1) / 2 for i in range(len(row_labels))], list(row_labels), fontsize=7)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        ax.set_title(title, fontsize=8, loc="left")
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path
