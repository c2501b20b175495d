"""The importance-weighted bound (IWAE) and its doubly-reparameterized gradient (DReG)."""

from __future__ import annotations

import torch

from ..ops import log_mean_exp
from ..pairs import drawn_sites
from .base import guide_covers_model, needs_rsample
from .particles import LogWeights, ParticleELBO

__all__ = ["IWAEELBO", "DReGELBO"]

_DISCRETE_ALTERNATIVES = (
    "For discrete latents use 'vimco' (the multi-sample score function for this bound), "
    "'relaxed' (Gumbel-softmax) or 'enum'."
)


class IWAEELBO(ParticleELBO):
    r"""The importance-weighted autoencoder bound (Burda et al. 2015).

    .. math::

        \mathcal L_K(x) = \mathbb E_{z^{(1..K)} \sim q}\Big[\log \frac1K \sum_{k=1}^K
            \frac{p(x, z^{(k)})}{q(z^{(k)} \mid x)}\Big]
        \ \le\ \log p(x),

    per data point. :math:`\mathcal L_1` is the ELBO, :math:`\mathcal L_K` rises
    with :math:`K` and tends to :math:`\log p(x)` as :math:`K \to \infty`.
    Gradients are pathwise, so every latent must be reparameterizable. The
    weights factorize over the data plate (``pyro.plate("data")``); a latent
    outside it (a global latent) makes them one joint weight per particle for the
    whole batch, a valid but looser bound.

    References:
        Importance Weighted Autoencoders (Burda, Grosse & Salakhutdinov, 2015),
        https://arxiv.org/abs/1509.00519

    Arguments:
        num_particles: ``K``, the number of importance samples per data point.
        beta: weight of the latent sites' log-densities in ``log w`` (1 for the bound).
        beta_sites, vectorize_particles, max_plate_nesting, data_plate: see
            :class:`~pyro_lvm.estimators.particles.ParticleELBO`.

    Example:
        >>> import pyro, pyro.distributions as dist, torch
        >>> pyro.clear_param_store()
        >>> def model(x):
        ...     with pyro.plate("data", len(x)):
        ...         z = pyro.sample("z", dist.Normal(0., 1.))
        ...         pyro.sample("x", dist.Normal(z, 1.), obs=x)
        >>> def guide(x):
        ...     with pyro.plate("data", len(x)):
        ...         pyro.sample("z", dist.Normal(0., 1.))  # the prior: a poor proposal
        >>> x = torch.tensor([0.0, 1.0])
        >>> exact = float(dist.Normal(0., 2 ** 0.5).log_prob(x).sum())
        >>> pyro.set_rng_seed(0)
        >>> bounds = [-IWAEELBO(num_particles=k).loss(model, guide, x) for k in (1, 1000)]
        >>> bounds[0] < bounds[1] < exact + 0.01
        True
    """

    _name = "iwae"

    def _check_traces(self, model_trace, guide_trace, args, kwargs) -> None:
        guide_covers_model(self._name, model_trace, guide_trace)
        needs_rsample(self._name, guide_trace, _DISCRETE_ALTERNATIVES)

    def _surrogate(self, model, guide, args, kwargs):
        weights = self.particle_weights(model, guide, *args, **kwargs)
        bound = weights.total(log_mean_exp(weights.joint(), weights.particle_dim))
        return bound, bound


class ScaleGrad(torch.autograd.Function):
    """Identity whose backward multiplies the gradient by ``holder["weight"]`` (set later)."""

    @staticmethod
    def forward(ctx, value, holder):
        ctx.holder = holder
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        weight = ctx.holder.get("weight")
        return (grad if weight is None else grad * weight), None


class PathDerivativeMixin:
    """Guide log-densities whose gradient keeps only the path through ``z``.

    :math:`\\nabla_\\phi \\log q_\\phi(z_\\phi)` has two parts: the score
    :math:`\\partial_\\phi \\log q_\\phi(z)` at fixed ``z`` (zero in expectation)
    and the path through :math:`z = g_\\phi(\\epsilon)`. The path-only version is
    :math:`\\log q_\\phi(z) - s + \\operatorname{stop}(s)` with
    :math:`s = \\log q_\\phi(\\operatorname{stop}(z))`: equal in value, with the
    score removed. ``s`` re-runs the guide on the stopped values when it has more
    than one latent site (a later site's parameters may depend on an earlier ``z``).
    """

    def _path_terms(self, model, guide, args, kwargs, scale_grads: bool):
        """The log weights with path-only guide densities, and per run the gradient holders of each
        latent (with the number of dims of its value), for :class:`DReGELBO` to fill."""
        self._check_once(model, guide, args, kwargs)
        runs = self._over_particles(lambda: self._path_run(model, guide, args, kwargs, scale_grads))
        return LogWeights.cat([weights for weights, _ in runs]), [extra for _, extra in runs]

    def _path_run(self, model, guide, args, kwargs, scale_grads: bool):
        wrapped, guide_trace = self._run_guide(model, guide, args, kwargs)
        latents = drawn_sites(guide_trace)  # an autoguide's auxiliary draws carry its density
        holders = {}
        values = {}
        for name, site in latents.items():
            if scale_grads:
                holders[name] = {}
                values[name] = ScaleGrad.apply(site["value"], holders[name])
            else:
                values[name] = site["value"]
        detached = {name: site["value"].detach() for name, site in latents.items()}
        if len(latents) == 1:
            ((name, site),) = latents.items()
            fn = site["fn"]
            full = {name: fn.log_prob(values[name])}
            score = {name: fn.log_prob(detached[name])}
        else:
            replay = self._replay_guide(wrapped, guide_trace, values, args, kwargs) if scale_grads else guide_trace
            stopped = self._replay_guide(wrapped, guide_trace, detached, args, kwargs)
            full = {n: replay.nodes[n]["fn"].log_prob(values[n]) for n in latents}
            score = {n: stopped.nodes[n]["fn"].log_prob(detached[n]) for n in latents}
        path = {n: full[n] - score[n] + score[n].detach() for n in latents}
        model_guide_trace = guide_trace
        if scale_grads:
            model_guide_trace = guide_trace.copy()
            for name in latents:
                model_guide_trace.nodes[name] = dict(guide_trace.nodes[name], value=values[name])
        model_trace = self._run_model(model, model_guide_trace, args, kwargs)
        weights = self.log_weights(model_trace, guide_trace, guide_log_probs=path)
        return weights, (holders, {n: (values[n].dim(), len(latents[n]["fn"].event_shape)) for n in latents})


class DReGELBO(PathDerivativeMixin, IWAEELBO):
    r"""The IWAE bound with the doubly-reparameterized gradient (Tucker et al. 2018).

    The bound and the model's gradient are those of :class:`IWAEELBO`. For the
    guide's parameters :math:`\phi`, the IWAE gradient
    :math:`\sum_k \tilde w_k \nabla_\phi \log w_k` (with normalized weights
    :math:`\tilde w_k = w_k / \sum_j w_j`) contains score terms whose variance
    does not shrink as :math:`K` grows, so the guide's signal-to-noise ratio
    *falls* with :math:`K` (Rainforth et al. 2018). DReG applies the
    reparameterization trick a second time to those terms and obtains the
    unbiased estimator

    .. math::

        \nabla_\phi \mathcal L_K = \mathbb E\Big[\sum_k \tilde w_k^2\,
            \frac{\partial \log w_k}{\partial z_k} \frac{\partial z_k}{\partial \phi}\Big],

    with :math:`\log q` differentiated only through :math:`z` (see
    :class:`PathDerivativeMixin`). The squares are applied by scaling the
    gradient that reaches each sampled ``z`` (so the model runs once); a guide
    parameter that is also a model parameter gets the mixture of both rules.
    With ``K = 1`` it is the sticking-the-landing gradient of the ELBO.

    References:
        Doubly Reparameterized Gradient Estimators for Monte Carlo Objectives
        (Tucker, Lawson, Gu & Maddison, 2018), https://arxiv.org/abs/1810.04152

    Arguments: as :class:`IWAEELBO`.

    Example:
        >>> import pyro, pyro.distributions as dist, torch
        >>> pyro.clear_param_store()
        >>> def model(x):
        ...     with pyro.plate("data", len(x)):
        ...         z = pyro.sample("z", dist.Normal(0., 1.))
        ...         pyro.sample("x", dist.Normal(z, 1.), obs=x)
        >>> def guide(x):
        ...     loc = pyro.param("loc", torch.zeros(len(x)))
        ...     with pyro.plate("data", len(x)):
        ...         pyro.sample("z", dist.Normal(loc, 0.5 ** 0.5))
        >>> loss = DReGELBO(num_particles=8).differentiable_loss(model, guide, torch.ones(2))
        >>> loss.backward()  # d/d loc: the DReG estimate
        >>> pyro.param("loc").grad.shape
        torch.Size([2])
    """

    _name = "dreg"

    def _surrogate(self, model, guide, args, kwargs):
        weights, runs = self._path_terms(model, guide, args, kwargs, scale_grads=True)
        log_w = weights.joint()
        pd = weights.particle_dim
        bound = weights.total(log_mean_exp(log_w, pd))
        if bound.requires_grad:
            normalized = torch.softmax(log_w.detach(), dim=pd)
            size = normalized.shape[pd] // len(runs)  # particles per run: all, or one
            for k, (holders, dims) in enumerate(runs):
                share = normalized.narrow(pd, k * size, size)
                for name, holder in holders.items():
                    value_dim, event_dim = dims[name]
                    weight = share.reshape(share.shape + (1,) * event_dim)
                    # a run without particles has fewer dims on the left: drop those (of size 1)
                    holder["weight"] = weight.reshape(weight.shape[max(weight.dim() - value_dim, 0):])
        return bound, bound
