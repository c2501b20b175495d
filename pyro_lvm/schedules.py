r"""Schedules for the KL weight ``beta`` (or a relaxation's temperature) as a function of the global training step.

The lecture's advice: start with a low ``beta`` so the decoder learns to use
``z`` (a high KL weight early lets the posterior collapse onto the prior), end
at ``beta = 1`` (or higher) so the aggregate posterior matches the prior and
samples are good. Each schedule is a small callable ``step -> beta``; in YAML::

    model:
      beta:
        class_path: pyro_lvm.schedules.LinearWarmup
        init_args: {warmup_steps: 2000}
"""

from __future__ import annotations

import math

__all__ = ["Schedule", "Constant", "LinearWarmup", "Cyclical", "Sigmoid", "Exponential"]


class Schedule:
    """A KL weight ``beta(step) >= 0``; subclasses implement :meth:`__call__`."""

    def __call__(self, step: int) -> float:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


def _check_nonnegative(**values: float) -> None:
    for name, value in values.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0; got {value}.")


class Constant(Schedule):
    """``beta(step) = value``.

    Example:
        >>> Constant(0.5)(1000)
        0.5
    """

    def __init__(self, value: float = 1.0):
        _check_nonnegative(value=value)
        self.value = value

    def __call__(self, step: int) -> float:
        return self.value


class LinearWarmup(Schedule):
    r"""Linear warm-up (Bowman et al. 2016, "KL annealing"; Sønderby et al. 2016).

    ``beta`` is ``start`` for ``delay_steps`` steps, rises linearly to ``end``
    over ``warmup_steps`` steps, then stays at ``end``.

    Arguments:
        warmup_steps: length of the ramp.
        start: initial weight (0 is allowed).
        end: final weight.
        delay_steps: steps at ``start`` before the ramp.

    Example:
        >>> s = LinearWarmup(warmup_steps=100)
        >>> s(0), s(50), s(100), s(10_000)
        (0.0, 0.5, 1.0, 1.0)
    """

    def __init__(
        self, warmup_steps: int = 1000, start: float = 0.0, end: float = 1.0, delay_steps: int = 0
    ):
        _check_nonnegative(start=start, end=end, delay_steps=delay_steps)
        if warmup_steps < 1:
            raise ValueError(f"warmup_steps must be >= 1; got {warmup_steps}.")
        self.warmup_steps = warmup_steps
        self.start = start
        self.end = end
        self.delay_steps = delay_steps

    def __call__(self, step: int) -> float:
        t = min(max(step - self.delay_steps, 0) / self.warmup_steps, 1.0)
        return self.start + t * (self.end - self.start)


class Cyclical(Schedule):
    r"""Cyclical annealing (Fu et al. 2019, https://arxiv.org/abs/1903.10145).

    Training is split into cycles of ``cycle_steps``; within each cycle ``beta``
    rises linearly from ``start`` to ``end`` during the first ``ratio`` of the
    cycle and stays at ``end`` for the rest. Each restart lets the model
    re-learn to use ``z`` with the better decoder of the previous cycle. After
    ``num_cycles`` cycles (if given) ``beta`` stays at ``end``.

    Arguments:
        cycle_steps: length of one cycle.
        ratio: fraction of a cycle spent increasing (the paper's R, 0.5).
        start, end: range of ``beta``.
        num_cycles: number of cycles, or ``None`` for no limit.

    Example:
        >>> s = Cyclical(cycle_steps=100, ratio=0.5)
        >>> s(0), s(25), s(50), s(99), s(100), s(125)
        (0.0, 0.5, 1.0, 1.0, 0.0, 0.5)
    """

    def __init__(
        self,
        cycle_steps: int = 1000,
        ratio: float = 0.5,
        start: float = 0.0,
        end: float = 1.0,
        num_cycles: int | None = None,
    ):
        _check_nonnegative(start=start, end=end)
        if cycle_steps < 1:
            raise ValueError(f"cycle_steps must be >= 1; got {cycle_steps}.")
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1]; got {ratio}.")
        self.cycle_steps = cycle_steps
        self.ratio = ratio
        self.start = start
        self.end = end
        self.num_cycles = num_cycles

    def __call__(self, step: int) -> float:
        if self.num_cycles is not None and step >= self.num_cycles * self.cycle_steps:
            return self.end
        phase = (step % self.cycle_steps) / (self.cycle_steps * self.ratio)
        return self.start + min(phase, 1.0) * (self.end - self.start)


class Sigmoid(Schedule):
    r"""Smooth sigmoid ramp (Bowman et al. 2016).

    ``beta(step) = start + (end - start) * sigmoid((step - midpoint) / width)``.

    Arguments:
        midpoint: step at which ``beta`` is half-way.
        width: steps per unit of the logistic's argument (larger is slower).
        start, end: range of ``beta``.

    Example:
        >>> s = Sigmoid(midpoint=1000, width=100)
        >>> round(s(0), 3), s(1000), round(s(2000), 3)
        (0.0, 0.5, 1.0)
    """

    def __init__(
        self, midpoint: int = 1000, width: float = 100.0, start: float = 0.0, end: float = 1.0
    ):
        _check_nonnegative(start=start, end=end)
        if width <= 0:
            raise ValueError(f"width must be > 0; got {width}.")
        self.midpoint = midpoint
        self.width = width
        self.start = start
        self.end = end

    def __call__(self, step: int) -> float:
        u = (step - self.midpoint) / self.width
        # numerically safe logistic for large |u|
        s = 1.0 / (1.0 + math.exp(-u)) if u >= 0 else math.exp(u) / (1.0 + math.exp(u))
        return self.start + s * (self.end - self.start)


class Exponential(Schedule):
    r"""Exponential decay to a floor: ``value(step) = max(end, start * exp(-rate * step))``.

    The Gumbel-softmax temperature schedule of Jang et al. (2017), who anneal
    :math:`\tau` from 1 towards 0.5 with ``rate`` between 1e-5 and 1e-4 per step;
    use it as ``temperature`` of :class:`pyro_lvm.estimators.RelaxedELBO` (or as
    a decaying ``beta``).

    Arguments:
        start: value at step 0 (> 0).
        end: the floor (>= 0).
        rate: decay per step (>= 0).

    Example:
        >>> s = Exponential(start=1.0, end=0.5, rate=1e-3)
        >>> s(0), round(s(500), 4), s(10_000)
        (1.0, 0.6065, 0.5)
    """

    def __init__(self, start: float = 1.0, end: float = 0.5, rate: float = 1e-4):
        _check_nonnegative(end=end, rate=rate)
        if start <= 0:
            raise ValueError(f"start must be > 0; got {start}.")
        self.start = start
        self.end = end
        self.rate = rate

    def __call__(self, step: int) -> float:
        return max(self.end, self.start * math.exp(-self.rate * step))
