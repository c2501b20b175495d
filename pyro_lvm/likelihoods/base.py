"""The base class of the observation models p(x | z): binding to a data shape, reading the decoder's output, checks."""

from __future__ import annotations

import copy
import math
import operator
from typing import Any, Optional, Sequence, Union

import pyro.distributions as dist
import torch
from torch import nn


__all__ = ["Likelihood"]


def _index(value: Any) -> Optional[int]:
    """``value`` as an int if it is an integer (Python's, numpy's, a 0-dim integer tensor), else ``None``."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def plain_shape(event_shape: Union[None, int, Sequence[int]]) -> Union[None, int, list]:
    """``event_shape`` as plain data for a configuration: ``None``, an int or a list."""
    if event_shape is None:
        return None
    single = _index(event_shape)
    if single is not None:
        return single
    try:
        return [size if (size := _index(s)) is not None else s for s in event_shape]
    except TypeError:
        return event_shape  # not a shape: bind names the problem


def _as_event_shape(event_shape: Union[int, Sequence[int]], owner: str) -> torch.Size:
    """``event_shape`` as a ``torch.Size`` of positive sizes, or a ``ValueError`` naming ``owner``."""
    plain = plain_shape(event_shape)
    sizes = [plain] if isinstance(plain, int) else plain
    if not isinstance(sizes, list) or len(sizes) == 0 or not all(type(s) is int and s >= 1 for s in sizes):
        raise ValueError(
            f"{owner} needs event_shape, the shape of one data point, as an int or a non-empty list of positive "
            f"ints, e.g. 784 or [1, 28, 28]; got {event_shape!r}."
        )
    return torch.Size(sizes)


class Likelihood(nn.Module):
    r"""Base class of observation models: a *part* that turns a decoder's output into a distribution over ``x``.

    A likelihood maps the decoder's flat output ``h`` of shape ``(..., output_dim)`` to a
    distribution over ``x`` with ``event_shape`` equal to the data's shape, and checks that data lie
    in its support before any work is done.

    **Parameters per value.** A likelihood reads :attr:`params_per_value` numbers :math:`P` of the
    decoder for each of the :math:`D` = ``data_dim`` values of ``x`` (a Bernoulli's logit: 1; a
    mixture of :math:`M` logistics: :math:`3M`; a categorical over 256 levels: 256), so the decoder
    emits :attr:`output_dim` :math:`= P D` numbers. They are read as ``(..., P, *event_shape)``
    (:meth:`param_groups`): the :math:`P` groups outermost, each a whole image, so that a
    convolutional decoder with :math:`P C` output channels, flattened, lays out the same way.

    **Binding.** Built with ``event_shape=None`` (as a YAML configuration or a model's argument
    writes it, without repeating the data's shape), a likelihood is *unbound*: a model binds it to
    its data shape with :meth:`bind`, which sets ``event_shape`` and ``data_dim`` and creates the
    parameters that depend on the shape (e.g. :class:`GaussianLikelihood`'s learned scales).
    Binding to the same shape again does nothing; to another one is a ``ValueError``. A subclass
    creates such parameters in :meth:`_on_bind`, and an unbound likelihood refuses to be used.

    Arguments:
        event_shape: the shape of one data point, e.g. ``(784,)`` or ``(1, 28, 28)``; ``None``
            leaves the likelihood unbound until :meth:`bind`.

    Example:
        >>> from pyro_lvm.likelihoods import BernoulliLikelihood, DiscretizedLogisticMixtureLikelihood
        >>> lik = BernoulliLikelihood()  # unbound: the model sets the shape
        >>> lik.event_shape is None
        True
        >>> lik.bind((1, 2, 2)).output_dim, lik.event_shape
        (4, torch.Size([1, 2, 2]))
        >>> DiscretizedLogisticMixtureLikelihood([1, 2, 2], num_components=5).output_dim  # 3 * 5 * 4
        60
    """

    #: how many numbers of the decoder's output the likelihood reads per value of ``x``
    params_per_value: int = 1

    def __init__(self, event_shape: Union[None, int, Sequence[int]] = None):
        super().__init__()
        self.event_shape: Optional[torch.Size] = None
        self.data_dim: Optional[int] = None
        self._config: dict[str, Any] = {"event_shape": plain_shape(event_shape)}
        if event_shape is not None:
            self.bind(event_shape)

    # ----- binding -------------------------------------------------------------------
    @property
    def is_bound(self) -> bool:
        """Whether :meth:`bind` has set ``event_shape``."""
        return self.event_shape is not None

    def bind(self, event_shape: Union[int, Sequence[int]]) -> "Likelihood":
        """Set ``event_shape`` and ``data_dim``, and create the parameters that depend on them; returns ``self``.

        Binding an already bound likelihood to its own shape does nothing; to another shape raises a
        ``ValueError`` (a likelihood's parameters serve one data shape).
        """
        shape = _as_event_shape(event_shape, type(self).__name__)
        if self.event_shape is not None:
            if shape == self.event_shape:
                return self
            raise ValueError(
                f"{type(self).__name__} is bound to event_shape {tuple(self.event_shape)} and cannot be bound to "
                f"{tuple(shape)}: its parameters serve one data shape. Leave the likelihood's event_shape out "
                "(the model binds it to its data_shape), make the two shapes agree, or build a new likelihood "
                "for each model."
            )
        self.event_shape = shape
        self.data_dim = math.prod(shape)
        self._on_bind()
        return self

    def _on_bind(self) -> None:
        """Create the parameters that depend on ``event_shape`` (called once, by :meth:`bind`)."""

    def _require_bound(self) -> torch.Size:
        if self.event_shape is None:
            name = type(self).__name__
            raise ValueError(
                f"This {name} is unbound: it has no event_shape yet. Give it to a model, which binds it to its "
                f"data_shape, or bind it yourself: {name}(event_shape=...) or likelihood.bind(event_shape)."
            )
        return self.event_shape

    @property
    def output_dim(self) -> int:
        """The size of the decoder output this likelihood needs: ``params_per_value * data_dim``."""
        self._require_bound()
        return self.params_per_value * self.data_dim

    @property
    def config(self) -> dict[str, Any]:
        """The init arguments (plain data) that rebuild this likelihood: ``type(lik)(**lik.config)``.

        ``event_shape`` as it was given (``None`` when a model bound it).

        Example:
            >>> from pyro_lvm.likelihoods import GaussianLikelihood
            >>> GaussianLikelihood(scale=0.5).config
            {'event_shape': None, 'scale': 0.5, 'min_scale': 0.001}
        """
        return copy.deepcopy(self._config)

    # ----- reading the decoder's output ------------------------------------------------
    def _unflatten(self, h: torch.Tensor) -> torch.Tensor:
        return h.reshape(h.shape[:-1] + self._require_bound())

    def param_groups(self, h: torch.Tensor) -> torch.Tensor:
        """The decoder's flat output ``(..., P * D)`` read as ``(..., P, *event_shape)``, ``P`` = :attr:`params_per_value`.

        Example:
            >>> from pyro_lvm.likelihoods import CategoricalLikelihood
            >>> lik = CategoricalLikelihood((1, 2, 2), levels=3)
            >>> lik.param_groups(torch.arange(12.0)[None]).shape  # 3 groups of a 1x2x2 image
            torch.Size([1, 3, 1, 2, 2])
        """
        shape = self._require_bound()
        if h.shape[-1:] != (self.output_dim,):
            raise ValueError(
                f"{type(self).__name__} reads {self.params_per_value} parameter(s) per value of x, "
                f"output_dim = {self.params_per_value} x {self.data_dim} = {self.output_dim} numbers of the decoder; "
                f"got an output of shape {tuple(h.shape)}. Size the decoder's last layer by likelihood.output_dim."
            )
        return h.reshape(h.shape[:-1] + (self.params_per_value,) + shape)

    def forward(self, h: torch.Tensor) -> dist.TorchDistribution:
        raise NotImplementedError

    def mean(self, h: torch.Tensor) -> torch.Tensor:
        """E[x | z] for decoder output ``h``."""
        raise NotImplementedError

    def log_density(self, h: torch.Tensor, x: torch.Tensor, reduce: bool = False) -> Optional[torch.Tensor]:
        r""":math:`\log p(x \mid z)` written out for decoder output ``h`` of shape ``(..., output_dim)``, or ``None``.

        Per coordinate of ``x`` (the shape of ``h`` unflattened, ``x`` broadcast to it), or with ``reduce``
        the total over everything; the same numbers as ``self(h).log_prob(x)`` without building a
        distribution. A likelihood with such a form says so by returning it: the fast training step of the
        built-in models (:mod:`pyro_lvm.training.fast_step`) asks for it and otherwise uses ``self(h)``.
        ``None`` here: a subclass without a closed form keeps this.
        """
        return None

    def check(self, x: torch.Tensor) -> None:
        """Raise a ``ValueError`` naming the problem if ``x`` cannot be scored.

        One pass over the batch (and one host sync); details are computed only on failure.
        """
        self._check_shape(x)
        if not torch.isfinite(x).all():
            self._raise_not_finite(x)

    def _check_shape(self, x: torch.Tensor) -> None:
        shape = self._require_bound()
        if x.shape[-len(shape) :] != shape:
            raise ValueError(
                f"{type(self).__name__} expects data of shape (batch, "
                f"{', '.join(map(str, shape))}); got {tuple(x.shape)}. "
                "Set the model's data_shape to match the data, or flatten the data."
            )

    @staticmethod
    def _raise_not_finite(x: torch.Tensor) -> None:
        bad = ~torch.isfinite(x)
        raise ValueError(
            f"Data contain {int(bad.sum())} NaN/inf values (first at index "
            f"{tuple(bad.nonzero()[0].tolist())}). Clean or impute them before training."
        )
