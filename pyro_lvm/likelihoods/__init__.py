"""Observation models p(x | z): heads that turn a decoder's output into a distribution."""

from __future__ import annotations

import inspect
import typing
from typing import Literal, Sequence, Union

from ..parts import CUSTOM, build_part, part_config
from .base import Likelihood
from .bernoulli import (BernoulliLikelihood, ContinuousBernoulliLikelihood, IndependentBernoulli, compiled_log_prob,
                        continuous_bernoulli_log_norm)
from .discrete import CategoricalLikelihood, DiscretizedLogisticMixture, DiscretizedLogisticMixtureLikelihood, GridCategorical
from .gaussian import GaussianLikelihood

#: the likelihoods a model takes by name
LikelihoodName = Literal["bernoulli", "continuous_bernoulli", "gaussian", "discretized_logistic", "categorical"]
LIKELIHOOD_NAMES: tuple[str, ...] = typing.get_args(LikelihoodName)

__all__ = [
    "Likelihood", "BernoulliLikelihood", "ContinuousBernoulliLikelihood", "GaussianLikelihood", "IndependentBernoulli",
    "DiscretizedLogisticMixtureLikelihood", "CategoricalLikelihood", "DiscretizedLogisticMixture", "GridCategorical",
    "make_likelihood", "likelihood_config", "LikelihoodName", "LIKELIHOOD_NAMES", "continuous_bernoulli_log_norm",
    "compiled_log_prob",
]


def _build_likelihood(spec: dict) -> Likelihood:
    """A likelihood from ``{"class_path": "pyro_lvm.likelihoods...", "init_args": {...}}``, of pyro_lvm only."""
    return build_part(spec, Likelihood, "likelihood", "pyro_lvm.likelihoods.DiscretizedLogisticMixtureLikelihood")


def likelihood_config(likelihood: Union[str, dict, Likelihood]) -> Union[str, dict]:
    """What a model's ``config`` records of its ``likelihood`` argument: plain data that rebuilds it.

    A name as it is; a likelihood object (or such a dict) as ``{"class_path": ..., "init_args": ...}``, the way a
    YAML configuration writes it, for a class of pyro_lvm; :data:`CUSTOM` (``"custom"``) for an object of
    another class, which a checkpoint then cannot rebuild (build the model in code and load its ``state_dict``).
    :func:`make_likelihood` takes each back.

    Example:
        >>> likelihood_config("bernoulli")
        'bernoulli'
        >>> likelihood_config(DiscretizedLogisticMixtureLikelihood(num_components=3))
        {'class_path': 'pyro_lvm.likelihoods.DiscretizedLogisticMixtureLikelihood', 'init_args': {'event_shape': None, 'num_components': 3, 'levels': 256}}
    """
    if isinstance(likelihood, str):
        return likelihood
    if isinstance(likelihood, dict):
        likelihood = _build_likelihood(likelihood)
    if not isinstance(likelihood, Likelihood):
        raise TypeError(
            f"likelihood must be a name ({', '.join(map(repr, LIKELIHOOD_NAMES))}) or a "
            f"pyro_lvm.likelihoods.Likelihood; got {type(likelihood).__name__}."
        )
    cls = type(likelihood)
    config = likelihood.config
    params = [p for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"]
    if set(config) != {p.name for p in params}:  # a subclass with arguments of its own
        return CUSTOM
    return part_config(likelihood)


def make_likelihood(
    name_or_part: Union[str, dict, Likelihood],
    event_shape: Union[int, Sequence[int]],
    scale: Union[float, Literal["learned"]] = "learned",
) -> Likelihood:
    """The likelihood of a model with data of shape ``event_shape``: built from a name, or a part bound to the shape.

    Names: ``"bernoulli"`` (binary data), ``"continuous_bernoulli"`` (grey levels in [0, 1]), ``"gaussian"``
    (with ``scale``), ``"discretized_logistic"`` (:class:`DiscretizedLogisticMixtureLikelihood` with 5
    components) and ``"categorical"`` (:class:`CategoricalLikelihood`), the last two for 8-bit data on the grid
    k/255. A :class:`Likelihood` object is bound to ``event_shape`` (:meth:`Likelihood.bind`) and returned,
    and so is one built from its configuration dict (:func:`likelihood_config`). ``scale`` serves the name
    ``"gaussian"`` only: an object carries its own arguments.

    Example:
        >>> make_likelihood("gaussian", 4, scale=0.1).scale
        tensor(0.1000)
        >>> lik = make_likelihood(CategoricalLikelihood(levels=16), (1, 2, 2))
        >>> lik.event_shape, lik.output_dim
        (torch.Size([1, 2, 2]), 64)
    """
    if isinstance(name_or_part, (Likelihood, dict)):
        part = name_or_part if isinstance(name_or_part, Likelihood) else _build_likelihood(name_or_part)
        if not (isinstance(scale, str) and scale == "learned"):
            raise ValueError(
                f"likelihood_scale={scale!r} applies to likelihood='gaussian' only; a likelihood given as an object "
                f"({type(part).__name__}) carries its own arguments: set the scale there, e.g. "
                "GaussianLikelihood(scale=0.1), and leave likelihood_scale out."
            )
        return part.bind(event_shape)
    if name_or_part == "bernoulli":
        return BernoulliLikelihood(event_shape)
    if name_or_part == "continuous_bernoulli":
        return ContinuousBernoulliLikelihood(event_shape)
    if name_or_part == "gaussian":
        return GaussianLikelihood(event_shape, scale=scale)
    if name_or_part == "discretized_logistic":
        return DiscretizedLogisticMixtureLikelihood(event_shape)
    if name_or_part == "categorical":
        return CategoricalLikelihood(event_shape)
    if name_or_part == CUSTOM:
        raise ValueError(
            "This configuration comes from a model built on a likelihood object of a class outside pyro_lvm "
            "(likelihood: 'custom'), which a configuration cannot rebuild. Build the model in code with that "
            "likelihood and load the checkpoint's state_dict into it."
        )
    raise ValueError(
        f"Unknown likelihood {name_or_part!r}; choose one of {', '.join(map(repr, LIKELIHOOD_NAMES))}, or pass a "
        "pyro_lvm.likelihoods.Likelihood object, e.g. DiscretizedLogisticMixtureLikelihood(num_components=5) "
        "(in YAML: {class_path: pyro_lvm.likelihoods.DiscretizedLogisticMixtureLikelihood, init_args: "
        "{num_components: 5}})."
    )
