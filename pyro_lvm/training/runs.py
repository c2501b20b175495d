"""Run folders that are never overwritten: one run per ``save_dir/name/version_N``, claimed atomically.

A logger's folder (``runs/vae_digits/version_3``) holds one run: its ``config.yaml``, ``metrics.csv``,
checkpoints and pictures. Two runs in one folder would replace each other's configuration and mix their
metrics, so ``pyro-lvm fit`` claims a new version by creating its folder (an atomic ``mkdir``: two runs
started at once never get the same one), and refuses an explicit version whose folder already holds a
run unless the run is resumed into it (``--ckpt_path`` inside that folder) or ``--overwrite`` is given.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional, Union

__all__ = ["run_files", "claim_version", "check_run_folder", "release_if_empty", "version_folder"]

_PathLike = Union[str, os.PathLike]
_RUN_FILES = ("config.yaml", "metrics.csv", "hparams.yaml", "checkpoints", "latent_stats.csv")


def version_folder(root: _PathLike, version: Union[int, str]) -> Path:
    """The folder of ``version`` under ``save_dir/name`` (``version_3`` for 3, as Lightning's loggers name it)."""
    return Path(root) / (f"version_{version}" if isinstance(version, int) else str(version))


def run_files(folder: _PathLike) -> list[str]:
    """The files and folders of a run that ``folder`` holds (none for a new or empty folder).

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> run_files(folder)
        []
        >>> _ = (folder / "metrics.csv").write_text("epoch,step\\n")
        >>> run_files(folder)
        ['metrics.csv']
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [name for name in _RUN_FILES if (folder / name).exists()]
    found += sorted(p.name for p in folder.glob("events.out.tfevents*"))
    return found


def claim_version(root: _PathLike) -> tuple[int, Path]:
    """The next free ``version_N`` under ``root``, claimed by creating its folder (atomic across processes).

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> claim_version(root)[0], claim_version(root)[0]
        (0, 1)
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    taken = [int(m.group(1)) for p in root.iterdir() if (m := re.fullmatch(r"version_(\d+)", p.name))]
    version = max(taken, default=-1) + 1
    while True:
        folder = version_folder(root, version)
        try:
            folder.mkdir()
            return version, folder
        except FileExistsError:  # another run claimed it between the listing and the mkdir
            version += 1


def check_run_folder(folder: _PathLike, ckpt_path: Optional[_PathLike] = None, overwrite: bool = False) -> bool:
    """Refuse to write a run into ``folder`` if it holds one, unless resuming into it or ``overwrite``.

    Resuming into it means ``ckpt_path`` is a file inside ``folder``; then the run's ``metrics.csv``
    (which Lightning's CSV logger would delete) is set aside as ``metrics.before-resume-N.csv`` and
    ``True`` is returned.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = (folder / "config.yaml").write_text("model: {}")
        >>> check_run_folder(folder)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        FileExistsError: ... already holds a run (config.yaml)...
        >>> check_run_folder(folder, overwrite=True)
        False
    """
    folder = Path(folder)
    found = run_files(folder)
    if not found or overwrite:
        return False
    if ckpt_path is not None and str(ckpt_path) not in ("last", "best", "hpc", "registry"):
        try:
            Path(ckpt_path).resolve().relative_to(folder.resolve())
        except ValueError:
            pass
        else:  # resuming into its own folder: the metrics so far are kept
            metrics = folder / "metrics.csv"
            if metrics.is_file():
                n = 1
                while (folder / f"metrics.before-resume-{n}.csv").exists():
                    n += 1
                metrics.rename(folder / f"metrics.before-resume-{n}.csv")
            return True
    raise FileExistsError(
        f"{folder} already holds a run ({', '.join(found)}); a second run there would replace its configuration "
        "and mix its metrics. Leave the version out (a new version_N is claimed), pick another one, resume that "
        f"run with --ckpt_path {folder / 'checkpoints' / 'last.ckpt'}, or pass --overwrite true to write over it."
    )


def release_if_empty(folder: Optional[_PathLike]) -> None:
    """Remove a claimed run folder that nothing was written to (a run that failed before it began)."""
    if folder is None:
        return
    folder = Path(folder)
    try:
        for sub in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if sub.is_dir() and not any(sub.iterdir()):
                sub.rmdir()
        folder.rmdir()  # fails, and keeps the folder, if anything is in it
    except OSError:
        pass
