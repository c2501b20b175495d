"""Reading data files (IDX, ``.amat``) and finding them in the data folders."""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np

__all__ = ["DATA_ENV_VAR", "read_idx", "read_amat", "search_dirs", "describe_search", "find_in", "idx_names"]

DATA_ENV_VAR = "PYRO_LVM_DATA"
"""Environment variable naming the folder that holds the data sets (``mnist/``, ``binarized_mnist/``, ...)."""


_PathLike = Union[str, os.PathLike]


_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: _PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST / Fashion-MNIST format), gzipped or raw.

    The header is a magic number ``0x0000TTNN`` (``TT`` the element type,
    ``NN`` the number of dimensions) followed by ``NN`` big-endian uint32 sizes;
    the file must hold exactly that many elements. Gzip is recognised by its
    magic bytes, not the file name.

    Arguments:
        path: the file.

    Returns:
        An array in native byte order with the shape given by the header.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = Path(folder) / "tiny-labels-idx1-ubyte.gz"
        ...     header = struct.pack(">BBBBI", 0, 0, 0x08, 1, 3)
        ...     _ = path.write_bytes(gzip.compress(header + bytes([7, 8, 9])))
        ...     read_idx(path)
        array([7, 8, 9], dtype=uint8)
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as error:
            raise ValueError(
                f"{path} is gzipped but cannot be decompressed ({error}); the download is "
                "probably incomplete. Download the file again."
            ) from error
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise ValueError(
            f"{path} is not an IDX file: its magic number is 0x{raw[:4].hex()}, expected "
            "0x0000TTNN with type TT in 08, 09, 0b, 0c, 0d, 0e and NN >= 1 dimensions. "
            "Check that it is one of the MNIST IDX files and download it again if needed."
        )
    ndim = raw[3]
    start = 4 + 4 * ndim
    if len(raw) < start:
        raise ValueError(
            f"{path} is truncated: its header announces {ndim} dimensions ({start} bytes) "
            f"but the file has {len(raw)} bytes. Download the file again."
        )
    shape = struct.unpack(f">{ndim}I", raw[4:start])
    dtype = _IDX_DTYPES[raw[2]]
    expected = start + math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(
            f"{path} has {len(raw)} bytes but its header promises shape {shape} of {dtype.name} "
            f"({expected} bytes): the file is {'truncated' if len(raw) < expected else 'padded'}. "
            "Download the file again."
        )
    array = np.frombuffer(raw, dtype=dtype, offset=start).reshape(shape)
    # a copy: frombuffer is read-only, which torch.from_numpy warns about
    return array.astype(dtype.newbyteorder("="), copy=True)


def read_amat(path: _PathLike, dim: int = 784) -> np.ndarray:
    """Read a binarized-MNIST ``.amat`` text file: one example a line, ``dim`` 0/1 values.

    Larochelle & Murray (2011, "The Neural Autoregressive Distribution
    Estimator", http://proceedings.mlr.press/v15/larochelle11a.html) published
    the static binarized MNIST as ``binarized_mnist_{train,valid,test}.amat``.
    Parsing is vectorised over the bytes, so the 50,000-line training file reads
    in well under a second.

    Arguments:
        path: the file.
        dim: values per line.

    Returns:
        A uint8 array of shape ``(lines, dim)`` with values in {0, 1}.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = Path(folder) / "tiny.amat"
        ...     _ = path.write_text("0 1 1\\n1 0 0\\n")
        ...     read_amat(path, dim=3)
        array([[0, 1, 1],
               [1, 0, 0]], dtype=uint8)
    """
    path = Path(path)
    raw = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    # element-wise comparisons: np.isin or a table look-up are ten times slower on 80 MB
    is_bit = (raw - np.uint8(ord("0"))) < 2
    bad = ~(is_bit | (raw == ord(" ")) | (raw == ord("\n")) | (raw == ord("\r")) | (raw == ord("\t")))
    # two adjacent digits form a number such as "10", which is not a pixel either
    bad[:-1] |= is_bit[:-1] & is_bit[1:]
    if bad.any():
        position = int(np.argmax(bad))
        line = int(np.count_nonzero(raw[:position] == ord("\n"))) + 1
        token = bytes(raw[position : position + 10]).split()[0].decode(errors="replace")
        raise ValueError(
            f"{path}, line {line}: found {token!r}; a binarized-MNIST .amat file holds only the "
            "values 0 and 1 separated by spaces. Check that this is the right file."
        )
    starts = np.concatenate([[0], np.flatnonzero(raw == ord("\n")) + 1])
    starts = starts[starts < len(raw)]
    counts = np.add.reduceat(is_bit.view(np.uint8), starts, dtype=np.uint32) if len(raw) else np.zeros(0)
    wrong = np.flatnonzero((counts != 0) & (counts != dim))
    if len(wrong):
        raise ValueError(
            f"{path}, line {int(wrong[0]) + 1}: found {int(counts[wrong[0]])} values, expected "
            f"{dim}. The file is truncated or not a binarized-MNIST .amat file."
        )
    return (raw[is_bit] - ord("0")).reshape(-1, dim)


def search_dirs(
    root: Optional[_PathLike], subdir: str, system: Sequence[str] = (), env_itself: bool = True
) -> list[Path]:
    """An explicit ``root`` is searched alone; otherwise ``$PYRO_LVM_DATA`` and system folders."""
    if root is not None:
        root = Path(root).expanduser()
        return [root, root / subdir]
    dirs = []
    env = os.environ.get(DATA_ENV_VAR)
    if env:
        base = Path(env).expanduser()
        dirs += [base / subdir, base] if env_itself else [base / subdir]
    return dirs + [Path(folder) for folder in system]


def describe_search(
    dirs: Sequence[Path], root: Optional[_PathLike], missing: Callable[[Path], list[str]]
) -> str:
    if not dirs:
        return f"no folder was searched: root is None and {DATA_ENV_VAR} is not set"
    looked = []
    for folder in dirs:
        if not folder.is_dir():
            looked.append(f"{folder} (does not exist)")
        else:
            looked.append(f"{folder} (lacks {', '.join(missing(folder))})")
    if root is None and not os.environ.get(DATA_ENV_VAR):
        looked.append(f"and {DATA_ENV_VAR} is not set")
    return f"looked in: {'; '.join(looked)}"


def find_in(folder: Path, names: Sequence[str]) -> Optional[Path]:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    return None


def idx_names(stem: str) -> list[str]:
    # some mirrors write "train-images.idx3-ubyte" instead of "train-images-idx3-ubyte"
    dotted = stem.replace("-idx", ".idx")
    return [stem + ".gz", stem, dotted + ".gz", dotted]
