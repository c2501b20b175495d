"""Guides to swap in for a model's own: amortized, per-datapoint, semi-amortized, global + local.

One guide per module: :mod:`~pyro_lvm.guides.amortized`, :mod:`~pyro_lvm.guides.per_datapoint`,
:mod:`~pyro_lvm.guides.semi_amortized` and :mod:`~pyro_lvm.guides.autoguides`; what they share is in
:mod:`~pyro_lvm.guides.common`.
"""

from .amortized import AmortizedGuide
from .autoguides import with_global_autoguide
from .per_datapoint import PerDatapointGuide
from .semi_amortized import SemiAmortizedGuide

__all__ = ["AmortizedGuide", "PerDatapointGuide", "SemiAmortizedGuide", "with_global_autoguide"]
