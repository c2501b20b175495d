"""The semi-amortized guide: an encoder's Gaussian refined by K gradient steps per input."""

from __future__ import annotations

from typing import Any, Callable, Optional

import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.nn import PyroModule
from pyro.poutine.messenger import Messenger
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample
from torch import nn

from ..pairs import accepting
from .common import autograd_on, log_joint, normal_tensor

__all__ = ["SemiAmortizedGuide"]


class _Replace(Messenger):
    """Sample the named sites from the given distributions instead of the program's own."""

    def __init__(self, fns: dict[str, dist.TorchDistribution]):
        super().__init__()
        self.fns = fns

    def _pyro_sample(self, msg) -> None:
        if msg["name"] in self.fns:
            msg["fn"] = self.fns[msg["name"]]


class SemiAmortizedGuide(PyroModule):
    r"""An amortized Gaussian guide refined per data point by a few steps of gradient ascent.

    The base guide's Gaussian of each latent site gives
    :math:`\lambda_0 = (\mu, \log\sigma)`; ``num_steps`` (:math:`K`) steps of gradient
    ascent on each data point's ELBO follow (Kim et al. 2018),

    .. math::

        \lambda_{t+1} = \lambda_t + \eta\, \nabla_\lambda \big[\log p_\theta(x, z)
            + \mathbb H(q_\lambda)\big], \qquad z = \mu_t + \sigma_t \odot \epsilon,\
            \epsilon \sim \mathcal N(0, I),

    with :math:`\eta` = ``step_size`` and :math:`\mathbb H(q_\lambda) = \sum \log\sigma + \text{const}`
    (one draw of :math:`\epsilon` per step), each data point's gradient clipped to a norm of
    ``max_grad_norm`` as Kim et al. do, and the guide samples
    :math:`z \sim \mathcal N(\mu_K, \operatorname{diag}\sigma_K^2)` (reparameterized) inside the base
    guide's own plates. The log-densities in the steps are unscaled sums, so
    subsampling (``num_data``) does not change a step.
    The refinement turns gradients on, so it also refines during validation and
    test (``torch.no_grad``, ``torch.inference_mode``).

    With ``differentiable=True`` the steps stay in the autograd graph
    (``create_graph=True``): the ELBO at :math:`\lambda_K` trains the encoder through
    the refinement (Hessian-vector products), as in SA-VAE. Unlike Kim et al., who
    update :math:`\theta` with the partial derivative at a fixed :math:`\lambda_K`,
    the model's parameters here get the total derivative, which also flows through
    the steps. ``differentiable=False`` detaches :math:`\lambda_K`: cheaper, but then
    the ELBO gives the base guide's parameters *no* gradient at all, so an encoder
    trained only this way never learns (train it beforehand, or by another loss).
    Every base-guide latent site must be Normal (possibly ``.to_event``). A call
    costs :math:`K` runs of the model and two of the base guide, and with
    ``differentiable=True`` keeps the :math:`K` steps' graphs in memory.

    Plain gradient ascent is stable only for :math:`\eta` below about
    :math:`1 / \text{curvature}`, the posterior precision, so sharp posteriors need a
    smaller ``step_size`` (or the clipping); refinement can otherwise *lower* the
    ELBO. Measured on a VAE trained 3 epochs on the digits, per data point:
    base -23.35, refined (5 steps of 0.1) -23.40 without clipping, -23.30 with
    ``max_grad_norm=5``, -23.24 with steps of 0.05.

    References:
        Kim, Wiseman, Miller, Sontag & Rush (2018), "Semi-Amortized Variational
        Autoencoders", https://arxiv.org/abs/1802.02550

    Arguments:
        base_guide: the amortized guide giving :math:`\lambda_0`; ``None`` takes the
            model's own (``lvm.guide``) when :class:`pyro_lvm.LVMModule` calls :meth:`attach`.
        num_steps: the number of refinement steps :math:`K`.
        step_size: the step size :math:`\eta`.
        differentiable: backpropagate through the refinement (SA-VAE) or detach its result.
        max_grad_norm: the largest norm of a step's gradient per data point and site (``None``: no clipping).

    Example:
        >>> import pyro
        >>> from pyro_lvm import VAE
        >>> vae = VAE(data_shape=4, latent_dim=2, hidden_dims=[8])
        >>> guide = SemiAmortizedGuide(num_steps=3).attach(vae.model, vae)
        >>> x = torch.bernoulli(torch.full((5, 4), 0.5))
        >>> loss = pyro.infer.Trace_ELBO().differentiable_loss(vae.model, guide, x)
        >>> loss.backward()  # through the refinement into the encoder
        >>> vae.encoder[0].weight.grad.abs().sum() > 0
        tensor(True)
        >>> refined, base = guide.refine(x)["z"], vae.encode(x)[0]
        >>> refined.loc.shape == base.shape and not torch.equal(refined.loc, base)
        True
    """

    def __init__(
        self,
        base_guide: Optional[Callable] = None,
        num_steps: int = 5,
        step_size: float = 0.1,
        differentiable: bool = True,
        max_grad_norm: Optional[float] = 5.0,
    ):
        super().__init__()
        if num_steps < 0:
            raise ValueError(f"num_steps must be 0 or more; got {num_steps}.")
        self.num_steps = num_steps
        self.step_size = step_size
        self.differentiable = differentiable
        self.max_grad_norm = max_grad_norm
        self.__dict__["_model"] = None
        self._set_base(base_guide)

    def _set_base(self, base_guide: Optional[Callable]) -> None:
        if isinstance(base_guide, nn.Module):
            self.base = base_guide  # registered: its parameters are the guide's
        else:
            self.__dict__["base"] = base_guide

    @property
    def model(self) -> Optional[Callable]:
        """The model whose ELBO the refinement climbs (set by :meth:`attach`)."""
        return self.__dict__["_model"]

    def attach(self, model: Callable, lvm: Optional[nn.Module] = None) -> "SemiAmortizedGuide":
        """Remember the model, and take ``lvm.guide`` as base guide if none was given; returns the guide."""
        self.__dict__["_model"] = model
        if self.base is None:
            if not callable(getattr(lvm, "guide", None)):
                raise ValueError(
                    "SemiAmortizedGuide has no base guide: pass base_guide= (e.g. an AmortizedGuide), "
                    "or a model with its own guide (e.g. pyro_lvm.VAE) to pyro_lvm.LVMModule / fit."
                )
            self._set_base(lvm.guide)
        return self

    def _refine(self, args: tuple, kwargs: dict) -> tuple[Trace, dict[str, dist.TorchDistribution]]:
        if self.model is None or self.base is None:
            raise ValueError(
                "SemiAmortizedGuide does not know its model: pass it to pyro_lvm.LVMModule / pyro_lvm.fit "
                "(which attach it), or call guide.attach(model, lvm) first."
            )
        create_graph = self.differentiable and torch.is_grad_enabled()
        with autograd_on():
            args, kwargs = tuple(map(normal_tensor, args)), {k: normal_tensor(v) for k, v in kwargs.items()}
            return self._climb(args, kwargs, create_graph)

    def _climb(
        self, args: tuple, kwargs: dict, create_graph: bool
    ) -> tuple[Trace, dict[str, dist.TorchDistribution]]:
        with poutine.block():
            base_trace = poutine.trace(accepting(self.base)).get_trace(*args, **kwargs)
        sites = {}  # name -> (loc, log scale, reinterpreted dims)
        for name, site in base_trace.iter_stochastic_nodes():
            if site_is_subsample(site):
                continue
            fn, event_dims = site["fn"], 0
            while isinstance(fn, torch.distributions.Independent):
                event_dims += fn.reinterpreted_batch_ndims
                fn = fn.base_dist
            if not isinstance(fn, torch.distributions.Normal):
                raise ValueError(
                    f"SemiAmortizedGuide refines Gaussian guides, but the base guide's site {name!r} is "
                    f"{type(fn).__name__}. Use a Normal (diagonal Gaussian) base guide, e.g. AmortizedGuide."
                )
            loc, scale = torch.broadcast_tensors(fn.loc, fn.scale)
            sites[name] = (loc, scale.log(), event_dims)
        model = accepting(self.model)
        lam = {}
        for name, (loc, log_scale, _) in sites.items():
            lam[name] = [t if create_graph and t.requires_grad else t.detach().requires_grad_()
                         for t in (loc, log_scale)]
        for _ in range(self.num_steps):
            z = {name: mu + log_s.exp() * torch.randn_like(mu) for name, (mu, log_s) in lam.items()}
            with poutine.block():
                trace = poutine.trace(poutine.condition(model, data=z)).get_trace(*args, **kwargs)
            entropy = sum(log_scale.sum() for _, log_scale in lam.values())
            elbo = log_joint(trace) + entropy
            leaves = [t for pair in lam.values() for t in pair]
            grads = iter(torch.autograd.grad(elbo, leaves, create_graph=create_graph))
            for name, pair in lam.items():
                steps = [next(grads) for _ in pair]
                if self.max_grad_norm is not None:
                    steps = self._clip(steps, sites[name][2])
                pair[:] = [t + self.step_size * g for t, g in zip(pair, steps)]
                if not create_graph:
                    pair[:] = [t.detach().requires_grad_() for t in pair]
        refined = {}
        for name, (loc, log_scale) in lam.items():
            if not create_graph:
                loc, log_scale = loc.detach(), log_scale.detach()
            refined[name] = dist.Normal(loc, log_scale.exp()).to_event(sites[name][2])
        return base_trace, refined

    def _clip(self, grads: list[torch.Tensor], event_dims: int) -> list[torch.Tensor]:
        """Scale each data point's gradient of (mu, log sigma) down to a norm of ``max_grad_norm``."""
        dims = tuple(range(-event_dims, 0))
        # sum over an empty tuple of dims would reduce every dim
        norm = sum(g.square().sum(dims, keepdim=True) if dims else g.square() for g in grads).sqrt()
        factor = (self.max_grad_norm / norm.clamp_min(1e-12)).clamp(max=1.0)
        return [g * factor for g in grads]

    def refine(self, *args: Any, **kwargs: Any) -> dict[str, dist.Normal]:
        r"""The refined Gaussians :math:`\mathcal N(\mu_K, \sigma_K)` per site (``.to_event`` removed)."""
        _, refined = self._refine(args, kwargs)
        return {name: fn.base_dist if isinstance(fn, dist.Independent) else fn
                for name, fn in refined.items()}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        base_trace, refined = self._refine(args, kwargs)
        # re-run the base guide with the refined distributions: its plates stay exactly as they were,
        # and its subsample (and any other) sites are replayed, so the batch is the same
        rest = Trace()
        for name, site in base_trace.nodes.items():
            if name not in refined:
                rest.add_node(name, **site)
        with _Replace(refined):
            return poutine.replay(accepting(self.base), trace=rest)(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"num_steps={self.num_steps}, step_size={self.step_size}, differentiable={self.differentiable}"
