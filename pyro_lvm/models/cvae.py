"""The conditional VAE for structured prediction, and the deterministic network it is measured against."""

from __future__ import annotations

import inspect
import math
from typing import Any, Literal, Optional, Sequence, Union

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.util import is_validation_enabled
from pyro.nn import PyroModule
from torch.nn.functional import softplus

from ..likelihoods import Likelihood, LikelihoodName, likelihood_config, make_likelihood
from ..nets import MLP
from ..ops import log_mean_exp
from .base import DataChecks, LatentVariableModel, data_plate

__all__ = ["ConditionalVAE", "DeterministicBaseline", "evaluate_conditional"]

_Shape = Union[int, Sequence[int]]

# the importance-sampled likelihood decodes at most this many pixels at once (about 16 MB of floats)
_CHUNK_ELEMENTS = 2**22


def _as_config_shape(shape: _Shape) -> Union[int, list[int]]:
    return shape if isinstance(shape, int) else list(shape)


def _as_size(shape: _Shape) -> torch.Size:
    return torch.Size([shape] if isinstance(shape, int) else shape)


def _restricted(fn: dist.TorchDistribution, mask: Optional[torch.Tensor]) -> dist.TorchDistribution:
    """``fn`` (an ``Independent`` likelihood) whose log-density sums only over the pixels in ``mask``.

    The mask goes on the element-wise base distribution, before the event sum:
    ``fn.mask(mask)`` would keep or drop whole images instead.
    """
    if mask is None:
        return fn
    base, event_dims = fn, 0
    while isinstance(base, torch.distributions.Independent):
        event_dims += base.reinterpreted_batch_ndims
        base = base.base_dist
    return base.mask(mask).to_event(event_dims)


class _ConditionalIO:
    """What the conditional models share: the checks of ``(x, y, mask)`` and flattening."""

    event_shape: torch.Size
    input_shape: torch.Size
    likelihood: Likelihood

    def _flat_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[: x.dim() - len(self.input_shape)] + (-1,))

    def _check_batch(
        self, x: torch.Tensor, y: Optional[torch.Tensor], mask: Optional[torch.Tensor], support: bool
    ) -> None:
        if not is_validation_enabled():
            return
        self.check_batch(x, support=False, shape=self.input_shape, arg="input_shape")  # x is -1 where hidden
        if y is None:
            return
        self.check_batch(y, support=support, name="y")
        if y.shape[0] != x.shape[0]:
            raise ValueError(
                f"x and y must hold the same number of examples; got {x.shape[0]} inputs and "
                f"{y.shape[0]} targets."
            )
        if mask is not None and (mask.dtype != torch.bool or mask.shape != y.shape):
            raise ValueError(
                f"mask must be a boolean tensor of y's shape {tuple(y.shape)}, True on the pixels to "
                f"predict; got dtype {mask.dtype} and shape {tuple(mask.shape)}. Use the 'mask' of "
                "pyro_lvm.data.QuadrantsDataModule batches, or e.g. mask=(m > 0)."
            )

    def _observe(
        self, fn: dist.TorchDistribution, y: Optional[torch.Tensor], mask: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """The site ``"y"``: observed on ``mask``, or (``y`` None) a draw recorded as a deterministic site."""
        if y is None:
            # recorded, not latent: an estimator's check on a batch without targets finds no site
            # the guide would have to cover, and Predictive still returns the draws
            return pyro.deterministic("y", fn.sample(), event_dim=len(self.event_shape))
        return pyro.sample("y", _restricted(fn, mask), obs=y)

    def example_batch(self, batch_size: int = 2) -> torch.Tensor:
        """A valid input ``x`` of zeros (no target: ``model`` then predicts ``y``)."""
        reference = next(self.parameters())  # type: ignore[attr-defined]
        return reference.new_zeros((batch_size,) + tuple(self.input_shape))


class ConditionalVAE(_ConditionalIO, LatentVariableModel):
    r"""Conditional variational autoencoder (Sohn, Lee & Yan 2015): a latent-variable model of y given x.

    The generative model of an output :math:`y` (e.g. the hidden part of an
    image) given an input :math:`x` (the visible part), and the recognition model, are

    .. math::

        p_\theta(y, z \mid x) = p_\theta(z \mid x)\, p_\theta(y \mid x, z), \qquad
        q_\phi(z \mid x, y) = \mathcal N\big(z \mid \mu_\phi(x, y),
            \operatorname{diag}\sigma_\phi(x, y)^2\big),

    with the prior :math:`p_\theta(z \mid x)` a Gaussian from a prior network
    (``prior="learned"``) or :math:`\mathcal N(0, I)` (``prior="standard"``).
    Training maximizes the conditional evidence lower bound

    .. math::

        \log p_\theta(y \mid x) \ \ge\ \mathbb E_{q_\phi(z \mid x, y)}[\log p_\theta(y \mid x, z)]
            - \mathrm{KL}\big(q_\phi(z \mid x, y)\,\|\,p_\theta(z \mid x)\big).

    At test time :math:`z \sim p_\theta(z \mid x)` and :math:`y \sim p_\theta(y \mid x, z)`
    (:meth:`predict`); since the outputs are then a mixture over :math:`z`, the
    model can predict several plausible completions where a deterministic network
    (:class:`DeterministicBaseline`) predicts their blurred average.
    :meth:`conditional_log_likelihood` estimates :math:`\log p_\theta(y \mid x)`
    by importance sampling from :math:`q_\phi`.

    ``mask`` (boolean, ``y``'s shape) restricts the likelihood to the pixels to
    predict: :math:`\log p_\theta(y \mid x, z)` then sums over the masked pixels only,
    the others (visible in ``x``) are not scored. :meth:`model` and :meth:`guide`
    take ``(x, y=None, mask=None, num_data=None)``; the latent is the site ``"z"``
    and the output the site ``"y"``, both in ``pyro.plate("data")``. With ``y``
    None the guide draws :math:`z` from the prior :math:`p_\theta(z \mid x)` and the model
    draws :math:`y` (recorded as a deterministic site), so the pair also runs under
    :class:`pyro.infer.Predictive`. The decoder reads ``(x, z)``, the recognition
    network ``(x, y)`` and the prior network ``x``, each flattened.

    References:
        Sohn, Lee & Yan (2015), "Learning Structured Output Representation using
        Deep Conditional Generative Models", NeurIPS,
        https://papers.nips.cc/paper/5775-learning-structured-output-representation-using-deep-conditional-generative-models

    Arguments:
        data_shape: shape of one output ``y`` (an int for flat vectors).
        input_shape: shape of one input ``x``; ``None`` for ``data_shape``.
        latent_dim: dimension of ``z``.
        hidden_dims: widths of the recognition and prior networks' hidden layers; the decoder mirrors them.
        prior: ``"learned"`` (a prior network :math:`p_\theta(z \mid x)`) or ``"standard"`` (:math:`\mathcal N(0, I)`).
        likelihood: a name, ``"bernoulli"`` (binary outputs), ``"continuous_bernoulli"`` (grey levels in
            [0, 1]), ``"gaussian"``, ``"discretized_logistic"`` or ``"categorical"`` (8-bit outputs, k/255), or a
            :class:`~pyro_lvm.likelihoods.Likelihood` object (YAML: ``{class_path: ..., init_args: ...}``), which
            the model binds to ``data_shape``; the network ends in its ``output_dim`` numbers.
        likelihood_scale: Gaussian (by name) only: a fixed ``sigma`` or ``"learned"`` (per dimension).
        activation: nonlinearity of the networks.

    Example:
        >>> import pyro
        >>> cvae = ConditionalVAE(data_shape=4, latent_dim=2, hidden_dims=[8])
        >>> y = torch.bernoulli(torch.full((5, 4), 0.5))
        >>> mask = torch.tensor([False, False, True, True]).expand(5, 4)  # predict the last two
        >>> x = y.masked_fill(mask, -1.0)
        >>> loss = pyro.infer.Trace_ELBO().loss(cvae.model, cvae.guide, x, y, mask)
        >>> cvae.predict(x, num_samples=3).shape  # E[y | x, z], z ~ p(z | x)
        torch.Size([3, 5, 4])
        >>> cvae.conditional_log_likelihood(x, y, mask, num_particles=10).shape
        torch.Size([5])
    """

    def __init__(
        self,
        data_shape: _Shape = (1, 8, 8),
        input_shape: Optional[_Shape] = None,
        latent_dim: int = 8,
        hidden_dims: Sequence[int] = (256, 256),
        prior: Literal["standard", "learned"] = "learned",
        likelihood: Union[LikelihoodName, Likelihood] = "bernoulli",
        likelihood_scale: Union[float, Literal["learned"]] = "learned",
        activation: str = "relu",
    ):
        super().__init__()
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be a positive integer; got {latent_dim}.")
        if prior not in ("standard", "learned"):
            raise ValueError(
                f"Unknown prior={prior!r}; choose 'learned' (a prior network p(z | x)) or "
                "'standard' (N(0, I))."
            )
        self.config = dict(
            data_shape=_as_config_shape(data_shape),
            input_shape=None if input_shape is None else _as_config_shape(input_shape),
            latent_dim=latent_dim,
            hidden_dims=list(hidden_dims),
            prior=prior,
            likelihood=likelihood_config(likelihood),
            likelihood_scale=likelihood_scale,
            activation=activation,
        )
        self.latent_dim = latent_dim
        self.latent_shape = torch.Size([latent_dim])
        self.likelihood: Likelihood = make_likelihood(likelihood, data_shape, scale=likelihood_scale)
        self.event_shape = self.likelihood.event_shape
        self.input_shape = self.event_shape if input_shape is None else _as_size(input_shape)
        input_dim, data_dim = math.prod(self.input_shape), self.likelihood.data_dim
        self.encoder = MLP(input_dim + data_dim, hidden_dims, 2 * latent_dim, activation)
        self.prior_net = MLP(input_dim, hidden_dims, 2 * latent_dim, activation) if prior == "learned" else None
        self.decoder = MLP(input_dim + latent_dim, list(reversed(hidden_dims)), self.likelihood.output_dim, activation)

    # ----- the Pyro model/guide pair -------------------------------------------------
    def model(
        self,
        x: torch.Tensor,
        y: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
        num_data: Optional[int] = None,
    ) -> torch.Tensor:
        """p(y, z | x): ``z ~ p(z | x)``, ``y ~ p(y | x, z)``; observes ``y`` on ``mask``."""
        self._check_batch(x, y, mask, support=True)
        pyro.module("decoder", self.decoder)
        pyro.module("likelihood", self.likelihood)
        if self.prior_net is not None:
            pyro.module("prior_net", self.prior_net)
        with data_plate(x, num_data):
            z = pyro.sample("z", self.conditional_prior(x))
            return self._observe(self.likelihood(self.decoder_output(z, x)), y, mask)

    def guide(
        self,
        x: torch.Tensor,
        y: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
        num_data: Optional[int] = None,
    ) -> torch.Tensor:
        """q(z | x, y), the recognition network; the prior p(z | x) when ``y`` is None."""
        self._check_batch(x, y, mask, support=False)
        if y is None:
            if self.prior_net is not None:
                pyro.module("prior_net", self.prior_net)
            with data_plate(x, num_data):
                return pyro.sample("z", self.conditional_prior(x))
        pyro.module("encoder", self.encoder)
        with data_plate(x, num_data):
            loc, scale = self.encode(x, y)
            return pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    # ----- the networks --------------------------------------------------------------
    def _gaussian(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, raw = h.split(self.latent_dim, dim=-1)
        return loc, softplus(raw) + 1e-5

    def conditional_prior(self, x: torch.Tensor) -> dist.TorchDistribution:
        """p(z | x): the prior network's Gaussian, or N(0, I), with batch shape ``(B,)``."""
        if self.prior_net is None:
            return self.prior(x.shape[:1])
        return dist.Normal(*self._gaussian(self.prior_net(self._flat_input(x)))).to_event(1)

    def encode(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of q(z | x, y), or of the prior p(z | x) when ``y`` is None."""
        if y is None:
            prior = self.conditional_prior(x).base_dist
            return prior.loc, prior.scale
        y = y.reshape(y.shape[: y.dim() - len(self.event_shape)] + (-1,))
        return self._gaussian(self.encoder(torch.cat([self._flat_input(x), y], dim=-1)))

    def decoder_output(self, z: torch.Tensor, x: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x is None:
            raise ValueError(
                "ConditionalVAE decodes (x, z), not z alone: pass the input x, e.g. decode(z, x), "
                "or use predict(x)."
            )
        x = self._flat_input(x)
        # z may carry particle / sample dims on the left of the batch dim
        batch_shape = z.shape[: z.dim() - len(self.latent_shape)]
        return self.decoder(torch.cat([x.expand(batch_shape + x.shape[-1:]), z], dim=-1))

    def decode(self, z: torch.Tensor, x: Optional[torch.Tensor] = None) -> torch.Tensor:
        """E[y | x, z] for ``z`` of shape ``(..., B, latent_dim)`` and ``x`` of shape ``(B, *input_shape)``."""
        return self.likelihood.mean(self.decoder_output(z, x))

    # ----- prediction and evaluation --------------------------------------------------
    @torch.no_grad()
    def predict(self, x: torch.Tensor, num_samples: int = 1, mean: bool = True) -> torch.Tensor:
        """Outputs for ``x``: E[y | x, z] (``mean=True``) or a draw of y, with z ~ p(z | x).

        Returns a tensor of shape ``(num_samples, B, *data_shape)``.
        """
        z = self.conditional_prior(x).sample(torch.Size([num_samples]))
        h = self.decoder_output(z, x)
        return self.likelihood.mean(h) if mean else self.likelihood(h).sample()

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """The prediction E[y | x, z] at z = the mean of p(z | x) (a draw of it if ``sample``)."""
        prior = self.conditional_prior(x)
        return self.decode(prior.sample() if sample else prior.mean, x)

    def sample(self, num_samples: int, mean: bool = True) -> torch.Tensor:
        """Not defined: a conditional model has no unconditional samples. Raises ``ValueError``."""
        raise ValueError(
            "ConditionalVAE models y given x and has no unconditional samples; use predict(x, "
            "num_samples) to draw outputs for inputs x."
        )

    def _log_likelihood(
        self, x: torch.Tensor, y: torch.Tensor, mask: Optional[torch.Tensor], z: torch.Tensor
    ) -> torch.Tensor:
        return _restricted(self.likelihood(self.decoder_output(z, x)), mask).log_prob(y)

    @torch.no_grad()
    def conditional_log_likelihood(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        num_particles: int = 100,
    ) -> torch.Tensor:
        r"""Importance-sampled :math:`\log p_\theta(y_{\text{mask}} \mid x)` per data point, shape ``(B,)``.

        .. math::

            \log p_\theta(y \mid x) \approx \log \frac1K \sum_{k=1}^K
                \frac{p_\theta(y \mid x, z_k)\, p_\theta(z_k \mid x)}{q_\phi(z_k \mid x, y)},
            \qquad z_k \sim q_\phi(z \mid x, y),

        with :math:`K` = ``num_particles``, as Sohn et al. (2015) evaluate. It is a
        stochastic lower bound whose expectation rises with :math:`K` towards
        :math:`\log p_\theta(y \mid x)`; :math:`K = 1` is a one-sample ELBO. The
        particles are drawn in chunks, so memory stays bounded for any :math:`K`.
        """
        self._check_batch(x, y, mask, support=True)
        if num_particles < 1:
            raise ValueError(f"num_particles must be a positive integer; got {num_particles}.")
        q = dist.Normal(*self.encode(x, y)).to_event(1)
        prior = self.conditional_prior(x)
        chunk = max(1, _CHUNK_ELEMENTS // (x.shape[0] * self.likelihood.output_dim))
        log_weights = []
        for start in range(0, num_particles, chunk):
            z = q.sample(torch.Size([min(chunk, num_particles - start)]))
            log_weights.append(self._log_likelihood(x, y, mask, z) + prior.log_prob(z) - q.log_prob(z))
        return log_mean_exp(torch.cat(log_weights), 0).squeeze(0)

    def extra_repr(self) -> str:
        return (
            f"latent_shape={tuple(self.latent_shape)}, event_shape={tuple(self.event_shape)}, "
            f"input_shape={tuple(self.input_shape)}, prior={self.config['prior']!r}"
        )


class DeterministicBaseline(_ConditionalIO, DataChecks, PyroModule):
    r"""A deterministic network from x to the distribution of y: the baseline of Sohn et al. (2015).

    .. math::

        p_\theta(y \mid x) = \prod_{d \in \text{mask}} p\big(y_d \mid f_\theta(x)_d\big),

    e.g. independent Bernoulli pixels with logits :math:`f_\theta(x)` from an MLP,
    trained by maximum likelihood on the masked pixels. Without a latent variable
    it predicts each pixel's marginal: it cannot say "either this digit or that
    one", which is where :class:`ConditionalVAE` does better. It is written as a
    Pyro model with no latent site (its ``guide`` does nothing), so it trains through
    :class:`pyro_lvm.LVMModule`, :func:`pyro_lvm.fit` and ``pyro-lvm fit`` like the
    other models, and its ``val/elbo`` there is exactly the conditional
    log-likelihood per data point.

    References:
        Sohn, Lee & Yan (2015), "Learning Structured Output Representation using
        Deep Conditional Generative Models", NeurIPS,
        https://papers.nips.cc/paper/5775-learning-structured-output-representation-using-deep-conditional-generative-models

    Arguments:
        data_shape: shape of one output ``y`` (an int for flat vectors).
        input_shape: shape of one input ``x``; ``None`` for ``data_shape``.
        hidden_dims: widths of the network's hidden layers.
        likelihood: a name, ``"bernoulli"`` (binary outputs), ``"continuous_bernoulli"`` (grey levels in
            [0, 1]), ``"gaussian"``, ``"discretized_logistic"`` or ``"categorical"`` (8-bit outputs, k/255), or a
            :class:`~pyro_lvm.likelihoods.Likelihood` object (YAML: ``{class_path: ..., init_args: ...}``), which
            the model binds to ``data_shape``; the network ends in its ``output_dim`` numbers.
        likelihood_scale: Gaussian (by name) only: a fixed ``sigma`` or ``"learned"`` (per dimension).
        activation: nonlinearity of the network.

    Example:
        >>> import pyro
        >>> net = DeterministicBaseline(data_shape=4, hidden_dims=[8])
        >>> y = torch.bernoulli(torch.full((5, 4), 0.5))
        >>> mask = torch.tensor([False, False, True, True]).expand(5, 4)
        >>> x = y.masked_fill(mask, -1.0)
        >>> loss = pyro.infer.Trace_ELBO().loss(net.model, net.guide, x, y, mask)  # -log p(y | x)
        >>> bool(torch.isclose(torch.tensor(loss), -net.conditional_log_likelihood(x, y, mask).sum()))
        True
    """

    def __init__(
        self,
        data_shape: _Shape = (1, 8, 8),
        input_shape: Optional[_Shape] = None,
        hidden_dims: Sequence[int] = (256, 256),
        likelihood: Union[LikelihoodName, Likelihood] = "bernoulli",
        likelihood_scale: Union[float, Literal["learned"]] = "learned",
        activation: str = "relu",
    ):
        super().__init__()
        self.config = dict(
            data_shape=_as_config_shape(data_shape),
            input_shape=None if input_shape is None else _as_config_shape(input_shape),
            hidden_dims=list(hidden_dims),
            likelihood=likelihood_config(likelihood),
            likelihood_scale=likelihood_scale,
            activation=activation,
        )
        self.likelihood: Likelihood = make_likelihood(likelihood, data_shape, scale=likelihood_scale)
        self.event_shape = self.likelihood.event_shape
        self.input_shape = self.event_shape if input_shape is None else _as_size(input_shape)
        self.net = MLP(math.prod(self.input_shape), hidden_dims, self.likelihood.output_dim, activation)

    def model(
        self,
        x: torch.Tensor,
        y: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
        num_data: Optional[int] = None,
    ) -> torch.Tensor:
        """p(y | x): observes ``y`` on ``mask`` (draws it when ``y`` is None)."""
        self._check_batch(x, y, mask, support=True)
        pyro.module("net", self.net)
        pyro.module("likelihood", self.likelihood)
        with data_plate(x, num_data):
            return self._observe(self.likelihood(self.net(self._flat_input(x))), y, mask)

    def guide(
        self,
        x: torch.Tensor,
        y: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
        num_data: Optional[int] = None,
    ) -> None:
        """Nothing to infer: the model has no latent variable."""

    @torch.no_grad()
    def predict(self, x: torch.Tensor, num_samples: int = 1, mean: bool = True) -> torch.Tensor:
        """E[y | x] (``mean=True``) or draws of y, shape ``(num_samples, B, *data_shape)``."""
        h = self.net(self._flat_input(x)).expand(num_samples, x.shape[0], self.likelihood.output_dim)
        return self.likelihood.mean(h) if mean else self.likelihood(h).sample()

    @torch.no_grad()
    def conditional_log_likelihood(
        self, x: torch.Tensor, y: torch.Tensor, mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        r"""The exact :math:`\log p_\theta(y_{\text{mask}} \mid x)` per data point, shape ``(B,)``."""
        self._check_batch(x, y, mask, support=True)
        return _restricted(self.likelihood(self.net(self._flat_input(x))), mask).log_prob(y)


@torch.no_grad()
def evaluate_conditional(
    model: Union[ConditionalVAE, DeterministicBaseline, Any],
    datamodule: Any,
    split: str = "test",
    num_particles: int = 100,
) -> float:
    r"""Mean conditional log-likelihood :math:`\log p(y_{\text{mask}} \mid x)` of a split, in nats per example.

    Runs ``model.conditional_log_likelihood(x, y, mask)`` over the split's batches
    (with ``num_particles`` importance samples for a latent-variable model; exact for
    :class:`DeterministicBaseline`), in eval mode, on the model's device. Higher is better.

    Arguments:
        model: a :class:`ConditionalVAE`, a :class:`DeterministicBaseline`, or any
            module with such a ``conditional_log_likelihood``.
        datamodule: a data module with ``x``, ``y`` and ``mask`` batches, e.g.
            :class:`pyro_lvm.data.QuadrantsDataModule`.
        split: ``"train"``, ``"val"`` or ``"test"``.
        num_particles: importance samples per example (latent-variable models).

    Example:
        >>> from pyro_lvm.data import QuadrantsDataModule
        >>> data = QuadrantsDataModule(source="digits")
        >>> untrained = DeterministicBaseline(data_shape=(1, 8, 8), hidden_dims=[16])
        >>> -60 < evaluate_conditional(untrained, data) < -20  # about 48 log(1/2) = -33
        True
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test'; got {split!r}.")
    datamodule.setup("test" if split == "test" else "fit")
    loader = getattr(datamodule, f"{split}_dataloader")()
    if split == "train":
        # the training loader shuffles and drops the last partial batch: score every example once
        loader = torch.utils.data.DataLoader(
            loader.dataset, batch_size=loader.batch_size, collate_fn=loader.collate_fn
        )
    takes_particles = "num_particles" in inspect.signature(model.conditional_log_likelihood).parameters
    options = {"num_particles": num_particles} if takes_particles else {}
    device = next(model.parameters()).device
    training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in loader:
            x, y, mask = (batch[key].to(device) for key in ("x", "y", "mask"))
            total += float(model.conditional_log_likelihood(x, y, mask, **options).sum())
            count += x.shape[0]
    finally:
        model.train(training)
    return total / count
