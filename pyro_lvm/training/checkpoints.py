"""Loading checkpoints safely: tensors and plain data only, with errors that say what to do."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

__all__ = ["load_checkpoint", "model_from_checkpoint", "run_config", "is_builtin"]

_PathLike = Union[str, os.PathLike]
# keys of an LVMModule's state_dict that belong to the built-in model, and those that may go with it
_MODEL_PREFIX = "lvm."
_ESTIMATOR_PREFIX = "estimator_modules."


def load_checkpoint(path: Union[str, os.PathLike], map_location: Any = "cpu") -> dict:
    """Read a pyro_lvm checkpoint with ``torch.load(weights_only=True)``.

    No pickled code runs, so a checkpoint from an untrusted source cannot execute
    anything. Raises ``FileNotFoundError`` or ``ValueError`` naming the file and
    the problem (missing, corrupt or truncated, not written by pyro_lvm).

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "bad.ckpt"
        >>> _ = path.write_bytes(b"not a checkpoint")
        >>> load_checkpoint(path)
        Traceback (most recent call last):
        ...
        ValueError: Checkpoint ... cannot be read ...
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist. Look in the run folder's checkpoints/.")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
        raise ValueError(
            f"Checkpoint {path} cannot be read ({type(err).__name__}). "
            "It is corrupt or truncated, or it holds pickled objects that are not allowed "
            "without weights_only=False. Use another checkpoint of the run (e.g. last.ckpt or an "
            "earlier epoch)."
        ) from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "pyro_lvm" not in checkpoint:
        raise ValueError(
            f"Checkpoint {path} was not written by pyro_lvm (no 'state_dict' and 'pyro_lvm' "
            "entries). Resume from a checkpoint of a pyro_lvm run."
        )
    return checkpoint


def _builtin_class(class_path: str) -> type:
    """The class named by a checkpoint, imported only from inside the ``pyro_lvm`` package."""
    module_name, _, name = class_path.rpartition(".")
    if not (module_name == "pyro_lvm" or module_name.startswith("pyro_lvm.")) or not name.isidentifier():
        raise ValueError(
            f"The checkpoint names the model class {class_path!r}, which is outside the pyro_lvm package; "
            "a checkpoint may only rebuild pyro_lvm's own models (loading must not run foreign code). "
            "For your own model, pass the run's config.yaml (--config) so that the model is built from it."
        )
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError):
        raise ValueError(
            f"The checkpoint names the model class {class_path!r}, which this version of pyro_lvm does "
            "not have. Evaluate it with the pyro_lvm version that wrote it."
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module) and cls.__module__.startswith("pyro_lvm")):
        raise ValueError(f"The checkpoint's model class {class_path!r} is not a pyro_lvm model (an nn.Module).")
    return cls


def is_builtin(checkpoint: dict) -> bool:
    """Whether the checkpoint holds a built-in model with its own guide (rebuildable without a config)."""
    info = checkpoint["pyro_lvm"].get("model")
    if not isinstance(info, dict) or "class" not in info:
        return False
    if info.get("config", {}).get("transforms") == "custom":  # a FlowModel of hand-made transforms
        return False
    # anything but the model and the estimator's baselines (a guide of pyro_lvm.guides, pyro.params)
    return all(k.startswith((_MODEL_PREFIX, _ESTIMATOR_PREFIX)) for k in checkpoint["state_dict"])


def model_from_checkpoint(checkpoint: Union[_PathLike, dict]) -> nn.Module:
    """Rebuild a built-in model (:class:`pyro_lvm.VAE`, :class:`pyro_lvm.FlowModel`, ...) from a checkpoint alone.

    The checkpoint of a run whose pair is a built-in model stores the model's class and
    constructor arguments (``checkpoint["pyro_lvm"]["model"]``); the class is imported only
    from the ``pyro_lvm`` package (any other class path is refused: loading runs no foreign
    code) and its weights are the ``lvm.``-prefixed entries of the ``state_dict``. The model
    is returned in evaluation mode. A user's own pair has no stored class: see :func:`load_run`.

    Arguments:
        checkpoint: a path (read with :func:`load_checkpoint`) or a checkpoint already read.

    Example:
        >>> import tempfile
        >>> from pyro_lvm import VAE
        >>> vae = VAE(data_shape=4, latent_dim=2, hidden_dims=[8])
        >>> state = {f"lvm.{k}": v for k, v in vae.state_dict().items()}
        >>> path = Path(tempfile.mkdtemp()) / "vae.ckpt"
        >>> torch.save({"state_dict": state, "pyro_lvm": {"model": {
        ...     "class": "pyro_lvm.models.vae.VAE", "config": vae.config}}}, path)
        >>> rebuilt = model_from_checkpoint(path)
        >>> all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), vae.state_dict().values()))
        True
    """
    if not isinstance(checkpoint, dict):
        checkpoint = load_checkpoint(checkpoint)
    info = checkpoint["pyro_lvm"].get("model")
    if not isinstance(info, dict) or "class" not in info:
        raise ValueError(
            "The checkpoint holds a user's own model/guide pair (no built-in model class is stored), "
            "which cannot be rebuilt from the checkpoint alone. Use load_run(ckpt, config) with the "
            "run's config.yaml."
        )
    cls = _builtin_class(str(info["class"]))
    try:
        model = cls(**info.get("config", {}))
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"The checkpoint's model {info['class']} cannot be rebuilt from its stored configuration "
            f"{info.get('config')} ({err}). Evaluate it with the pyro_lvm version that wrote it, or pass "
            "the run's config.yaml."
        ) from err
    state = {k[len(_MODEL_PREFIX):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(_MODEL_PREFIX)}
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"The checkpoint's weights do not match {info['class']} built from its stored configuration "
            f"(missing: {result.missing_keys[:5]}, unexpected: {result.unexpected_keys[:5]}). "
            "The checkpoint is damaged or from another pyro_lvm version."
        )
    return model.eval()


def run_config(ckpt_path: _PathLike, config: Optional[_PathLike] = None) -> Path:
    """The ``config.yaml`` of the run a checkpoint belongs to: ``config``, or ``RUN/config.yaml`` for ``RUN/checkpoints/X.ckpt``.

    Arguments:
        ckpt_path: a checkpoint of the run.
        config: the configuration to use instead; it must exist.

    Example:
        >>> import tempfile
        >>> run = Path(tempfile.mkdtemp()) / "version_0"
        >>> (run / "checkpoints").mkdir(parents=True)
        >>> _ = (run / "config.yaml").write_text("model: {}")
        >>> run_config(run / "checkpoints" / "last.ckpt") == run / "config.yaml"
        True
    """
    if config is not None:
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"Configuration {path} does not exist.")
        return path
    ckpt_path = Path(ckpt_path)
    candidates = [ckpt_path.parent / "config.yaml", ckpt_path.parent.parent / "config.yaml"]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"No config.yaml next to the checkpoint {ckpt_path} (looked for {candidates[1]} and {candidates[0]}). "
        "Pass the run's configuration with --config RUN/config.yaml."
    )
