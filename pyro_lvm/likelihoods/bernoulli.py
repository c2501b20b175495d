"""Binary and [0, 1] pixels: the Bernoulli (with its fused evaluation kernel) and the continuous Bernoulli."""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from typing import Iterator, Optional

import pyro.distributions as dist
import torch
from torch.nn.functional import binary_cross_entropy_with_logits, softplus


from .base import Likelihood

__all__ = ["BernoulliLikelihood", "ContinuousBernoulliLikelihood", "IndependentBernoulli", "compiled_log_prob",
           "continuous_bernoulli_log_norm"]

_logger = logging.getLogger("pyro_lvm.likelihoods")


_BLOCK = 16


def _bernoulli_blocked(logits: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``sum_d x_d l_d - log(1 + e^{l_d})`` over the last dimension, a multiple of 16 (broadcasting).

    ``log(1 + e^l) = max(l, 0) + log(1 + e^{-|l|})``, and the factors ``1 + e^{-|l|}`` lie in
    (1, 2]: a product of 16 of them stays below 2^16, so one logarithm per 16 pixels
    replaces one per pixel (the logarithm is the costly part of the kernel), with a
    rounding error of the order of float32's on the sum.
    """
    factors = 1 + torch.exp(-logits.abs())
    blocks = factors.reshape(factors.shape[:-1] + (-1, _BLOCK)).prod(-1)
    return (value * logits - logits.clamp(min=0)).sum(-1) - torch.log(blocks).sum(-1)


def _bernoulli_plain(logits: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``sum_d x_d l_d - log(1 + e^{l_d})`` over the last dimension, of any size (broadcasting)."""
    return (value * logits - softplus(logits)).sum(-1)


class _Kernels:
    """Which implementation :class:`IndependentBernoulli` uses; see :func:`compiled_log_prob`."""

    compiled: bool = False
    strict: bool = False
    fns: dict = {}  # the torch.compile'd kernels (blocked, plain), each built on first use
    failed: Optional[str] = None  # why compilation failed, once it has


@contextlib.contextmanager
def compiled_log_prob(enabled: bool = True, strict: bool = False) -> Iterator[None]:
    r"""Within the block, Bernoulli likelihoods score data with one compiled, fused kernel.

    The log-density of independent Bernoulli pixels with logits :math:`l`,

    .. math::

        \log p(x \mid z) = \sum_d x_d\, l_d - \log\big(1 + e^{l_d}\big),

    costs on a CPU about as much as the decoder's matrix multiplications: it is
    element-wise over every (particle, data point, pixel) and needs one exponential and
    one logarithm per pixel, and torch's eager binary cross-entropy makes several passes
    with temporaries of the logits' size. Inside this block
    :meth:`IndependentBernoulli.log_prob` instead runs the sum as one kernel built by
    ``torch.compile`` (``dynamic=True``: one compilation for any chunk and batch size),
    written as

    .. math::

        \sum_d \big(x_d\, l_d - \max(l_d, 0)\big)
        - \sum_{b} \log \prod_{d \in b} \big(1 + e^{-|l_d|}\big)

    over blocks :math:`b` of 16 pixels: each factor lies in :math:`(1, 2]`, so a block's
    product stays below :math:`2^{16}` and one logarithm serves 16 pixels (when the number
    of pixels is a multiple of 16, as for MNIST's 784; otherwise one logarithm per pixel).
    A single pass without temporaries, three to four times as fast as the eager kernel on
    a CPU (``benchmarks/log_likelihood.py``); the values agree with the eager ones to
    float32 rounding of the sum. The kernel serves evaluation: where the logits need a
    gradient (training), the eager kernel and autograd run as before. Compilation takes seconds (a C++ compiler on a CPU,
    Triton on a GPU) and pays off for long evaluations such as
    :func:`pyro_lvm.diagnostics.likelihood.log_likelihood` with thousands of particles, which enables
    it by itself when the work is large. If compilation fails, the block falls back to
    the eager computation and logs why (``logging``, logger ``pyro_lvm.likelihoods``), or
    raises with ``strict=True``.

    Arguments:
        enabled: use the compiled kernel (``False``: the eager one, e.g. to compare).
        strict: raise a ``RuntimeError`` if compilation fails instead of falling back.

    Example:
        >>> lik = BernoulliLikelihood(3)
        >>> with compiled_log_prob(False):  # the eager computation; True compiles
        ...     lik(torch.zeros(2, 3)).log_prob(torch.ones(2, 3))
        tensor([-2.0794, -2.0794])
    """
    saved = (_Kernels.compiled, _Kernels.strict)
    _Kernels.compiled, _Kernels.strict = enabled, strict
    try:
        yield
    finally:
        _Kernels.compiled, _Kernels.strict = saved


def _compiled_bernoulli(logits: torch.Tensor, value: torch.Tensor) -> Optional[torch.Tensor]:
    """The compiled kernel's result, or ``None`` where it cannot be had (eager fallback)."""
    if _Kernels.failed is not None and not _Kernels.strict:
        return None
    kernel = _bernoulli_blocked if logits.shape[-1] % _BLOCK == 0 else _bernoulli_plain
    try:
        with warnings.catch_warnings():
            # the compiler's own warnings (deprecations in the modules it imports): the kernel has none
            warnings.simplefilter("ignore")
            if kernel not in _Kernels.fns:
                _Kernels.fns[kernel] = torch.compile(kernel, dynamic=True)
            return _Kernels.fns[kernel](logits, value)
    except Exception as err:  # a missing compiler, an unsupported device: keep working
        _Kernels.failed = f"{type(err).__name__}: {err}"
        if _Kernels.strict:
            raise RuntimeError(
                "torch.compile could not build the fused Bernoulli log-density "
                f"({_Kernels.failed.splitlines()[0]}). Install a C++ compiler (CPU) or Triton (GPU), "
                "or leave compilation off (compiled_log_prob(False), log_likelihood(..., compile=False))."
            ) from err
        _logger.info("Fused Bernoulli kernel unavailable, using the eager one: %s", _Kernels.failed)
        return None


class IndependentBernoulli(dist.Independent):
    r"""Independent Bernoulli pixels as one event: :math:`\prod_d \mathrm{Bern}(x_d \mid \sigma(l_d))`.

    The distribution :class:`BernoulliLikelihood` returns: ``Bernoulli(logits).to_event(n)``
    whose :meth:`log_prob` runs as one fused, compiled kernel inside
    :func:`compiled_log_prob` when no gradient is needed (elsewhere it is exactly Pyro's). Everything else
    (sampling, ``mean``, ``expand``, enumeration) is that of :class:`pyro.distributions.Independent`.

    Example:
        >>> d = IndependentBernoulli(dist.Bernoulli(logits=torch.zeros(2, 3)), 1)
        >>> d.batch_shape, d.event_shape
        (torch.Size([2]), torch.Size([3]))
    """

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        base = self.base_dist
        if not _Kernels.compiled or "logits" not in base.__dict__ or (
            torch.is_grad_enabled() and base.logits.requires_grad
        ):  # the fused kernel serves evaluation; training keeps autograd's eager graph
            return super().log_prob(value)
        if self._validate_args:
            self._validate_sample(value)
        n = self.reinterpreted_batch_ndims
        logits = base.logits
        flat = lambda t: t.reshape(t.shape[: t.dim() - n] + (-1,))  # noqa: E731
        out = _compiled_bernoulli(flat(logits), flat(value.to(logits.dtype)))
        return super().log_prob(value) if out is None else out


class BernoulliLikelihood(Likelihood):
    """Independent Bernoulli pixels, ``p(x | z) = prod_d Bern(x_d | sigmoid(h_d))``.

    The decoder emits logits; the log-probability is the (numerically stable)
    negative binary cross-entropy. Data must be binary: binarize grey levels
    (statically or dynamically, see :mod:`pyro_lvm.data`) or use a Gaussian.

    Example:
        >>> lik = BernoulliLikelihood(3)
        >>> lik(torch.zeros(2, 3)).log_prob(torch.ones(2, 3))
        tensor([-2.0794, -2.0794])
    """

    def forward(self, h: torch.Tensor) -> dist.TorchDistribution:
        return IndependentBernoulli(dist.Bernoulli(logits=self._unflatten(h)), len(self.event_shape))

    def mean(self, h: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self._unflatten(h))

    def log_density(self, h: torch.Tensor, x: torch.Tensor, reduce: bool = False) -> torch.Tensor:
        r""":math:`\sum_d x_d l_d - \log(1 + e^{l_d})` per pixel (the negative binary cross-entropy with logits).

        Example:
            >>> lik = BernoulliLikelihood(3)
            >>> h, x = torch.randn(2, 3), torch.ones(2, 3)
            >>> bool(torch.allclose(lik.log_density(h, x).sum(-1), lik(h).log_prob(x)))
            True
        """
        logits = self._unflatten(h)
        if reduce:
            return -binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="sum")
        return -binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none")

    def check(self, x: torch.Tensor) -> None:
        self._check_shape(x)
        if not (x * (1 - x)).any():  # x(1 - x) = 0 exactly for 0 and 1 (NaN, inf and grey levels fail)
            return
        if not torch.isfinite(x).all():
            self._raise_not_finite(x)
        lo, hi = float(x.min()), float(x.max())
        if lo < 0 or hi > 1:
            raise ValueError(
                f"Bernoulli likelihood needs data in [0, 1]; got min={lo:.4g}, max={hi:.4g}. "
                "Use likelihood='gaussian' or rescale the data."
            )
        raise ValueError(
            "Bernoulli likelihood needs binary data (0 or 1); got grey levels in "
            f"[{lo:.4g}, {hi:.4g}]. Binarize the data (binarize='dynamic' or 'static' "
            "in the data module), or for grey levels use likelihood='continuous_bernoulli' or 'gaussian'."
        )


def continuous_bernoulli_log_norm(logits: torch.Tensor) -> torch.Tensor:
    r""":math:`\log C(\lambda)`, the log-normalizer of the continuous Bernoulli with logits :math:`l`.

    With :math:`\lambda = \sigma(l)`, :math:`C(\lambda) = 2\operatorname{artanh}(1 - 2\lambda) / (1 - 2\lambda)`
    (Loaiza-Ganem & Cunningham 2019), and since :math:`2\operatorname{artanh}(1 - 2\sigma(l)) = -l`,
    :math:`C = l / \tanh(l / 2)`. Near :math:`l = 0`, where both vanish, the series
    :math:`\log 2 + \log(1 + u^2/3 - u^4/45)` with :math:`u = l/2` is used (error below :math:`10^{-12}`).

    Example:
        >>> continuous_bernoulli_log_norm(torch.tensor([0.0, 1e-4, 3.0]))
        tensor([0.6931, 0.6931, 1.1983])
    """
    u = logits / 2
    small = u.abs() < 1e-2
    safe = torch.where(small, torch.ones_like(logits), logits)
    exact = torch.log(safe / torch.tanh(safe / 2))
    series = math.log(2.0) + torch.log1p(u * u / 3 - u**4 / 45)
    return torch.where(small, series, exact)


class ContinuousBernoulliLikelihood(Likelihood):
    r"""Independent continuous Bernoulli pixels for grey levels in [0, 1] (Loaiza-Ganem & Cunningham 2019).

    :math:`p(x \mid \lambda) = C(\lambda)\, \lambda^x (1 - \lambda)^{1 - x}` on :math:`x \in [0, 1]`, with
    :math:`\lambda = \sigma(h)` from the decoder's logits: the Bernoulli's cross-entropy made a proper
    density over :math:`[0, 1]` by its normalizer :math:`C(\lambda)` (:func:`continuous_bernoulli_log_norm`).
    Training a Bernoulli likelihood on grey levels optimizes no likelihood at all; this one does, and its
    mean :math:`\mathbb E[x] = \lambda / (2\lambda - 1) + 1 / (2 \operatorname{artanh}(1 - 2\lambda))` is
    not :math:`\lambda`.

    References:
        The continuous Bernoulli: fixing a pervasive error in variational autoencoders
        (Loaiza-Ganem & Cunningham, 2019), https://arxiv.org/abs/1907.06845

    Example:
        >>> lik = ContinuousBernoulliLikelihood(3)
        >>> h, x = torch.tensor([[0.0, 2.0, -2.0]]), torch.tensor([[0.5, 0.9, 0.1]])
        >>> bool(torch.allclose(lik.log_density(h, x).sum(-1), lik(h).log_prob(x)))
        True
    """

    def forward(self, h: torch.Tensor) -> dist.TorchDistribution:
        return dist.ContinuousBernoulli(logits=self._unflatten(h)).to_event(len(self.event_shape))

    def mean(self, h: torch.Tensor) -> torch.Tensor:
        return dist.ContinuousBernoulli(logits=self._unflatten(h)).mean

    def log_density(self, h: torch.Tensor, x: torch.Tensor, reduce: bool = False) -> torch.Tensor:
        r""":math:`x l - \log(1 + e^{l}) + \log C(l)` per pixel: the Bernoulli's term plus the log-normalizer."""
        logits = self._unflatten(h)
        value = continuous_bernoulli_log_norm(logits) - binary_cross_entropy_with_logits(
            logits, x.expand_as(logits), reduction="none")
        return value.sum() if reduce else value

    def check(self, x: torch.Tensor) -> None:
        self._check_shape(x)
        if not torch.isfinite(x).all():
            self._raise_not_finite(x)
        if bool(((x < 0) | (x > 1)).any()):
            raise ValueError(
                f"The continuous Bernoulli likelihood needs data in [0, 1]; got min={float(x.min()):.4g}, "
                f"max={float(x.max()):.4g}. Rescale the data (e.g. divide 8-bit pixels by 255)."
            )
