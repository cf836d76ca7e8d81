"""Run-length encoding of binary masks, as in Kaggle's segmentation competitions.

An RLE string is a space-separated list of ``start length`` pairs. Starts are 1-indexed. In Kaggle order
(``order="F"``, the default) pixels are numbered top to bottom, then left to right (column-major), as in
the Ultrasound Nerve Segmentation ``train_masks.csv``; ``order="C"`` numbers them left to right, then top
to bottom (row-major), as some other competitions do. The empty string is the empty mask.

Both directions are vectorised: no Python loop runs once per run.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Order = Literal["F", "C"]
_ORDERS = ("F", "C")


class RLEError(ValueError):
    """A malformed run-length encoding, or a mask that cannot be encoded."""


def encode(mask: np.ndarray, order: Order = "F") -> str:
    """Encode a 2-D mask as an RLE string.

    Args:
        mask: 2-D array; any non-zero pixel is foreground.
        order: ``"F"`` for Kaggle's column-major numbering, ``"C"`` for row-major.

    Returns:
        The ``start length`` pairs, space-separated; ``""`` for an empty mask.

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
    lines = mask.T if order == "F" else mask
    occupied = np.flatnonzero(lines.any(axis=1))
    if occupied.size == 0:
        return ""
    first, last = int(occupied[0]), int(occupied[-1]) + 1
    flat = np.ascontiguousarray(lines[first:last]).reshape(-1).view(np.int8)
    offset = first * lines.shape[1]
    edges = np.flatnonzero(np.diff(flat))
    runs = np.empty(edges.size + 2, dtype=np.int64)
    runs[0] = 0
    runs[1:-1] = edges + 1
    runs[-1] = flat.size
    if flat[0] == 0:
        runs = runs[1:]
    if flat[-1] == 0:
        runs = runs[:-1]
    runs[1::2] -= runs[::2]
    runs[::2] += offset + 1
    return " ".join(map(str, runs.tolist()))


def decode(rle: str, shape: tuple[int, int], order: Order = "F") -> np.ndarray:
    """Decode an RLE string into a boolean mask.

    Args:
        rle: ``start length`` pairs, space-separated; ``""`` (or only whitespace) is the empty mask.
        shape: ``(height, width)`` of the mask.
        order: ``"F"`` for Kaggle's column-major numbering, ``"C"`` for row-major.

    Returns:
        A C-contiguous boolean mask.

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
    _check_runs(starts, lengths, height * width)
    mask = np.zeros((height, width), dtype=np.bool_)
    if starts.size == 0:
        return mask
    pixels = _run_pixels(starts - 1, lengths)
    if order == "F":
        cols, rows = np.divmod(pixels, height)
        pixels = rows * width + cols
    mask.reshape(-1)[pixels] = True
    return mask


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


def _parse_runs(rle: str) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(rle, str):
        raise RLEError(f"RLE must be a string; got {type(rle).__name__}")
    tokens = rle.split()
    if not tokens:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    if len(tokens) % 2:
        raise RLEError(f"RLE has an odd number of values ({len(tokens)}); it must be 'start length' pairs")
    joined = "".join(tokens)
    if not (joined.isascii() and joined.isdigit()):
        bad = next(t for t in tokens if not (t.isascii() and t.isdigit()))
        raise RLEError(f"RLE value {bad[:20]!r} is not a non-negative integer")
    if max(map(len, tokens)) > 18:
        raise RLEError("RLE value has more than 18 digits; no image is that large")
    values = np.array(tokens, dtype=np.int64)
    return values[0::2], values[1::2]


def _check_runs(starts: np.ndarray, lengths: np.ndarray, n_pixels: int) -> None:
    if starts.size == 0:
        return
    if starts.min() < 1:
        index = int(np.argmax(starts < 1))
        raise RLEError(f"run {index + 1} starts at {starts[index]}; starts are 1-indexed")
    if lengths.min() < 1:
        index = int(np.argmax(lengths < 1))
        raise RLEError(f"run {index + 1} has length {lengths[index]}; lengths must be >= 1")
    ends = starts + lengths
    clash = starts[1:] < ends[:-1]
    if clash.any():
        index = int(np.argmax(clash)) + 1
        what = "is not after the previous run" if starts[index] <= starts[index - 1] else "overlaps the previous run"
        raise RLEError(f"run {index + 1} (start {starts[index]}) {what}; runs must be increasing and disjoint")
    if ends[-1] - 1 > n_pixels:
        raise RLEError(f"last run ends at pixel {ends[-1] - 1}, past the end of the image ({n_pixels} pixels)")


def _run_pixels(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """0-based pixel numbers covered by sorted, disjoint runs, without a loop over runs."""
    before = np.cumsum(lengths) - lengths
    return np.arange(int(lengths.sum()), dtype=np.int64) + np.repeat(starts - before, lengths)
