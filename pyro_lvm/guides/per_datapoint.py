"""The per-datapoint guide q_i(z): a Gaussian of its own for each training point."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer.util import is_validation_enabled
from pyro.nn import PyroModule
from pyro.poutine.util import site_is_subsample
from torch import nn
from torch.distributions import biject_to
from torch.nn.functional import softplus

from ..ops import minimize_cosine
from ..pairs import accepting
from .common import autograd_on, guide_plate, inverse_softplus, log_joint, normal_tensor

__all__ = ["PerDatapointGuide"]


class _LocalSite(NamedTuple):
    name: str
    key: str  # the name as an nn.ParameterDict key
    latent_shape: torch.Size  # event shape of the Gaussian, in the unconstrained space
    transform: Optional[torch.distributions.Transform]  # unconstrained -> support; None for the reals


class PerDatapointGuide(PyroModule):
    r"""The non-amortized guide: free Gaussian parameters for every training example.

    For each local latent site of the model (each sample site inside the plate
    ``plate``) and each training example :math:`i`,

    .. math::

        q_i(z_i) = \mathcal N\big(z_i \mid \mu_i, \operatorname{diag}\sigma_i^2\big),
        \qquad \sigma_i = \operatorname{softplus}(\rho_i),

    so the guide has exactly :math:`(|\mu_i| + |\sigma_i|)\,N = 2 N d` parameters per
    site (``d`` the site's dimension), and with the model's :math:`|\theta|` the pair
    has :math:`|\theta| + 2 N d`. Row :math:`i` is read at the batch's ``index``, the
    example's position in the training set (what pyro_lvm's data modules put in
    every batch), so mini-batches and shuffling are fine. The sites, their event
    shapes and supports are found by tracing the model once, at the first call:
    a site with a constrained support gets the Gaussian pushed through
    ``biject_to(support)`` (its tables live in the unconstrained space, e.g.
    ``K - 1`` columns for a ``K``-simplex). Discrete latents are rejected.

    Training updates the table rows of the batch only through the gradient, but
    Adam is dense: the rows of examples outside the batch keep moving for a few
    steps along their momentum. Each row sees its example once per epoch, hence
    ``own_lr`` (default ``1e-2``, ten times Adam's usual ``1e-3``) gives the tables
    their own learning rate in :class:`pyro_lvm.LVMModule`.

    In eval mode (``guide.eval()``, as Lightning does for validation and test)
    the batch holds examples with no :math:`q_i`: the guide then fits fresh ones
    (:meth:`refit`), ``eval_steps`` steps of Adam on the batch's ELBO with respect
    to temporary ``(mu, sigma)`` only -- the model's parameters get no gradient --
    and samples from them. This is what non-amortized inference means for a new
    :math:`x`: an optimization per data point, and the held-out ELBO it yields
    approaches the one of the best Gaussian :math:`q`, not that of an encoder.
    In training mode the index is required, except under ``torch.no_grad``
    (e.g. an estimator's check on a bare batch), where a batch without one is
    given the average of the trained rows, unrefined: call ``guide.eval()`` to
    evaluate held-out data.

    The plate is ``pyro.plate(plate, batch)``, or with a ``num_data`` keyword
    ``pyro.plate(plate, num_data, subsample=arange(batch))`` (the convention of
    :class:`pyro_lvm.VAE`); for a model with another plate pass ``create_plate``.

    References:
        Hoffman, Blei, Wang & Paisley (2013), "Stochastic Variational Inference",
        https://arxiv.org/abs/1206.7051 (local variational parameters per data point).
        Kingma & Welling (2014), https://arxiv.org/abs/1312.6114 (amortized vs. per-datapoint).

    Arguments:
        num_data: number of training examples (rows of the tables); or set by
            :meth:`set_num_data`, which :class:`pyro_lvm.LVMModule` calls with the training set's size.
        plate: the name of the model's data plate; the sites inside it are the local latents.
        init_scale: the initial :math:`\sigma_i`.
        own_lr: Adam's learning rate for the tables in :class:`pyro_lvm.LVMModule` (``None``: the module's).
        eval_steps: Adam steps of the refit in eval mode.
        eval_lr: Adam's learning rate of the refit.
        create_plate: ``create_plate(*args, **kwargs) -> pyro.plate`` with the model's
            arguments (and ``index``), to open the model's plate instead of the default.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> from pyro_lvm import LVMModule
        >>> def model(x):
        ...     with pyro.plate("data", x.shape[0]):
        ...         z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.).to_event(1))
        ...         pyro.sample("x", dist.Normal(z, 1.).to_event(1), obs=x)
        >>> guide = PerDatapointGuide(num_data=100)
        >>> module = LVMModule(model, guide)
        >>> batch = {"x": torch.randn(8, 2), "index": torch.randperm(100)[:8]}
        >>> module.initialize(batch)
        >>> sum(p.numel() for p in guide.parameters())  # 2 * N * d
        400
        >>> module(batch).backward()
        >>> guide.eval()(batch["x"])["z"].shape  # held-out x: q fitted afresh
        torch.Size([8, 2])
    """

    def __init__(
        self,
        num_data: Optional[int] = None,
        plate: str = "data",
        init_scale: float = 0.1,
        own_lr: Optional[float] = 1e-2,
        eval_steps: int = 50,
        eval_lr: float = 0.1,
        create_plate: Optional[Callable[..., pyro.plate]] = None,
    ):
        super().__init__()
        if num_data is not None and num_data < 1:
            raise ValueError(f"num_data must be a positive integer; got {num_data}.")
        if init_scale <= 0:
            raise ValueError(f"init_scale must be positive; got {init_scale}.")
        self.num_data = num_data
        self.plate = plate
        self.init_scale = init_scale
        self.own_lr = own_lr
        self.eval_steps = eval_steps
        self.eval_lr = eval_lr
        self.__dict__["_create_plate"] = None if create_plate is None else accepting(create_plate)
        self.__dict__["_model"] = None
        self.__dict__["_sites"] = None
        self.locs = nn.ParameterDict()
        self.raw_scales = nn.ParameterDict()

    # ----- the LVMModule protocol ---------------------------------------------------
    @property
    def model(self) -> Optional[Callable]:
        """The model this guide approximates (set by :meth:`attach`)."""
        return self.__dict__["_model"]

    def attach(self, model: Callable, lvm: Optional[nn.Module] = None) -> "PerDatapointGuide":
        """Remember the model whose local latents this guide approximates; returns the guide."""
        self.__dict__["_model"] = model
        return self

    def set_num_data(self, num_data: int) -> None:
        """Size the tables for a training set of ``num_data`` examples (before they exist)."""
        if self.num_data is not None and num_data != self.num_data:
            raise ValueError(
                f"PerDatapointGuide has num_data={self.num_data} but the training set has {num_data} "
                "examples. Build the guide with num_data=None (the training set sets it) or the right size."
            )
        self.num_data = num_data

    # ----- the local sites ----------------------------------------------------------
    def _discover(self, args: tuple, kwargs: dict) -> list[_LocalSite]:
        if self.model is None:
            raise ValueError(
                "PerDatapointGuide does not know its model: pass it to pyro_lvm.LVMModule / pyro_lvm.fit "
                "(which attach it), or call guide.attach(model) first."
            )
        with poutine.block(), torch.no_grad():
            trace = poutine.trace(accepting(self.model)).get_trace(*args, **kwargs)
        sites = []
        for name, site in trace.iter_stochastic_nodes():
            frames = [f for f in site["cond_indep_stack"] if f.vectorized]
            if site_is_subsample(site) or not any(f.name == self.plate for f in frames):
                continue
            fn = site["fn"]
            if fn.support.is_discrete:
                raise ValueError(
                    f"PerDatapointGuide fits Gaussians to continuous latents, but the model's site "
                    f"{name!r} ({type(fn).__name__}) is discrete. Use an amortized guide with the "
                    "score-function estimator (estimator='score_function'), or marginalize it by "
                    "enumeration (pyro.infer.TraceEnum_ELBO)."
                )
            size = next(f.size for f in frames if f.name == self.plate)
            if len(frames) > 1 or fn.batch_shape != (size,):
                raise ValueError(
                    f"PerDatapointGuide needs each local site to have batch shape (batch,) from the plate "
                    f"{self.plate!r} alone; site {name!r} has batch shape {tuple(fn.batch_shape)} in the "
                    f"plates {[f.name for f in frames]}. Declare the other dimensions with .to_event()."
                )
            support = fn.support
            while isinstance(support, constraints.independent):
                support = support.base_constraint
            transform = None if support is constraints.real else biject_to(fn.support)
            latent_shape = fn.event_shape if transform is None else transform.inverse_shape(fn.event_shape)
            sites.append(_LocalSite(name, name.replace(".", "/"), torch.Size(latent_shape), transform))
        if not sites:
            raise ValueError(
                f"PerDatapointGuide found no latent sample site inside the plate {self.plate!r} of the "
                "model. Pass plate= the name of the model's data plate."
            )
        value = trace.nodes[sites[0].name]["value"]
        self.__dict__["_dtype_device"] = (value.dtype, value.device)
        return sites

    def _build_tables(self) -> None:
        if self.num_data is None:
            raise ValueError(
                "PerDatapointGuide needs the number of training examples: pass num_data= to it, or "
                "call guide.set_num_data(n) (pyro_lvm.LVMModule / fit do so from the training set)."
            )
        dtype, device = self.__dict__["_dtype_device"]
        for site in self._sites:
            shape = (self.num_data, *site.latent_shape)
            self.locs[site.key] = nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
            self.raw_scales[site.key] = nn.Parameter(
                torch.full(shape, inverse_softplus(self.init_scale), dtype=dtype, device=device)
            )

    def _setup(self, args: tuple, kwargs: dict) -> None:
        if self._sites is None:
            self.__dict__["_sites"] = self._discover(args, kwargs)
        if len(self.locs) == 0 and self.num_data is not None:
            self._build_tables()

    def _q(self, site: _LocalSite, loc: torch.Tensor, scale: torch.Tensor) -> dist.TorchDistribution:
        base = dist.Normal(loc, scale).to_event(len(site.latent_shape))
        return base if site.transform is None else dist.TransformedDistribution(base, site.transform)

    def _plate(self, args: tuple, kwargs: dict) -> pyro.plate:
        if self._create_plate is not None:
            return self._create_plate(*args, **kwargs)
        return guide_plate(self.plate, args[0], kwargs.get("num_data"))

    def _check_index(self, index: Optional[torch.Tensor], batch: int) -> torch.Tensor:
        if index is None:
            raise ValueError(
                "PerDatapointGuide needs the example's index: use a pyro_lvm data module (batches "
                "carry 'index') or pass index=..."
            )
        if is_validation_enabled():
            if index.shape != (batch,):
                raise ValueError(
                    f"PerDatapointGuide needs one index per example, shape ({batch},); got shape "
                    f"{tuple(index.shape)}."
                )
            low, high = int(index.min()), int(index.max())
            if low < 0 or high >= self.num_data:
                raise ValueError(
                    f"PerDatapointGuide has rows for {self.num_data} training examples but got index "
                    f"{low if low < 0 else high}. The index is the position in the training set; "
                    "held-out examples have no row: call guide.eval() to fit their q afresh."
                )
        return index

    # ----- inference ----------------------------------------------------------------
    def refit(self, *args: Any, **kwargs: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        r"""Fit fresh :math:`(\mu_i, \sigma_i)` to the batch by ``eval_steps`` Adam steps on its ELBO.

        Starts from the average of the trained rows (zeros before training),
        maximizes the one-sample ELBO :math:`\sum_i \log p(x_i, z_i) - \log q_i(z_i)` with
        respect to the new parameters only (``torch.autograd.grad``: nothing is
        accumulated in the model's ``.grad``), even under ``torch.no_grad`` or
        ``torch.inference_mode`` (Lightning's validate and test). Latent
        sites of the model outside the plate are drawn from their prior meanwhile.
        Returns, per site, the detached ``(loc, scale)`` of the Gaussian in the
        unconstrained space, one row per example of the batch.
        """
        index = kwargs.pop("index", None)
        model_kwargs = dict(kwargs, index=index) if index is not None else kwargs
        self._setup(args, model_kwargs)
        with poutine.block():
            batch = self._plate(args, model_kwargs).subsample_size
        return self._refit(args, model_kwargs, batch, self.eval_steps)

    def _refit(
        self, args: tuple, kwargs: dict, batch: int, steps: int
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        with autograd_on():
            return self._fit_fresh(
                tuple(map(normal_tensor, args)), {k: normal_tensor(v) for k, v in kwargs.items()}, batch, steps
            )

    def _fit_fresh(
        self, args: tuple, kwargs: dict, batch: int, steps: int
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        model = accepting(self.model)
        dtype, device = self.__dict__["_dtype_device"]
        if args and isinstance(args[0], torch.Tensor):
            device = args[0].device  # the module may have moved since the model was traced
        params = {}
        for site in self._sites:
            if site.key in self.locs:
                loc = self.locs[site.key].detach().mean(0)
                raw = self.raw_scales[site.key].detach().mean(0)
            else:
                loc = torch.zeros(site.latent_shape, dtype=dtype, device=device)
                raw = torch.full(
                    site.latent_shape, inverse_softplus(self.init_scale), dtype=dtype, device=device
                )
            shape = (batch, *site.latent_shape)
            params[site.name] = (loc.expand(shape).clone().requires_grad_(),
                                 raw.expand(shape).clone().requires_grad_())
        leaves = [t for pair in params.values() for t in pair]

        def negative_elbo() -> torch.Tensor:
            log_q, values = 0.0, {}
            for site in self._sites:
                loc, raw = params[site.name]
                q = self._q(site, loc, softplus(raw))
                values[site.name] = z = q.rsample()
                log_q = log_q + q.log_prob(z).sum()
            with poutine.block():
                trace = poutine.trace(poutine.condition(model, data=values)).get_trace(*args, **kwargs)
            return log_q - log_joint(trace)

        minimize_cosine(leaves, negative_elbo, steps, self.eval_lr)
        return {name: (loc.detach(), softplus(raw).detach()) for name, (loc, raw) in params.items()}

    def forward(
        self, *args: Any, index: Optional[torch.Tensor] = None, **kwargs: Any
    ) -> dict[str, torch.Tensor]:
        model_kwargs = dict(kwargs, index=index) if index is not None else kwargs
        self._setup(args, model_kwargs)
        plate = self._plate(args, model_kwargs)
        if not self.training:
            params = self._refit(args, model_kwargs, plate.subsample_size, self.eval_steps)
        elif index is None and not torch.is_grad_enabled():
            # no row to read and nothing to train (e.g. an estimator's check on a bare batch)
            params = self._refit(args, model_kwargs, plate.subsample_size, 0)
        else:
            if len(self.locs) == 0:
                self._build_tables()  # raises: no num_data
            index = self._check_index(index, plate.subsample_size)
            params = {
                site.name: (self.locs[site.key][index], softplus(self.raw_scales[site.key][index]))
                for site in self._sites
            }
        values = {}
        with plate:
            for site in self._sites:
                values[site.name] = pyro.sample(site.name, self._q(site, *params[site.name]))
        return values

    def extra_repr(self) -> str:
        sites = None if self._sites is None else [s.name for s in self._sites]
        return f"num_data={self.num_data}, plate={self.plate!r}, sites={sites}"
