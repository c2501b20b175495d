"""What a checkpoint holds besides the weights, and the check that a resumed run is the same model."""

from __future__ import annotations

from typing import Any, Optional

__all__ = ["config_differences", "plain", "state_mismatch"]


def plain(value: Any) -> Any:
    """Tuples as lists, recursively: configurations compare by value, whatever container wrote them."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def config_differences(there: Any, here: Any, prefix: str) -> list[str]:
    """``key: A in the checkpoint, B here`` for every key where two configurations differ."""
    there, here = plain(there), plain(here)
    if isinstance(there, dict) and isinstance(here, dict):
        out = []
        for key in sorted(set(there) | set(here), key=str):
            a, b = there.get(key, "<absent>"), here.get(key, "<absent>")
            out += config_differences(a, b, f"{prefix}{key}.")
        return out
    return [] if there == here else [f"{prefix.rstrip('.')}: {there!r} in the checkpoint, {here!r} here"]


def state_mismatch(theirs: dict, ours: dict, their_config: Any, our_config: Any) -> Optional[str]:
    """Why a checkpoint's ``state_dict`` does not fit this model (missing, unexpected and mis-shaped keys), or None.

    Example:
        >>> import torch
        >>> print(state_mismatch({"w": torch.zeros(3)}, {"w": torch.zeros(2), "b": torch.zeros(1)}, {"h": 3}, {"h": 2}))
        Checkpoint does not match this model (checkpoint config {'h': 3}, this model {'h': 2}). missing: ['b']; shape mismatch: ['w: (3,) in checkpoint vs (2,) here']. Build the model with the checkpoint's configuration (its run folder has config.yaml).
    """
    missing = sorted(set(ours) - set(theirs))
    unexpected = sorted(set(theirs) - set(ours))
    shapes = sorted(
        f"{k}: {tuple(theirs[k].shape)} in checkpoint vs {tuple(ours[k].shape)} here"
        for k in set(ours) & set(theirs)
        if tuple(ours[k].shape) != tuple(theirs[k].shape)
    )
    if not (missing or unexpected or shapes):
        return None
    parts = [f"missing: {missing[:5]}" if missing else "", f"unexpected: {unexpected[:5]}" if unexpected else "",
             f"shape mismatch: {shapes[:5]}" if shapes else ""]
    return (
        "Checkpoint does not match this model"
        + (f" (checkpoint config {their_config}, this model {our_config})" if their_config != our_config else "")
        + ". " + "; ".join(part for part in parts if part)
        + ". Build the model with the checkpoint's configuration (its run folder has config.yaml)."
    )
