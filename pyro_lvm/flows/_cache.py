"""A one-entry transform cache that also keys on the parameters' versions."""

from __future__ import annotations

import torch
from torch.distributions.transforms import _InverseTransform


class ParameterAwareCache:
    """Mixin for a :class:`~pyro.distributions.torch_transform.TransformModule` with ``cache_size=1``.

    It also keeps the layer's inverse transform (torch rebuilds it whenever its weak
    reference has died, that is once per ``log_prob``).

    torch's cache returns the last output whenever the input is the same tensor object. In a
    training loop over a fixed tensor (full-batch training, ``flow.log_prob(data)`` at every
    step) that output is stale after the optimizer's step, and its graph has been freed by the
    last ``backward``: the second step fails with "Trying to backward through the graph a second
    time". Here a cached value is reused only if, besides the input, no parameter of the
    layer has changed since (every in-place update, ``optimizer.step()`` or
    ``load_state_dict``, bumps a tensor's version counter), so the cache still serves what it
    is for (``log_prob`` of a value the flow has just sampled) and never a stale result.
    """

    @property
    def inv(self) -> _InverseTransform:
        """The inverse transform, built once (torch keeps it by weak reference only, so
        ``TransformedDistribution.log_prob`` would build a new one per layer and call)."""
        inverse = self.__dict__.get("_inverse_transform")
        if inverse is None:
            inverse = self.__dict__["_inverse_transform"] = _InverseTransform(self)
        return inverse

    def _parameter_version(self) -> int:
        params = self.__dict__.get("_cache_parameters")
        if params is None:
            params = self.__dict__["_cache_parameters"] = tuple(self.parameters())
        return sum(p._version for p in params)

    def _cached(self, value: torch.Tensor, side: int, compute) -> torch.Tensor:
        """``compute(value)``, or the cached result if ``value`` is the cached ``(x, y)[side]`` and
        no parameter has changed since."""
        pair = self._cached_x_y
        version = self._parameter_version()
        if value is pair[side] and self.__dict__.get("_cached_version") == version:
            return pair[1 - side]
        result = compute(value)
        self.__dict__["_cached_x_y"] = (value, result) if side == 0 else (result, value)
        self.__dict__["_cached_version"] = version
        return result

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._call(x) if self._cache_size == 0 else self._cached(x, 0, self._call)

    def _inv_call(self, y: torch.Tensor) -> torch.Tensor:
        return self._inverse(y) if self._cache_size == 0 else self._cached(y, 1, self._inverse)
