"""The score-function (REINFORCE) estimator, Rao-Blackwellized per data point, with baselines."""

from __future__ import annotations

from typing import Literal, Optional, Sequence

import pyro
import torch
from pyro.distributions import Delta
from pyro.distributions.torch_distribution import TorchDistribution
from pyro.poutine.messenger import Messenger
from torch import nn

from ..pairs import auxiliary_sites, latent_sites
from .base import guide_covers_model
from .kl_control import unwrap_independent
from .particles import LogWeights, ParticleELBO

__all__ = ["ScoreFunctionELBO", "NVILBaseline"]


class _ScoreFunctionOnly(TorchDistribution):
    """A view of a distribution that hides its ``rsample``.

    Estimators then use its score function ``grad log q(z)`` instead of pathwise
    derivatives. (Setting ``has_rsample_(False)`` on the instance does not survive
    the ``expand`` that ``pyro.plate`` applies, hence a wrapper.)
    """

    arg_constraints: dict = {}
    has_rsample = False

    def __init__(self, base_dist: TorchDistribution):
        self.base_dist = base_dist
        super().__init__(base_dist.batch_shape, base_dist.event_shape, validate_args=False)

    @property
    def support(self):
        return self.base_dist.support

    @property
    def has_enumerate_support(self):
        return self.base_dist.has_enumerate_support

    def expand(self, batch_shape, _instance=None):
        return _ScoreFunctionOnly(self.base_dist.expand(batch_shape))

    def sample(self, sample_shape=torch.Size()):
        return self.base_dist.sample(sample_shape)

    def log_prob(self, value):
        return self.base_dist.log_prob(value)

    @property
    def mean(self):
        return self.base_dist.mean

    @property
    def variance(self):
        return self.base_dist.variance


class ScoreFunctionGuide(Messenger):
    """Treat every latent site of a guide as non-reparameterizable."""

    def _pyro_sample(self, msg) -> None:
        if not msg["is_observed"] and msg["fn"].has_rsample:
            msg["fn"] = _ScoreFunctionOnly(msg["fn"])


def _is_point_mass(fn) -> bool:
    """A ``Delta`` without a density of its own (``log_density`` 0), as ``AutoDelta`` returns."""
    base = unwrap_independent(fn)[0]
    if not isinstance(base, Delta):
        return False
    log_density = base.log_density
    return not isinstance(log_density, torch.Tensor) or not bool(log_density.ne(0).any())


def refuse_point_estimates(estimator: str, guide_trace) -> None:
    r"""Refuse guide sites that are point masses (``Delta`` without an auxiliary draw, e.g. ``AutoDelta``).

    A score-function gradient :math:`\mathbb E_q[\ell \nabla \log q]` needs a density to score;
    a point mass has none, so its location would get no gradient at all.
    """
    if auxiliary_sites(guide_trace):
        return  # an autoguide's Deltas over auxiliary draws: the draws carry the density and are scored
    points = sorted(name for name, site in latent_sites(guide_trace).items() if _is_point_mass(site["fn"]))
    if points:
        raise ValueError(
            f"'{estimator}' scores the guide's density, but the guide's site(s) {', '.join(map(repr, points))} are "
            "point masses (Delta, e.g. AutoDelta: a MAP estimate), which have none: their location would get no "
            "gradient. Use 'reparam' (MAP for those sites), or a guide with a density (AutoNormal)."
        )


class NVILBaseline(nn.Module):
    r"""The input-dependent baseline of NVIL (Mnih & Gregor 2014): :math:`b_\psi(x)`.

    An MLP from the flattened data point to one number, trained by minimizing
    :math:`\big(\ell(x, z) - b_\psi(x)\big)^2` where :math:`\ell` is the data point's
    learning signal :math:`\log p(x, z) - \log q(z \mid x)`. Built at the first call,
    when the data dimension is known. ``own_lr`` is its learning rate in
    :class:`pyro_lvm.LVMModule` (the baseline usually wants a faster one).

    Arguments:
        hidden_dim: width of the hidden layer (NVIL used 100).
        own_lr: Adam's learning rate for the baseline's parameters.
    """

    def __init__(self, hidden_dim: int = 100, own_lr: float = 3e-3):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.own_lr = own_lr
        self.net: Optional[nn.Module] = None

    def build(self, x: torch.Tensor) -> None:
        if self.net is None:
            data_dim = x[0].numel()
            self.net = nn.Sequential(
                nn.Linear(data_dim, self.hidden_dim), nn.Tanh(), nn.Linear(self.hidden_dim, 1)
            ).to(device=x.device, dtype=x.dtype if x.is_floating_point() else torch.get_default_dtype())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.build(x)
        weight = self.net[0].weight
        return self.net(x.reshape(x.shape[0], -1).to(weight.dtype)).squeeze(-1)


class ScoreFunctionELBO(ParticleELBO):
    r"""Score-function (REINFORCE, likelihood-ratio) gradient estimator.

    Every latent site of the guide is treated as non-reparameterizable, and

    .. math::

        \nabla_\phi \mathcal L = \mathbb E_{q_\phi}\big[
            (\ell(x, z) - b)\,\nabla_\phi \log q_\phi(z\mid x)\big],
        \qquad \ell = \log p(x, z) - \log q_\phi(z\mid x),

    the lecture's policy-gradient estimator, to compare with
    :class:`~pyro_lvm.estimators.ReparamELBO` on the same model. It is
    Rao-Blackwellized per data point: the score of :math:`z_i` is multiplied by
    the terms of data point :math:`i` only (plus any terms outside the data
    plate), since the other data points' terms are independent of :math:`z_i`
    and only add variance. The baseline :math:`b` leaves the gradient unbiased
    (:math:`\mathbb E_q[\nabla_\phi \log q_\phi] = 0`) as long as it does not
    depend on the current draw:

    * ``"decaying_average"``: a running average of the learning signal
      (Williams 1992), one number, ``b <- baseline_beta b + (1 - baseline_beta) mean(l)``
      updated after use, so it works with any batch size;
    * ``"nvil"``: :math:`b_\psi(x)`, a network of the data point trained at its
      own learning rate ``baseline_lr`` to predict the signal (Mnih & Gregor
      2014), see :class:`NVILBaseline`;
    * ``"none"``.

    The cost is one run of the guide and the model: no provenance tracking
    (Pyro's :class:`~pyro.infer.TraceGraph_ELBO` tracks every tensor's
    dependencies, which costs about as much as the model itself on a VAE).
    A guide site's own ``infer={"baseline": ...}`` is not read.

    References:
        Simple statistical gradient-following algorithms for connectionist
        reinforcement learning (Williams, 1992); Neural Variational Inference and
        Learning in Belief Networks (Mnih & Gregor, 2014), https://arxiv.org/abs/1402.0030

    Arguments:
        num_particles: samples of ``z`` per data point (the ELBO is their average).
        beta: weight of the KL term.
        beta_sites: latent sites that ``beta`` applies to (default: all).
        baseline: ``"decaying_average"``, ``"nvil"`` or ``"none"``.
        baseline_beta: decay of the running average (its "learning rate" is ``1 - baseline_beta``).
        baseline_lr: learning rate of the NVIL network.
        baseline_hidden: width of the NVIL network's hidden layer.
        vectorize_particles, max_plate_nesting, data_plate: see
            :class:`~pyro_lvm.estimators.particles.ParticleELBO`.

    Example:
        >>> import pyro, pyro.distributions as dist, torch
        >>> pyro.clear_param_store()
        >>> def model():
        ...     pyro.sample("z", dist.Normal(0., 1.))
        >>> def guide():
        ...     loc = pyro.param("loc", torch.tensor(1.))
        ...     pyro.sample("z", dist.Normal(loc, 1.))
        >>> loss = ScoreFunctionELBO(num_particles=10).differentiable_loss(model, guide)
        >>> loss.requires_grad
        True
    """

    _name = "score_function"

    def __init__(
        self,
        num_particles: int = 1,
        beta: float = 1.0,
        beta_sites: Optional[Sequence[str]] = None,
        baseline: Literal["decaying_average", "nvil", "none"] = "decaying_average",
        baseline_beta: float = 0.9,
        baseline_lr: float = 3e-3,
        baseline_hidden: int = 100,
        vectorize_particles: Optional[bool] = None,
        max_plate_nesting: Optional[int] = None,
        data_plate: str = "data",
    ):
        super().__init__(
            num_particles, beta, beta_sites, vectorize_particles, max_plate_nesting, data_plate
        )
        if baseline not in ("decaying_average", "nvil", "none"):
            raise ValueError(
                f"Unknown baseline {baseline!r}; choose 'decaying_average', 'nvil' or 'none'."
            )
        if not 0 <= baseline_beta < 1:
            raise ValueError(f"baseline_beta must be in [0, 1); got {baseline_beta}.")
        if baseline_lr <= 0:
            raise ValueError(f"baseline_lr must be > 0; got {baseline_lr}.")
        self.baseline = baseline
        self.baseline_beta = baseline_beta
        self.baseline_net = NVILBaseline(baseline_hidden, baseline_lr) if baseline == "nvil" else None
        self._averages: dict[str, torch.Tensor] = {}

    # ----- state: running averages and the NVIL network ---------------------------------------
    def trainable_modules(self) -> list[nn.Module]:
        """Modules to train with the pair (the NVIL baseline), for :class:`pyro_lvm.LVMModule`."""
        return [] if self.baseline_net is None else [self.baseline_net]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The running averages (checkpointed by :class:`pyro_lvm.LVMModule`)."""
        return {f"average/{k}": v for k, v in self._averages.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._averages = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith("average/")}

    def _check_traces(self, model_trace, guide_trace, args, kwargs) -> None:
        guide_covers_model(self._name, model_trace, guide_trace)
        refuse_point_estimates(self._name, guide_trace)
        if self.baseline_net is not None:
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor) or x.dim() == 0:
                raise ValueError(
                    "The 'nvil' baseline is a network of the data: the pair's first argument "
                    f"must be the batch of data points (a tensor); got {type(x).__name__}. "
                    "Use baseline='decaying_average'."
                )
            self.baseline_net.build(x)

    def _wrap_guide(self, guide):
        return ScoreFunctionGuide()(guide)

    def running_average(self, key: str, value: torch.Tensor) -> torch.Tensor:
        """The decaying average ``key`` of the learning signal before this step (0 at the first), then update it with ``value``."""
        value = value.detach()
        old = self._averages.get(key)
        if old is None:
            self._averages[key] = value
            return torch.zeros_like(value)
        old = old.to(value.device)
        self._averages[key] = self.baseline_beta * old + (1 - self.baseline_beta) * value
        return old

    def _baselines(self, weights: LogWeights, joint: torch.Tensor, args):
        """Baselines for the local signal (broadcastable to ``weights.local``),
        the other terms and the ``joint`` weight; and the NVIL regression loss."""
        local, other = weights.local.detach(), weights.other.detach()
        zero = local.new_zeros(())
        if self.baseline == "none":
            return zero, zero, zero, zero
        b_other = b_total = zero
        if weights.has_other:
            b_other = self.running_average("other", other.mean())
            b_total = self.running_average("total", joint.mean())
        if self.baseline == "nvil" and weights.data_dims:
            if len(weights.data_dims) != 1:
                raise ValueError("The 'nvil' baseline needs a single data plate.")
            shape = [1] * local.dim()
            shape[weights.data_dims[0]] = -1
            pyro.module("nvil_baseline", self.baseline_net)
            b_local = self.baseline_net(args[0]).reshape(shape)
            regression = ((local - b_local) ** 2).mean()
            return b_local.detach(), b_other, b_total, regression
        return self.running_average("local", local.mean()), b_other, b_total, zero

    def _surrogate(self, model, guide, args, kwargs):
        return self.surrogate(self.particle_weights(model, guide, *args, **kwargs), args)

    def surrogate(self, weights: LogWeights, args: tuple = ()) -> tuple[torch.Tensor, torch.Tensor]:
        r"""``(bound, surrogate)`` from the log weights of ``num_particles`` draws: the ELBO and the REINFORCE surrogate.

        With :math:`\ell_i` the terms of data point :math:`i` (``weights.local``, scaled by the
        subsampling factor :math:`s`), :math:`\log q_i` its latents' guide log-density, :math:`b`
        the baselines and :math:`o` the terms outside the data plate,

        .. math::

            \text{bound} = \tfrac1K \sum_k \big(s \sum_i \ell_{ik} + o_k\big), \qquad
            \text{surrogate} = \text{bound} + \tfrac1K \sum_k \sum_i \big(s(\ell_{ik} - b_i) + o_k - b_o\big) \log q_{ik}
                [+ (\log w_k - b_w)\log q^{\text{global}}_k]

        (the signals and baselines held fixed). The fast step of the built-in models calls it with
        its own weights, so the surrogate is written here only. ``args``: the pair's arguments (the
        NVIL baseline reads the data from the first).
        """
        k = self.num_particles
        scale = weights.data_scale
        bound = (scale * weights.local.sum() + weights.other.sum()) / k
        if not torch.is_grad_enabled():
            return bound, bound
        local, other = weights.local.detach(), weights.other.detach()
        joint = weights.joint().detach()  # the whole batch's log weight, when it does not factorize
        b_local, b_other, b_total, regression = self._baselines(weights, joint, args)
        # data point i's latents: its own terms, plus the terms outside the data plate
        local_cost = scale * (local - b_local) + (other - b_other)
        score = (local_cost * weights.local_q).sum()
        if weights.has_other:
            score = score + ((joint - b_total) * weights.other_q).sum()
        return bound, bound + score / k - regression
