"""KL-weight schedules: the shapes the papers describe."""

import pytest

from pyro_lvm.schedules import Constant, Cyclical, LinearWarmup, Sigmoid


def test_linear_warmup_is_flat_then_linear_then_flat():
    s = LinearWarmup(warmup_steps=100, start=0.0, end=2.0, delay_steps=50)
    assert [s(t) for t in (0, 49, 50)] == [0.0, 0.0, 0.0]
    assert s(100) == pytest.approx(1.0)
    assert s(150) == s(10_000) == 2.0
    values = [s(t) for t in range(0, 300)]
    assert values == sorted(values)


def test_cyclical_restarts_every_cycle_and_holds_after_the_last():
    s = Cyclical(cycle_steps=40, ratio=0.25, num_cycles=3)
    for cycle in range(3):
        t0 = 40 * cycle
        assert s(t0) == 0.0
        assert s(t0 + 5) == pytest.approx(0.5)  # half of the rising quarter
        assert s(t0 + 10) == s(t0 + 39) == 1.0
    assert s(120) == s(10_000) == 1.0


def test_sigmoid_is_symmetric_about_its_midpoint():
    s = Sigmoid(midpoint=500, width=50, start=0.2, end=1.0)
    assert s(500) == pytest.approx(0.6)
    for d in (10, 100, 1000):
        assert s(500 + d) - 0.6 == pytest.approx(0.6 - s(500 - d))
    assert s(10**7) == pytest.approx(1.0) and s(-10**7) == pytest.approx(0.2)


def test_constant():
    assert Constant(0.0)(123) == 0.0


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: LinearWarmup(warmup_steps=0), "warmup_steps"),
        (lambda: LinearWarmup(start=-1.0), "start must be >= 0"),
        (lambda: Cyclical(ratio=0.0), "ratio"),
        (lambda: Sigmoid(width=0.0), "width"),
        (lambda: Constant(-0.5), "value must be >= 0"),
    ],
)
def test_invalid_schedules_are_rejected(make, match):
    with pytest.raises(ValueError, match=match):
        make()
