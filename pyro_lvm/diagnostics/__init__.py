r"""Diagnostics of a trained pair: how good is the model, and how wrong is the guide :math:`q(z \mid x)`?

One concept per module:

* :mod:`~pyro_lvm.diagnostics.likelihood`: the importance-sampled :math:`\log p(x)`
  (:func:`log_likelihood`) and :func:`evaluate` (bits/dim, ELBO and its terms, KL per dimension,
  active units, :math:`I(x; z)`), on the streamed importance weights of
  :mod:`~pyro_lvm.diagnostics.importance`;
* :mod:`~pyro_lvm.diagnostics.gradients`: the variance and signal-to-noise ratio of estimators' gradients;
* :mod:`~pyro_lvm.diagnostics.psis`: the Pareto :math:`\hat k` of the guide's importance weights;
* :mod:`~pyro_lvm.diagnostics.arviz`: the guide's draws as an ArviZ ``InferenceData``;
* :mod:`~pyro_lvm.diagnostics.amortization`: the amortization and approximation gaps;
* :mod:`~pyro_lvm.diagnostics.nuts`: NUTS on :math:`p(z \mid x_i)` against :math:`q(z \mid x_i)`;
* :mod:`~pyro_lvm.diagnostics.calibration`: simulation-based calibration;
* :mod:`~pyro_lvm.diagnostics.report`: the report ``pyro-lvm diagnose`` writes.

The names below are imported from their modules on first use (ArviZ, pandas and matplotlib load only then).
"""

from importlib import import_module
from typing import Any

_NAMES = {
    "log_likelihood": "likelihood", "evaluate": "likelihood", "LogLikelihood": "likelihood", "Evaluation": "likelihood",
    "gradient_variance": "gradients", "format_table": "gradients", "COLUMNS": "gradients",
    "psis_khat": "psis", "psislw": "psis",
    "to_inference_data": "arviz",
    "amortization_gap": "amortization", "AmortizationGap": "amortization",
    "compare_with_nuts": "nuts", "NutsComparison": "nuts", "wasserstein_1d": "nuts",
    "sbc": "calibration", "SBCResult": "calibration", "plot_sbc": "calibration",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    if name not in _NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{_NAMES[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
