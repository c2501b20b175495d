r"""How a model's parts are written down in its ``config`` and rebuilt from it.

A part (a prior, a posterior family, a likelihood, a flow stack) that pyro_lvm defines keeps its init
arguments, as plain data, in ``part.config``; a model stores each part as

.. code-block:: python

    {"class_path": "pyro_lvm.priors.VampPrior", "init_args": {"num_pseudo_inputs": 500, ...}}

the spelling of ``pyro-lvm fit``'s YAML, so a run's saved configuration rebuilds the same model. A part
given as an object that no configuration rebuilds (your own transform or network) is recorded as
``"custom"``: the run's configuration then says so instead of silently describing another model.
:func:`build_part` rebuilds pyro_lvm's own classes only, so a configuration never imports foreign code.
"""

from __future__ import annotations

import importlib
from typing import Any, Union

__all__ = ["CUSTOM", "part_config", "build_part"]

CUSTOM = "custom"  # the config's value for a part given as an object that no config rebuilds


def part_config(part: Any) -> Union[dict, str]:
    """``{"class_path", "init_args"}`` for a part of pyro_lvm's that keeps its ``config``, else ``"custom"``.

    The class path is the shortest module that exports the class, as a YAML file names it.

    Example:
        >>> from pyro_lvm.priors import VampPrior
        >>> part_config(VampPrior(num_pseudo_inputs=10))["class_path"]
        'pyro_lvm.priors.VampPrior'
    """
    cls = type(part)
    init_args = getattr(part, "config", None)
    if not (cls.__module__.startswith("pyro_lvm.") and isinstance(init_args, dict)):
        return CUSTOM
    names = cls.__module__.split(".")
    module = next(m for m in (".".join(names[:k]) for k in range(2, len(names) + 1))
                  if getattr(importlib.import_module(m), cls.__qualname__, None) is cls)
    return {"class_path": f"{module}.{cls.__qualname__}", "init_args": dict(init_args)}


def build_part(spec: Any, base: type, what: str, example: str) -> Any:
    """The part that ``spec`` describes: an instance of ``base`` as given, or one built from its configuration.

    ``spec`` is an object (returned as it is), or ``{"class_path": "pyro_lvm....", "init_args": {...}}``
    naming a subclass of ``base`` in pyro_lvm (nothing else is imported). ``what`` and ``example`` name
    the part and a valid class path in the messages.

    Example:
        >>> from pyro_lvm.priors import Prior
        >>> build_part({"class_path": "pyro_lvm.priors.VampPrior", "init_args": {"num_pseudo_inputs": 3}},
        ...            Prior, "prior", "pyro_lvm.priors.VampPrior")
        VampPrior(num_pseudo_inputs=3)
    """
    if isinstance(spec, base):
        return spec
    if spec == CUSTOM:
        raise ValueError(
            f"This configuration's {what} was an object of the user's own that no configuration rebuilds "
            f"(recorded as 'custom'). Build the model in Python and pass the {what} again."
        )
    if not isinstance(spec, dict) or set(spec) - {"class_path", "init_args"} or "class_path" not in spec:
        raise ValueError(
            f"A {what} is an object or a configuration {{'class_path': '{example}', 'init_args': {{...}}}}; got {spec!r}."
        )
    class_path, init_args = spec["class_path"], spec.get("init_args") or {}
    module_name, _, name = str(class_path).rpartition(".")
    if not module_name.startswith("pyro_lvm") or not name.isidentifier():
        raise ValueError(
            f"A configuration builds {what}s of pyro_lvm only (e.g. {example}), so that it runs no foreign code; "
            f"got class_path {class_path!r}. Pass your own {what} as an object in Python."
        )
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError):
        raise ValueError(f"pyro_lvm has no {what} {class_path!r} (e.g. {example}).") from None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ValueError(f"{class_path!r} is not a {what} (a {base.__module__}.{base.__qualname__} subclass).")
    return cls(**init_args)
