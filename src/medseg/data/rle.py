"""Run-length encoding of binary masks, as in Kaggle's segmentation competitions.

An RLE string is a space-separated list of ``start length`` pairs. Starts are 1-indexed. In Kaggle order
(``order="F"``, the default) pixels are numbered top to bottom, then left to right (column-major), as in
the Ultrasound Nerve Segmentation ``train_masks.csv``; ``order="C"`` numbers them left to right, then top
to bottom (row-major), as some other competitions do. The empty string is the empty mask.

Both directions are vectorised: no Python loop runs once per run.
"""

from __future__ import annotations

import re
from typing import Literal

import numpy as np

from medseg.errors import MedsegError

Order = Literal["F", "C"]
_ORDERS = ("F", "C")
_ONLY_DIGITS_AND_SPACE = re.compile(r"[0-9 \t\n\r\f\v]*").fullmatch
_FOREIGN_CHARACTER = re.compile(r"[^0-9 \t\n\r\f\v]").search
_BYTE_OFFSETS = np.arange(8, dtype=np.int64)


class RLEError(MedsegError, ValueError):
    """A malformed run-length encoding, or a mask that cannot be encoded."""


def encode(mask: np.ndarray, order: Order = "F") -> str:
    """Encode a 2-D mask as an RLE string.

    Args:
        mask: 2-D array; any non-zero pixel is foreground.
        order: ``"F"`` for Kaggle's column-major numbering, ``"C"`` for row-major.

    Returns:
        The ``start length`` pairs, space-separated, touching runs merged; ``""`` for an empty mask.

    Raises:
        RLEError: If ``mask`` is not 2-D or ``order`` is unknown.

    Shape:
        mask: (H, W).
    """
    _check_order(order)
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise RLEError(f"RLE encodes 2-D masks; got an array of shape {mask.shape}")
    if mask.dtype != np.bool_:
        mask = mask != 0
    if not mask.any():
        return ""
    lines = mask.T if order == "F" else mask
    if lines.flags.c_contiguous:
        edges = _edges_along(lines.reshape(-1))
    elif lines.T.flags.c_contiguous:
        edges = _edges_across(lines.T)
    else:
        edges = _edges_along(np.ascontiguousarray(lines).reshape(-1))
    runs = np.empty_like(edges)
    runs[0::2] = edges[0::2] + 1
    runs[1::2] = edges[1::2] - edges[0::2]
    return ("%d " * runs.size % tuple(runs.tolist()))[:-1]


def decode(rle: str, shape: tuple[int, int], order: Order = "F") -> np.ndarray:
    """Decode an RLE string into a boolean mask.

    Args:
        rle: ``start length`` pairs separated by whitespace; ``""`` (or only whitespace) is the empty mask.
        shape: ``(height, width)`` of the mask.
        order: ``"F"`` for Kaggle's column-major numbering, ``"C"`` for row-major.

    Returns:
        The mask. It is laid out in memory in the RLE's own order (Fortran-ordered for ``"F"``), which
        costs no copy and behaves like any other array; ``np.ascontiguousarray`` makes it row-major.

    Raises:
        RLEError: If the string is malformed: an odd number of values, a value that is not a
            non-negative integer, a start below 1, a length below 1, runs that are not increasing or
            that overlap, or a run past the end of the image.

    Shape:
        Returns: (H, W).
    """
    _check_order(order)
    height, width = _check_shape(shape)
    starts, lengths = _parse_runs(rle)
    gaps = _check_runs(starts, lengths, height * width)
    flat = np.zeros(height * width, dtype=np.bool_)
    if starts.size:
        _paint_runs(flat, starts - 1, lengths, gaps)
    return flat.reshape(width, height).T if order == "F" else flat.reshape(height, width)


def check(rle: str, shape: tuple[int, int], order: Order = "F") -> None:
    """Validate an RLE string for a mask of ``shape`` without building the mask.

    Args:
        rle: ``start length`` pairs, space-separated.
        shape: ``(height, width)`` of the mask.
        order: ``"F"`` for Kaggle's column-major numbering, ``"C"`` for row-major.

    Raises:
        RLEError: If the string is malformed (see :func:`decode`).
    """
    _check_order(order)
    height, width = _check_shape(shape)
    starts, lengths = _parse_runs(rle)
    _check_runs(starts, lengths, height * width)


def _check_order(order: str) -> None:
    if order not in _ORDERS:
        raise RLEError(f"unknown RLE order {order!r}; use 'F' (Kaggle, column-major) or 'C' (row-major)")


def _check_shape(shape: tuple[int, int]) -> tuple[int, int]:
    if len(shape) != 2 or min(shape) < 1:
        raise RLEError(f"mask shape must be (height, width) with both >= 1; got {tuple(shape)}")
    return int(shape[0]), int(shape[1])


def _edges_along(flat: np.ndarray) -> np.ndarray:
    """0-based positions where runs start and end (one past their last pixel) in a flat mask."""
    edges = _sparse_flatnonzero(flat[1:] != flat[:-1]) + 1
    head = [0] if flat[0] else []
    tail = [flat.size] if flat[-1] else []
    return np.concatenate((head, edges, tail)).astype(np.int64)


def _edges_across(grid: np.ndarray) -> np.ndarray:
    """Run edges of a mask numbered down the columns of a row-major ``grid``, without transposing it.

    A run edge inside a column is a change between two vertically adjacent pixels; at the top of a
    column it is a change from the bottom pixel of the previous column (nothing before the first).
    Vertical changes are first found 8 pixels per comparison (the flat frame against itself shifted by
    one row, as 64-bit words), then pixel by pixel within the few words that changed.
    """
    height, width = grid.shape
    flat = grid.reshape(-1)
    upper, lower = flat[:-width], flat[width:]
    whole = upper.size - upper.size % 8
    changed = np.flatnonzero(upper[:whole].view(np.uint64) != lower[:whole].view(np.uint64))
    above = np.concatenate(((changed[:, None] * 8 + _BYTE_OFFSETS).reshape(-1), np.arange(whole, upper.size)))
    above = above[upper[above] != lower[above]]
    rows, cols = np.divmod(above, width)
    top_cols = np.flatnonzero(grid[0, 1:] != grid[-1, :-1]) + 1
    edges = np.concatenate((cols * height + rows + 1, top_cols * height))
    if grid[0, 0]:
        edges = np.append(edges, 0)
    if grid[-1, -1]:
        edges = np.append(edges, height * width)
    edges.sort()
    return edges


def _sparse_flatnonzero(flags: np.ndarray) -> np.ndarray:
    """``np.flatnonzero`` of a long, mostly-False, contiguous boolean array, scanning 8 bytes at a time."""
    whole = flags.size - flags.size % 8
    words = np.flatnonzero(flags[:whole].view(np.uint64))
    candidates = (words[:, None] * 8 + _BYTE_OFFSETS).reshape(-1)
    hits = candidates[flags[candidates]]
    return np.concatenate((hits, np.flatnonzero(flags[whole:]) + whole))


def _parse_runs(rle: str) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(rle, str):
        raise RLEError(f"RLE must be a string; got {type(rle).__name__}")
    if _ONLY_DIGITS_AND_SPACE(rle) is None:
        bad = _FOREIGN_CHARACTER(rle)
        token = next((t for t in rle.split() if bad.group() in t), bad.group())
        raise RLEError(f"RLE value {token[:20]!r} is not a non-negative integer (character {bad.group()!r})")
    values = np.fromstring(rle, dtype=np.int64, sep=" ") if rle.strip() else np.zeros(0, dtype=np.int64)
    if values.size % 2:
        raise RLEError(f"RLE has an odd number of values ({values.size}); it must be 'start length' pairs")
    return values[0::2], values[1::2]


def _check_runs(starts: np.ndarray, lengths: np.ndarray, n_pixels: int) -> np.ndarray:
    """Validate parsed runs and return the gaps between consecutive runs."""
    if starts.size == 0:
        return starts
    if starts[0] < 1:
        raise RLEError(f"run 1 starts at {starts[0]}; starts are 1-indexed")
    if lengths.min() < 1:
        index = int(np.argmax(lengths < 1))
        raise RLEError(f"run {index + 1} has length {lengths[index]}; lengths must be >= 1")
    if max(starts.max(), lengths.max()) > n_pixels:
        raise RLEError(f"a run reaches past the end of the image ({n_pixels} pixels)")
    ends = starts + lengths
    gaps = starts[1:] - ends[:-1]
    if gaps.size and gaps.min() < 0:
        index = int(np.argmax(gaps < 0)) + 1
        what = "is not after the previous run" if starts[index] <= starts[index - 1] else "overlaps the previous run"
        raise RLEError(f"run {index + 1} (start {starts[index]}) {what}; runs must be increasing and disjoint")
    if ends[-1] - 1 > n_pixels:
        raise RLEError(f"last run ends at pixel {ends[-1] - 1}, past the end of the image ({n_pixels} pixels)")
    return gaps


def _paint_runs(flat: np.ndarray, starts: np.ndarray, lengths: np.ndarray, gaps: np.ndarray) -> None:
    """Set sorted, disjoint runs (0-based starts) of a flat mask with one ``np.repeat`` over their span."""
    values = np.zeros(2 * starts.size - 1, dtype=np.bool_)
    values[0::2] = True
    counts = np.empty(2 * starts.size - 1, dtype=np.int64)
    counts[0::2] = lengths
    counts[1::2] = gaps
    flat[starts[0] : starts[-1] + lengths[-1]] = np.repeat(values, counts)
