"""Fixtures shared by the whole suite.

The tests mirror the package (``tests/estimators/`` for ``pyro_lvm/estimators/``, ...); smoke tests of the
scripts under ``benchmarks/`` are in ``tests/benchmarks/``. This folder is on ``sys.path`` (pytest puts a
root ``conftest.py``'s folder there), so every test imports the shared helpers by name:
``linear_gaussian`` (the model with an exact evidence and posterior), ``flow_checks`` and the Pyro-style
pairs of ``pyro_pairs``.
"""

import pytest
from linear_gaussian import LinearGaussian


@pytest.fixture
def linear_gaussian_model():
    """``linear_gaussian_model(k, d, s, seed=0, dtype=torch.float64)``: a :class:`LinearGaussian` with random weights."""
    return LinearGaussian.random
