"""Loading checkpoints safely: tensors and plain data only, with errors that say what to do."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union

import torch

__all__ = ["load_checkpoint"]


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
