"""What pyro_lvm's built-in models share: the data plate, input checks, and conveniences."""

from __future__ import annotations

import math
from typing import Callable, Optional

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.util import is_validation_enabled
from pyro.nn import PyroModule

from ..likelihoods import Likelihood

__all__ = ["LatentVariableModel", "DataChecks", "data_plate"]


def data_plate(x: torch.Tensor, num_data: Optional[int] = None) -> pyro.plate:
    r"""The plate ``"data"`` of the batch ``x`` (its first dimension), scaled to ``num_data`` points when given.

    With ``num_data`` the batch is a mini-batch of a data set of ``num_data`` points, and the plate scales
    its log-densities by ``num_data / len(x)``: an unbiased estimate of the whole data set's.

    Example:
        >>> with data_plate(torch.zeros(4, 2), num_data=100) as index:
        ...     pass
        >>> len(index)
        4
    """
    batch = x.shape[0]
    if num_data is None:
        return pyro.plate("data", batch)
    return pyro.plate("data", num_data, subsample=torch.arange(batch, device=x.device))


class DataChecks:
    """Checks of the data against a model's ``event_shape`` and ``likelihood``, batch by batch and whole.

    Shared by :class:`LatentVariableModel` and the conditional models of :mod:`pyro_lvm.models.cvae`.
    """

    event_shape: torch.Size
    likelihood: Likelihood

    def check_batch(self, x: torch.Tensor, support: bool = True, shape: Optional[torch.Size] = None,
                    name: str = "x", arg: str = "data_shape") -> None:
        """While Pyro's validation is on, raise a ``ValueError`` if ``x`` is not a batch the model can score.

        The shape ``(batch, *event_shape)`` (or ``shape``), then with ``support`` the likelihood's support
        (:meth:`pyro_lvm.likelihoods.Likelihood.check`). ``name`` and ``arg`` name the input and the
        constructor argument that sets its shape in the message.
        """
        if not is_validation_enabled():
            return
        shape = self.event_shape if shape is None else shape
        if x.dim() != len(shape) + 1 or x.shape[1:] != shape:
            raise ValueError(
                f"{type(self).__name__} expects {'a batch' if name == 'x' else 'a batch of ' + name} of shape (batch, {', '.join(map(str, shape))}); "
                f"got {tuple(x.shape)}. Set {arg} to the data's shape, or reshape the data."
            )
        if support:
            self.likelihood.check(x)

    @torch.no_grad()
    def check_data(self, x: torch.Tensor, name: str = "data", chunk: int = 4096,
                   rows: Optional[torch.Tensor] = None) -> None:
        """Raise a ``ValueError`` if any row of ``x`` is not data the model can score, naming the first.

        The shape and the likelihood's support (a Bernoulli likelihood's 0s and 1s), over all of ``x``
        in chunks: :class:`pyro_lvm.LVMModule` runs it once on every split of a pyro_lvm data module
        before training (the training step itself checks some batches only). ``rows``: each row's
        position in the source data, to name in the message (default: its position in ``x``).

        Example:
            >>> from pyro_lvm import VAE
            >>> x = torch.zeros(1000, 4)
            >>> x[700, 1] = 0.5
            >>> VAE(data_shape=4, latent_dim=2, hidden_dims=[8]).check_data(x, "the train split")
            Traceback (most recent call last):
            ...
            ValueError: the train split, row 700: Bernoulli likelihood needs binary data (0 or 1); ...
        """
        if len(x):
            self.check_batch(x[:1], support=False)  # the shape, once: every row has the same
        for start in range(0, len(x), chunk):
            part = x[start:start + chunk]
            try:
                self.check_batch(part, shape=self.event_shape)
            except ValueError:
                for i in range(len(part)):  # the first row that fails, and its message
                    try:
                        self.check_batch(part[i:i + 1], shape=self.event_shape)
                    except ValueError as err:
                        row = start + i if rows is None else int(rows[start + i])
                        raise ValueError(f"{name}, row {row}: {err}") from None
                raise


class LatentVariableModel(DataChecks, PyroModule):
    r"""Base class of the built-in models: a Pyro model/guide pair with image conveniences.

    A subclass sets ``event_shape`` (one data point's shape), ``latent_shape``
    (the event shape of the latent site ``"z"`` that pictures and traversals use),
    ``likelihood`` (a :class:`pyro_lvm.likelihoods.Likelihood`), and implements
    :meth:`encode` (mean and standard deviation of :math:`q(z \mid x)`) and
    :meth:`decoder_output` (the likelihood's input for a ``z``). It inherits

    * the data plate convention: latents and observations live in ``pyro.plate("data")``,
      which scales a mini-batch up to ``num_data`` points when that is given;
    * :meth:`model` (``z ~ p(z)``, ``x ~ p(x | z)`` observed) and :meth:`guide`
      (``z ~ q(z | x)``, :meth:`posterior`), with the networks ``encoder``,
      ``decoder`` and ``likelihood`` registered by ``pyro.module``;
    * input checks (shape, NaNs, the likelihood's support) while Pyro's validation is on;
    * :meth:`prior` (:math:`\mathcal N(0, I)` over ``latent_shape``), :meth:`decode`,
      :meth:`reconstruct`, :meth:`sample` and :meth:`example_batch`.
    """

    event_shape: torch.Size
    latent_shape: torch.Size
    likelihood: Likelihood

    #: the methods among ``model``, ``guide``, ``prior`` and ``posterior`` that this class redefines while
    #: keeping the base class's meaning (e.g. only registering more modules); a subclass that redefines one
    #: again must list it again. The fast training step asks :meth:`fast_path_blocker` and
    #: :meth:`standard_gaussian_latents`, which read it.
    keeps_base_meaning: tuple[str, ...] = ()

    # ----- to implement ------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of q(z | x), each of shape ``(..., *latent_shape)``."""
        raise NotImplementedError

    def decoder_output(self, z: torch.Tensor) -> torch.Tensor:
        """The likelihood's (flat) input for ``z`` of shape ``(..., *latent_shape)``."""
        raise NotImplementedError

    # ----- the Pyro model/guide pair -------------------------------------------------
    def model(self, x: torch.Tensor, num_data: Optional[int] = None) -> torch.Tensor:
        """p(x, z): ``z ~ p(z)`` (:meth:`prior`), ``x ~ p(x | z)``; observes ``x``."""
        self.check_batch(x)
        pyro.module("decoder", self.decoder)
        pyro.module("likelihood", self.likelihood)
        with data_plate(x, num_data):
            z = pyro.sample("z", self.prior())
            return pyro.sample("x", self.likelihood(self.decoder_output(z)), obs=x)

    def guide(self, x: torch.Tensor, num_data: Optional[int] = None) -> torch.Tensor:
        """q(z | x) (:meth:`posterior`): the amortized encoder."""
        self.check_batch(x, support=False)
        pyro.module("encoder", self.encoder)
        with data_plate(x, num_data):
            return pyro.sample("z", self.posterior(x))

    def posterior(self, x: torch.Tensor) -> dist.TorchDistribution:
        """q(z | x) = N(mu(x), diag sigma(x)^2) over ``latent_shape`` (from :meth:`encode`)."""
        loc, scale = self.encode(x)
        return dist.Normal(loc, scale).to_event(len(self.latent_shape))

    # ----- what the fast training step asks -------------------------------------------
    def _redefined(self, names: tuple[str, ...]) -> list[str]:
        """Those of ``names`` that a subclass redefines with a meaning of its own."""
        out = []
        for name in names:
            owner = next(cls for cls in type(self).__mro__ if name in cls.__dict__)
            if owner is not LatentVariableModel and name not in owner.__dict__.get("keeps_base_meaning", ()):
                out.append(name)
        return out

    def fast_path_blocker(self) -> Optional[str]:
        r"""Why this pair is not the base class's structure, or ``None`` when it is.

        The structure: ``z ~`` :meth:`prior`, ``x ~ likelihood(decoder_output(z))`` in the data plate, and the
        guide ``z ~`` :meth:`posterior` ``(x)``. A training step may then compute
        :math:`\log p(x \mid z) + \log p(z) - \log q(z \mid x)` from these parts directly, without Pyro's
        tracing (:mod:`pyro_lvm.training.fast_step`). A subclass with a model or guide of its own says no.

        Example:
            >>> from pyro_lvm import VAE, HierarchicalVAE
            >>> VAE(data_shape=4, latent_dim=2, hidden_dims=[8]).fast_path_blocker() is None
            True
            >>> HierarchicalVAE(data_shape=4, latent_dims=[2, 2], hidden_dims=[[8], [8]]).fast_path_blocker()
            'HierarchicalVAE has a model of its own'
        """
        redefined = self._redefined(("model", "guide"))
        return f"{type(self).__name__} has a {redefined[0]} of its own" if redefined else None

    def standard_gaussian_latents(self) -> bool:
        r"""Whether :math:`q(z \mid x)` is :meth:`encode`'s diagonal Gaussian and :math:`p(z) = \mathcal N(0, I)`.

        Then :math:`\log p(z) - \log q(z \mid x)` and the KL have closed forms
        (:func:`pyro_lvm.ops.standard_normal_kl`), which the fast training step uses.
        """
        return not self._redefined(("prior", "posterior"))

    def written_out_prior(self) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        r"""``z -> log p(z)`` per draw without distribution objects, for a prior other than :math:`\mathcal N(0, I)`.

        ``None`` here; a model whose posterior is :meth:`encode`'s diagonal Gaussian and whose prior has a
        written-out log-density (:class:`pyro_lvm.VAE` with a VampPrior) returns it, and the fast training
        step then applies.
        """
        return None

    # ----- shared ------------------------------------------------------------------
    @property
    def _reference(self) -> torch.Tensor:
        """A parameter of the model: where new tensors get their device and dtype."""
        return next(self.parameters())

    @property
    def num_latent_dims(self) -> int:
        """Number of scalar latent variables in ``z`` (the product of ``latent_shape``)."""
        return math.prod(self.latent_shape)

    def prior(self, batch_shape: torch.Size = torch.Size()) -> dist.TorchDistribution:
        """p(z) = N(0, I) over ``latent_shape``, with the given batch shape."""
        zeros = self._reference.new_zeros(torch.Size(batch_shape) + self.latent_shape)
        return dist.Normal(zeros, 1.0).to_event(len(self.latent_shape))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """E[x | z] for ``z`` of shape ``(..., *latent_shape)``, e.g. pixel probabilities."""
        return self.likelihood.mean(self.decoder_output(z))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """E[x | z] at z = the posterior mean (or a posterior draw if ``sample``)."""
        loc, scale = self.encode(x)
        return self.decode(loc + scale * torch.randn_like(scale) if sample else loc)

    @torch.no_grad()
    def sample(self, num_samples: int, mean: bool = True) -> torch.Tensor:
        """Draw ``x`` from the model: E[x | z] (``mean=True``) or a draw of x, z ~ p(z)."""
        z = self.prior(torch.Size([num_samples])).sample()
        h = self.decoder_output(z)
        return self.likelihood.mean(h) if mean else self.likelihood(h).sample()

    def example_batch(self, batch_size: int = 2) -> torch.Tensor:
        """A valid batch of zeros of the data's shape (to check an estimator against the pair)."""
        return self._reference.new_zeros((batch_size,) + tuple(self.event_shape))

    def extra_repr(self) -> str:
        return f"latent_shape={tuple(self.latent_shape)}, event_shape={tuple(self.event_shape)}"
