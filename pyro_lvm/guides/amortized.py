"""The amortized Gaussian guide q_phi(z | x): one encoder for every input."""

from __future__ import annotations

from typing import Any, Optional

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn
from torch.nn.functional import softplus

from .common import guide_plate

__all__ = ["AmortizedGuide"]


class AmortizedGuide(PyroModule):
    r"""The amortized Gaussian guide of a model with one local latent vector per data point.

    An encoder network maps each data point to the parameters of its posterior
    approximation (Kingma & Welling 2014):

    .. math::

        q_\phi(z_i \mid x_i) = \mathcal N\big(z_i \mid \mu_\phi(x_i),
            \operatorname{diag} \sigma_\phi(x_i)^2\big),

    so the number of variational parameters :math:`|\phi|` does not grow with the
    number of data points, and a new :math:`x` costs one forward pass. The site
    ``site`` is sampled inside ``pyro.plate(plate, batch)``, or with ``num_data``
    inside ``pyro.plate(plate, num_data, subsample=arange(batch))``: the
    convention of :class:`pyro_lvm.VAE`, whose own ``guide`` is this guide. The
    model must use the same plate. Keyword arguments other than ``num_data``
    (e.g. a batch's ``index``) are ignored.

    References:
        Auto-Encoding Variational Bayes (Kingma & Welling, 2014), https://arxiv.org/abs/1312.6114

    Arguments:
        encoder: a module mapping a batch ``x`` to ``(loc, scale)``, or to one tensor of
            ``2 * latent_dim`` columns split into ``loc`` and ``softplus(raw) + 1e-5``.
        site: the name of the model's local latent sample site.
        plate: the name of the model's data plate.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> def model(x):
        ...     with pyro.plate("data", x.shape[0]):
        ...         z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.).to_event(1))
        ...         pyro.sample("x", dist.Normal(z, 1.).to_event(1), obs=x)
        >>> guide = AmortizedGuide(torch.nn.Linear(2, 4))
        >>> x = torch.randn(8, 2)
        >>> guide(x).shape
        torch.Size([8, 2])
        >>> loss = pyro.infer.Trace_ELBO().differentiable_loss(model, guide, x)
        >>> loss.backward()  # gradients reach the encoder
        >>> guide.encoder.weight.grad.abs().sum() > 0
        tensor(True)
    """

    def __init__(self, encoder: nn.Module, site: str = "z", plate: str = "data"):
        super().__init__()
        self.encoder = encoder
        self.site = site
        self.plate = plate

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of :math:`q_\\phi(z \\mid x)`."""
        out = self.encoder(x)
        if isinstance(out, (tuple, list)):
            loc, scale = out
            return loc, scale
        if out.shape[-1] % 2:
            raise ValueError(
                f"AmortizedGuide's encoder returned {out.shape[-1]} columns; a single tensor must hold "
                "2 * latent_dim columns (loc, then raw scale). Return (loc, scale) or an even width."
            )
        loc, raw = out.chunk(2, dim=-1)
        return loc, softplus(raw) + 1e-5

    def forward(self, x: torch.Tensor, num_data: Optional[int] = None, **kwargs: Any) -> torch.Tensor:
        loc, scale = self.encode(x)
        with guide_plate(self.plate, x, num_data):
            return pyro.sample(self.site, dist.Normal(loc, scale).to_event(1))

    def extra_repr(self) -> str:
        return f"site={self.site!r}, plate={self.plate!r}"
