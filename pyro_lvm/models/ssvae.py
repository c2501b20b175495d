"""The semi-supervised VAE (M2 of Kingma et al. 2014) as a Pyro model/guide pair."""

from __future__ import annotations

import contextlib
from typing import Literal, Optional, Sequence, Union

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer.util import is_validation_enabled
from torch.nn.functional import one_hot, softplus

from ..likelihoods import Likelihood, make_likelihood
from ..nets import MLP
from .base import LatentVariableModel, data_plate

__all__ = ["SemiSupervisedVAE"]


def _cat(*tensors: torch.Tensor) -> torch.Tensor:
    """Concatenate along the last dim after broadcasting the others (an enumerated ``y`` has extra dims)."""
    shape = torch.broadcast_shapes(*(t.shape[:-1] for t in tensors))
    return torch.cat([t.expand(shape + t.shape[-1:]) for t in tensors], -1)


class SemiSupervisedVAE(LatentVariableModel):
    r"""The semi-supervised VAE M2 (Kingma, Rezende, Mohamed & Welling 2014): a class ``y`` and a style ``z``.

    The generative model and the guide are

    .. math::

        p_\theta(x, y, z) = \mathrm{Cat}(y \mid \tfrac1C)\, \mathcal N(z \mid 0, I)\, p_\theta(x \mid y, z),
        \qquad
        q_\phi(y, z \mid x) = \mathrm{Cat}\big(y \mid \operatorname{softmax} \pi_\phi(x)\big)\,
            \mathcal N\big(z \mid \mu_\phi(x, y), \operatorname{diag}\sigma_\phi(x, y)^2\big),

    with a decoder MLP on :math:`[z, \mathrm{onehot}(y)]`, an encoder MLP on :math:`[x, \mathrm{onehot}(y)]`
    and a classifier MLP :math:`\pi_\phi(x)`. Where the label is known, ``y`` is observed and the bound is

    .. math::

        \log p_\theta(x, y) \ \ge\ \mathcal L(x, y) = \mathbb E_{q_\phi(z \mid x, y)}
            \big[\log p_\theta(x, y, z) - \log q_\phi(z \mid x, y)\big];

    where it is not, ``y`` is latent and

    .. math::

        \log p_\theta(x) \ \ge\ \mathcal U(x) = \sum_y q_\phi(y \mid x)
            \big[\mathcal L(x, y) - \log q_\phi(y \mid x)\big].

    Only :math:`\mathcal U` trains the classifier, so M2 adds the classification term of Kingma et al.
    (their :math:`\alpha\, \mathbb E_{\tilde p_l}[\log q_\phi(y \mid x)]` with :math:`\alpha = 0.1 N`),

    .. math::

        \mathcal J = \sum_{(x, y)\ \text{labelled}} \mathcal L(x, y) + \sum_{x\ \text{unlabelled}} \mathcal U(x)
            + \texttt{classifier\_weight} \cdot N \cdot \frac1{N_l}\sum_{(x, y)\ \text{labelled}} \log q_\phi(y \mid x),

    so ``classifier_weight`` is :math:`\alpha / N`, the weight relative to the data size :math:`N`: the paper's
    :math:`\alpha = 0.1 N` is the default ``0.1`` whatever :math:`N` and the number :math:`N_l` of labels. Per
    data point (what :class:`pyro_lvm.LVMModule` minimizes) it is the mean ELBO plus ``classifier_weight`` times
    the labelled points' mean :math:`\log q_\phi(y \mid x)`: next to an ELBO of about 100 nats per MNIST image a
    small weight, with which the classifier learns slowly (100 MNIST labels, 400 steps of 100 images: test error
    0.66 at 0.1, 0.32 at 1, 0.26 at 5). On a batch of :math:`B` points, :math:`n_l` of them
    labelled, it is the model's ``pyro.factor("classification", ...)`` in the data plate: each labelled point adds
    ``classifier_weight`` :math:`\cdot B / n_l \cdot \log q_\phi(y \mid x)` (the batch's labelled mean, scaled to
    the batch, then by the data plate to ``num_data``), so every Pyro ELBO includes it. It is a training
    objective, not part of the model's evidence: it is added only while gradients are taken in training mode
    (``model.training`` and :func:`torch.is_grad_enabled`), so that held-out ELBOs (:class:`pyro_lvm.LVMModule`'s
    ``val/elbo``), :func:`pyro_lvm.diagnostics.log_likelihood` and ``SVI.evaluate_loss`` are bounds on
    :math:`\log p(x)` (or :math:`\log p(x, y)`).

    **Batches**: ``x`` and optionally ``y``, long labels with ``-1`` where the label is unknown (``y=None``: all
    unknown), as :class:`pyro_lvm.data.SemiSupervisedDigitsDataModule` and
    :class:`pyro_lvm.data.SemiSupervisedMNISTDataModule` serve them; optionally ``weight``, a positive weight per
    point on its ELBO terms (those data modules add it when they draw a fixed number of labelled points per batch,
    so that the weighted batch stays an unbiased estimate of :math:`\mathcal J`). The label is the model's site
    ``"y"`` with Pyro's ``obs_mask``: ``"y_observed"`` on the labelled points and the latent ``"y_unobserved"``
    on the others (a :class:`~pyro.distributions.OneHotCategorical`), which the guide draws from
    :math:`q_\phi(y \mid x)`; the site is masked out on labelled points. The sum over ``y`` in
    :math:`\mathcal U` is the estimator's: ``"enum"`` sums it exactly (TraceEnum_ELBO; with Pyro's own,
    ``config_enumerate(guide)``), ``"relaxed"`` draws a Gumbel-softmax relaxation with the KL in closed form,
    ``"score_function"`` and ``"vimco"`` draw it. Under enumeration the guide's labelled points see ``C`` copies of
    ``z`` weighted uniformly, an unbiased estimate of their term (their classifier logits are zeros there, so no
    gradient reaches the classifier through them). Held out, the labels of the data modules' validation and test
    splits are all given: ``val/elbo`` and :func:`pyro_lvm.diagnostics.log_likelihood` with ``y`` are then about
    :math:`\log p(x, y)` (without ``y``, :math:`\log p(x)`), and :meth:`held_out_metrics` adds ``val/error``.

    References:
        Semi-Supervised Learning with Deep Generative Models (Kingma, Rezende, Mohamed & Welling, 2014),
        https://arxiv.org/abs/1406.5298

    Arguments:
        data_shape: shape of one data point (an int for flat vectors).
        num_classes: number :math:`C` of classes.
        latent_dim: dimension of ``z``.
        hidden_dims: widths of the encoder's hidden layers; the decoder mirrors them.
        classifier_hidden_dims: widths of the classifier's hidden layers (``None``: ``hidden_dims``).
        likelihood: ``"bernoulli"`` (binary data), ``"continuous_bernoulli"`` (grey levels in [0, 1]) or ``"gaussian"``.
        likelihood_scale: Gaussian only: a fixed ``sigma`` or ``"learned"`` (per dimension).
        activation: nonlinearity of the networks (Kingma et al.: softplus).
        classifier_weight: :math:`\alpha / N` (see above); 0 leaves the classifier to :math:`\mathcal U` alone.

    Example:
        >>> import pyro
        >>> from pyro_lvm.estimators import EnumELBO
        >>> m2 = SemiSupervisedVAE(data_shape=4, num_classes=3, latent_dim=2, hidden_dims=[8])
        >>> x = torch.bernoulli(torch.full((5, 4), 0.5))
        >>> y = torch.tensor([0, 2, -1, -1, 1])  # -1: no label
        >>> loss = EnumELBO().differentiable_loss(m2.model, m2.guide, x, y)  # y summed out where unknown
        >>> loss.backward()
        >>> m2.classify(x).shape, m2.class_probs(x).shape
        (torch.Size([5]), torch.Size([5, 3]))
        >>> m2.sample(6, y=torch.arange(3).repeat(2)).shape  # E[x | y, z], z ~ N(0, I)
        torch.Size([6, 4])
    """

    def __init__(
        self,
        data_shape: Union[int, Sequence[int]] = 64,
        num_classes: int = 10,
        latent_dim: int = 8,
        hidden_dims: Sequence[int] = (256,),
        classifier_hidden_dims: Optional[Sequence[int]] = None,
        likelihood: Literal["bernoulli", "continuous_bernoulli", "gaussian"] = "bernoulli",
        likelihood_scale: Union[float, Literal["learned"]] = "learned",
        activation: str = "softplus",
        classifier_weight: float = 0.1,
    ):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2; got {num_classes!r}.")
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be a positive integer; got {latent_dim}.")
        if not classifier_weight >= 0:
            raise ValueError(
                f"classifier_weight (alpha / N of Kingma et al., who use 0.1) must be >= 0; got {classifier_weight}."
            )
        classifier_hidden = hidden_dims if classifier_hidden_dims is None else classifier_hidden_dims
        self.config = dict(
            data_shape=data_shape if isinstance(data_shape, int) else list(data_shape),
            num_classes=num_classes,
            latent_dim=latent_dim,
            hidden_dims=list(hidden_dims),
            classifier_hidden_dims=None if classifier_hidden_dims is None else list(classifier_hidden_dims),
            likelihood=likelihood,
            likelihood_scale=likelihood_scale,
            activation=activation,
            classifier_weight=classifier_weight,
        )
        self.num_classes = num_classes
        self.latent_dim = latent_dim
        self.latent_shape = torch.Size([latent_dim])
        self.classifier_weight = float(classifier_weight)
        self.likelihood: Likelihood = make_likelihood(likelihood, data_shape, scale=likelihood_scale)
        self.event_shape = self.likelihood.event_shape
        data_dim = self.likelihood.data_dim
        self.classifier = MLP(data_dim, classifier_hidden, num_classes, activation)
        self.encoder = MLP(data_dim + num_classes, hidden_dims, 2 * latent_dim, activation)
        self.decoder = MLP(latent_dim + num_classes, list(reversed(hidden_dims)), data_dim, activation)

    # ----- the batch ------------------------------------------------------------------
    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[: x.dim() - len(self.event_shape)] + (-1,))

    def _labels(self, x: torch.Tensor, y: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(labelled, label)``: which points have a label, and the labels with -1 replaced by 0."""
        if y is None:
            return torch.zeros(x.shape[:1], dtype=torch.bool, device=x.device), x.new_zeros(x.shape[:1], dtype=torch.long)
        if is_validation_enabled():
            if y.shape != x.shape[:1] or y.is_floating_point() or y.dtype == torch.bool:
                raise ValueError(
                    f"SemiSupervisedVAE expects y as integer labels of shape ({x.shape[0]},), -1 where unknown; got "
                    f"dtype {y.dtype} and shape {tuple(y.shape)}."
                )
            if len(y) and (int(y.min()) < -1 or int(y.max()) >= self.num_classes):
                raise ValueError(
                    f"Labels must lie in 0..{self.num_classes - 1} (or be -1 where unknown); got values from "
                    f"{int(y.min())} to {int(y.max())}. Set num_classes, or mark unknown labels with -1."
                )
        return y >= 0, y.clamp(min=0)

    def _one_hot(self, label: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return one_hot(label, self.num_classes).to(like.dtype)

    @property
    def classification_active(self) -> bool:
        """Whether :meth:`model` adds the classification term: in training mode, with gradients enabled."""
        return self.classifier_weight > 0 and self.training and torch.is_grad_enabled()

    def classification_term(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        r"""Per point, ``classifier_weight`` :math:`\cdot B / n_l \cdot \log q_\phi(y \mid x)` on the labelled ones, 0 elsewhere.

        Summed over the batch, ``classifier_weight`` times :math:`B` times the labelled points' mean
        :math:`\log q_\phi(y \mid x)` (0 when the batch has no label): see the class docstring.
        """
        labelled, label = self._labels(x, y)
        log_q = dist.Categorical(logits=self.classifier(self._flat(x))).log_prob(label)
        weight = self.classifier_weight * len(x) / labelled.sum().clamp(min=1)
        return torch.where(labelled, log_q, torch.zeros_like(log_q)) * weight

    # ----- the Pyro model/guide pair -------------------------------------------------
    def label_prior(self) -> dist.TorchDistribution:
        """p(y): uniform over the ``num_classes`` classes, as a one-hot categorical."""
        return dist.OneHotCategorical(logits=self._reference.new_zeros(self.num_classes))

    def model(
        self,
        x: torch.Tensor,
        y: Optional[torch.Tensor] = None,
        weight: Optional[torch.Tensor] = None,
        num_data: Optional[int] = None,
    ) -> torch.Tensor:
        """p(x, y, z): ``y ~ Cat(1/C)`` (observed where ``y >= 0``), ``z ~ N(0, I)``, ``x ~ p(x | y, z)``."""
        self.check_batch(x)
        labelled, label = self._labels(x, y)
        pyro.module("decoder", self.decoder)
        pyro.module("likelihood", self.likelihood)
        with data_plate(x, num_data):
            if self.classification_active and bool(labelled.any()):
                pyro.module("classifier", self.classifier)
                pyro.factor("classification", self.classification_term(x, y))
            with self._weighted(weight):
                digit = pyro.sample("y", self.label_prior(), obs=self._one_hot(label, x), obs_mask=labelled)
                z = pyro.sample("z", self.prior())
                return pyro.sample("x", self.likelihood(self.decoder_output(z, digit)), obs=x)

    def guide(
        self,
        x: torch.Tensor,
        y: Optional[torch.Tensor] = None,
        weight: Optional[torch.Tensor] = None,
        num_data: Optional[int] = None,
    ) -> torch.Tensor:
        """q(y | x) on the unlabelled points (site ``"y_unobserved"``), then q(z | x, y)."""
        self.check_batch(x, support=False)
        labelled, label = self._labels(x, y)
        pyro.module("classifier", self.classifier)
        pyro.module("encoder", self.encoder)
        logits = self.classifier(self._flat(x))
        logits = torch.where(labelled[:, None], torch.zeros_like(logits), logits)
        with data_plate(x, num_data), self._weighted(weight):
            with poutine.mask(mask=~labelled):
                guess = pyro.sample("y_unobserved", dist.OneHotCategorical(logits=logits))
            digit = torch.where(labelled[:, None], self._one_hot(label, x), guess)
            loc, scale = self._gaussian(x, digit)
            return pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    @staticmethod
    def _weighted(weight: Optional[torch.Tensor]):
        return contextlib.nullcontext() if weight is None else poutine.scale(scale=weight)

    # ----- the networks --------------------------------------------------------------
    def _gaussian(self, x: torch.Tensor, digit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, raw = self.encoder(_cat(self._flat(x), digit)).split(self.latent_dim, dim=-1)
        return loc, softplus(raw) + 1e-5

    def _as_one_hot(self, y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return y.to(like.dtype) if y.is_floating_point() else self._one_hot(y, like)

    def decoder_output(self, z: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The likelihood's input for ``z`` and ``y`` (labels, or one-hot / relaxed vectors, broadcasting)."""
        if y is None:
            raise ValueError(
                "SemiSupervisedVAE decodes (y, z), not z alone: pass the class, e.g. decoder_output(z, y); "
                "decode(z) averages over the classes."
            )
        return self.decoder(_cat(z, self._as_one_hot(y, z)))

    def decode(self, z: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        r"""E[x | y, z]; without ``y``, :math:`E[x \mid z] = \frac1C \sum_y E[x \mid y, z]` (the prior's mixture)."""
        if y is not None:
            return self.likelihood.mean(self.decoder_output(z, y))
        classes = torch.eye(self.num_classes, dtype=z.dtype, device=z.device).reshape(
            (self.num_classes,) + (1,) * (z.dim() - 1) + (self.num_classes,)
        )
        return self.likelihood.mean(self.decoder_output(z, classes)).mean(0)

    def encode(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of q(z | x, y); ``y`` None: at the classifier's prediction."""
        return self._gaussian(x, self._as_one_hot(self.classify(x) if y is None else y, x))

    # ----- classification --------------------------------------------------------------
    @torch.no_grad()
    def class_probs(self, x: torch.Tensor) -> torch.Tensor:
        """q(y | x) for each point, shape ``(B, num_classes)``."""
        return self.classifier(self._flat(x)).softmax(-1)

    @torch.no_grad()
    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """The most probable class under q(y | x), shape ``(B,)``."""
        return self.classifier(self._flat(x)).argmax(-1)

    @torch.no_grad()
    def classification_error(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """The fraction of the labelled points (``y >= 0``) that :meth:`classify` gets wrong."""
        labelled, label = self._labels(x, y)
        if not bool(labelled.any()):
            raise ValueError("classification_error needs labelled points (y >= 0); every label given is -1.")
        return float((self.classify(x[labelled]) != label[labelled]).double().mean())

    @torch.no_grad()
    def held_out_metrics(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """What :class:`pyro_lvm.LVMModule` logs besides the ELBO: ``error``, the number of misclassified labelled points.

        Summed over the batch and logged per data point (``val/error``, ``test/error``): the classification error
        of a fully labelled split, as the semi-supervised data modules' validation and test splits are.
        """
        if y is None:
            return {}
        labelled, label = self._labels(x, y)
        wrong = (self.classify(x) != label) & labelled
        return {"error": wrong.sum().to(torch.get_default_dtype())}

    # ----- conveniences --------------------------------------------------------------
    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, sample: bool = False, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """E[x | y, z] at z = the mean of q(z | x, y) (a draw if ``sample``); ``y`` None: the predicted class."""
        y = self.classify(x) if y is None else y
        loc, scale = self.encode(x, y)
        return self.decode(loc + scale * torch.randn_like(scale) if sample else loc, y)

    @torch.no_grad()
    def sample(self, num_samples: int, mean: bool = True, y: Optional[Union[int, torch.Tensor]] = None) -> torch.Tensor:
        """Draw ``x`` given the class ``y`` (an int, or one label per draw; ``None``: y ~ p(y)), z ~ N(0, I).

        E[x | y, z] (``mean=True``) or a draw of ``x``.
        """
        reference = self._reference
        if y is None:
            y = torch.randint(self.num_classes, (num_samples,), device=reference.device)
        else:
            y = torch.as_tensor(y, device=reference.device).long().expand(num_samples)
        z = self.prior(torch.Size([num_samples])).sample()
        h = self.decoder_output(z, y)
        return self.likelihood.mean(h) if mean else self.likelihood(h).sample()

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, latent_shape={tuple(self.latent_shape)}, "
            f"event_shape={tuple(self.event_shape)}, classifier_weight={self.classifier_weight}"
        )
