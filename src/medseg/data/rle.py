"""Run-length encoding of binary masks, as in Kaggle's segmentation competitions, in three dialects.

An RLE string is a space-separated list of pairs. The dialects (``dialect=``):

- ``kaggle``: ``start length`` pairs, starts 1-indexed, pixels numbered top to bottom, then left to right
  (column-major, ``order="F"``), as in the Ultrasound Nerve Segmentation ``train_masks.csv``; the empty
  string is the empty mask.
- ``row-major``: the same, pixels numbered left to right, then top to bottom (``order="C"``), as in
  UW-Madison GI Tract.
- ``siim``: ``offset length`` pairs, column-major, as in SIIM-ACR Pneumothorax: the first offset counts
  from pixel 0, every other one from the end of the previous run; ``-1`` is the empty mask. Its tables
  list a frame's regions on several rows (OR-ed, :func:`decode_union`), under ``ImageId, EncodedPixels``.

Without ``dialect``, ``order`` picks between the first two (Kaggle by default). :func:`guess_dialect`
tells absolute starts from relative offsets where the cells of a table allow it.

Both directions are vectorised: no Python loop runs once per run.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from medseg.config import DIALECTS, Dialect
from medseg.errors import MedsegError

Order = Literal["F", "C"]
_ORDERS = ("F", "C")
SIIM_EMPTY = "-1"
"""The siim dialect's empty mask."""
SIIM_HEADER = ("ImageId", " EncodedPixels")
"""The header of SIIM's ``train-rle.csv`` as written, with its stray space."""
_ORDER_OF = {"kaggle": "F", "row-major": "C", "siim": "F"}
MEANINGS = {
    "kaggle": "kaggle: 'start length' pairs, starts 1-indexed, pixels numbered top to bottom, then left to right; '' is empty",
    "row-major": "row-major: 'start length' pairs, starts 1-indexed, pixels numbered left to right, then top to bottom; '' is empty",
    "siim": "siim: 'offset length' pairs, pixels numbered top to bottom, then left to right, each offset from the end of the "
    "previous run (the first from pixel 0); '-1' is empty",
}
"""Each dialect in words (the exported model's settings say which one its masks are written in)."""
_UNBOUNDED = (2**62, 1)
_ONLY_DIGITS_AND_SPACE = re.compile(r"[0-9 \t\n\r\f\v]*").fullmatch
_FOREIGN_CHARACTER = re.compile(r"[^0-9 \t\n\r\f\v]").search
_BYTE_OFFSETS = np.arange(8, dtype=np.int64)


class RLEError(MedsegError, ValueError):
    """A malformed run-length encoding, or a mask that cannot be encoded."""


def encode(mask: np.ndarray, order: Order | None = None, *, dialect: Dialect | None = None) -> str:
    """Encode a 2-D mask as an RLE string.

    Args:
        mask: 2-D array; any non-zero pixel is foreground.
        order: ``"F"`` for Kaggle's column-major numbering (the default), ``"C"`` for row-major.
        dialect: ``kaggle``, ``row-major`` or ``siim``; it sets the order (``order`` may only agree).

    Returns:
        The pairs, space-separated, touching runs merged; ``""`` for an empty mask (``-1`` in siim).

    Raises:
        RLEError: If ``mask`` is not 2-D, ``order`` or ``dialect`` is unknown, or they contradict.

    Shape:
        mask: (H, W).
    """
    order, relative = _resolve(order, dialect)
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise RLEError(f"RLE encodes 2-D masks; got an array of shape {mask.shape}")
    if mask.dtype != np.bool_:
        mask = mask != 0
    if not mask.any():
        return SIIM_EMPTY if relative else ""
    edges = _run_edges(mask, order)
    runs = np.empty_like(edges)
    runs[1::2] = edges[1::2] - edges[0::2]
    if relative:
        runs[0] = edges[0]
        runs[2::2] = edges[2::2] - edges[1:-1:2]
    else:
        runs[0::2] = edges[0::2] + 1
    return ("%d " * runs.size % tuple(runs.tolist()))[:-1]


def _run_edges(mask: np.ndarray, order: str) -> np.ndarray:
    """0-based positions where the runs of a non-empty boolean mask start and end, in ``order``."""
    lines = mask.T if order == "F" else mask
    if lines.flags.c_contiguous:
        return _edges_along(lines.reshape(-1))
    if lines.T.flags.c_contiguous:
        return _edges_across(lines.T)
    return _edges_along(np.ascontiguousarray(lines).reshape(-1))


def decode(rle: str, shape: tuple[int, int], order: Order | None = None, *, dialect: Dialect | None = None) -> np.ndarray:
    """Decode an RLE string into a boolean mask.

    Args:
        rle: Pairs separated by whitespace; ``""`` (or only whitespace) is the empty mask, and so is ``-1``
            in siim.
        shape: ``(height, width)`` of the mask.
        order: ``"F"`` for Kaggle's column-major numbering (the default), ``"C"`` for row-major.
        dialect: ``kaggle``, ``row-major`` or ``siim``; it sets the order (``order`` may only agree).

    Returns:
        The mask. It is laid out in memory in the RLE's own order (Fortran-ordered for ``"F"``), which
        costs no copy and behaves like any other array; ``np.ascontiguousarray`` makes it row-major.

    Raises:
        RLEError: If the string is malformed: an odd number of values, a value that is not a
            non-negative integer, a start below 1 (absolute dialects), a length below 1, runs that are
            not increasing or that overlap (absolute dialects), or a run past the end of the image.

    Shape:
        Returns: (H, W).
    """
    order, relative = _resolve(order, dialect)
    height, width = _check_shape(shape)
    starts, lengths, gaps = _runs(rle, height * width, relative)
    flat = np.zeros(height * width, dtype=np.bool_)
    if starts.size:
        _paint_runs(flat, starts, lengths, gaps)
    return flat.reshape(width, height).T if order == "F" else flat.reshape(height, width)


def decode_union(rles: Iterable[str], shape: tuple[int, int], order: Order | None = None, *, dialect: Dialect | None = None) -> np.ndarray:
    """Decode several RLE strings of one frame (a siim table's rows of one image) into the union of their masks.

    Args:
        rles: The strings; none at all is the empty mask.
        shape: ``(height, width)`` of the mask.
        order: As for :func:`decode`.
        dialect: As for :func:`decode`.

    Raises:
        RLEError: If a string is malformed (see :func:`decode`).

    Shape:
        Returns: (H, W).
    """
    texts = list(rles) or [""]
    mask = decode(texts[0], shape, order, dialect=dialect)
    for text in texts[1:]:
        mask |= decode(text, shape, order, dialect=dialect)
    return mask


def check(rle: str, shape: tuple[int, int], order: Order | None = None, *, dialect: Dialect | None = None) -> None:
    """Validate an RLE string for a mask of ``shape`` without building the mask.

    Args:
        rle: The pairs, space-separated.
        shape: ``(height, width)`` of the mask.
        order: ``"F"`` for Kaggle's column-major numbering (the default), ``"C"`` for row-major.
        dialect: ``kaggle``, ``row-major`` or ``siim``; it sets the order (``order`` may only agree).

    Raises:
        RLEError: If the string is malformed (see :func:`decode`).
    """
    _, relative = _resolve(order, dialect)
    height, width = _check_shape(shape)
    _runs(rle, height * width, relative)


@dataclass(frozen=True)
class Guess:
    """What the cells of an RLE column tell of their dialect.

    Attributes:
        dialect: ``siim`` (relative offsets) or ``kaggle`` (absolute starts; row-major cannot be told from
            the text), or ``None`` when the cells do not tell.
        reason: Why, naming a row, for messages.
        contradictory: Whether some cells read only as one dialect and others only as the other.
    """

    dialect: Dialect | None
    reason: str
    contradictory: bool = False


def guess_dialect(
    cells: Sequence[str], shapes: Sequence[tuple[int, int] | None] | None = None, *, siim_header: bool = False, first_row: int = 1
) -> Guess:
    """Tell kaggle's absolute starts from siim's relative offsets by the cells of an RLE column.

    A ``-1`` cell, or one that reads as relative offsets but not as absolute starts (runs not increasing),
    is siim's; one that reads only as absolute starts (as offsets it runs past its frame) is kaggle's.
    Where no cell tells, an empty cell (kaggle's empty mask) or siim's header decides.

    Args:
        cells: The RLE cells, as read.
        shapes: Each cell's ``(height, width)``, ``None`` where unknown (only run order is judged then).
        siim_header: Whether the table's header is :data:`SIIM_HEADER` as written.
        first_row: The row number of the first cell, for messages.

    Returns:
        The guess; ``dialect`` is ``None`` when the cells contradict each other or do not tell.
    """
    sizes = list(shapes) if shapes is not None else [None] * len(cells)
    siim = kaggle = empty = None
    told = False
    for row, (text, shape) in enumerate(zip(cells, sizes, strict=True), first_row):
        stripped = text.strip() if isinstance(text, str) else None
        if stripped == SIIM_EMPTY:
            siim = siim or f"row {row} is '-1', siim's empty mask"
        elif stripped == "":
            empty = empty or row
        elif stripped is not None and not (siim and kaggle):
            n_pixels = _pixels(shape)
            as_starts, as_offsets = _reads(stripped, n_pixels, False), _reads(stripped, n_pixels, True)
            told = told or as_starts or as_offsets
            if as_offsets and not as_starts:
                siim = siim or f"row {row} reads as relative offsets, not as increasing absolute starts"
            elif as_starts and not as_offsets:
                kaggle = kaggle or f"row {row} reads as absolute starts, and as relative offsets runs past its frame"
    return _verdict(siim, kaggle, empty, siim_header, told)


def _verdict(siim: str | None, kaggle: str | None, empty: int | None, siim_header: bool, told: bool) -> Guess:
    if siim and kaggle:
        return Guess(None, f"{siim} (siim), but {kaggle} (kaggle)", contradictory=True)
    if siim or kaggle:
        return Guess("siim" if siim else "kaggle", siim or kaggle)
    header = "the header 'ImageId, EncodedPixels' (siim's, with its stray space)"
    if empty and siim_header:
        return Guess(None, f"row {empty} is empty (kaggle's empty mask) under {header}", contradictory=True)
    if siim_header:
        return Guess("siim", header)
    if empty or not told:
        return Guess("kaggle", f"row {empty} is empty, kaggle's empty mask" if empty else "no mask to tell")
    return Guess(None, "every mask reads both as kaggle's absolute starts and as siim's relative offsets")


def _reads(text: str, n_pixels: int, relative: bool) -> bool:
    try:
        _runs(text, n_pixels, relative)
    except RLEError:
        return False
    return True


def _pixels(shape: tuple[int, int] | None) -> int:
    height, width = _check_shape(shape or _UNBOUNDED)
    return height * width


def _resolve(order: str | None, dialect: str | None) -> tuple[str, bool]:
    """The pixel order and whether starts are relative, of an ``order`` and ``dialect`` checked together."""
    if dialect is None:
        order = "F" if order is None else order
        _check_order(order)
        return order, False
    if dialect not in DIALECTS:
        raise RLEError(f"unknown RLE dialect {dialect!r}; use kaggle, row-major or siim")
    implied = _ORDER_OF[dialect]
    if order is not None and order != implied:
        _check_order(order)
        raise RLEError(f"RLE order {order!r} contradicts the {dialect} dialect (order {implied!r}); give one of them")
    return implied, dialect == "siim"


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


def _runs(rle: str, n_pixels: int, relative: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The 0-based starts, lengths and gaps of an RLE string's runs, checked for a frame of ``n_pixels``."""
    if relative and isinstance(rle, str) and rle.strip() == SIIM_EMPTY:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    starts, lengths = _parse_runs(rle, relative)
    if relative:
        return _relative_runs(starts, lengths, n_pixels)
    gaps = _check_runs(starts, lengths, n_pixels)
    return starts - 1, lengths, gaps


def _parse_runs(rle: str, relative: bool = False) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(rle, str):
        raise RLEError(f"RLE must be a string; got {type(rle).__name__}")
    if not relative and rle.strip() == SIIM_EMPTY:
        raise RLEError("RLE '-1' is the siim dialect's empty mask, not a 'start length' pair; read the table with --rle-format siim")
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


def _relative_runs(offsets: np.ndarray, lengths: np.ndarray, n_pixels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """0-based starts, lengths and gaps of siim runs, each offset counting from the end of the previous run."""
    if offsets.size == 0:
        return offsets, lengths, offsets
    if lengths.min() < 1:
        index = int(np.argmax(lengths < 1))
        raise RLEError(f"run {index + 1} has length {lengths[index]}; lengths must be >= 1")
    if max(offsets.max(), lengths.max()) > n_pixels or offsets.sum(dtype=np.float64) + lengths.sum(dtype=np.float64) > n_pixels:
        raise RLEError(f"a run reaches past the end of the image ({n_pixels} pixels)")
    ends = np.cumsum(offsets + lengths)
    if ends[-1] > n_pixels:
        raise RLEError(f"last run ends at pixel {ends[-1]}, past the end of the image ({n_pixels} pixels)")
    return ends - lengths, lengths, offsets[1:]


def _paint_runs(flat: np.ndarray, starts: np.ndarray, lengths: np.ndarray, gaps: np.ndarray) -> None:
    """Set sorted, disjoint runs (0-based starts) of a flat mask with one ``np.repeat`` over their span."""
    values = np.zeros(2 * starts.size - 1, dtype=np.bool_)
    values[0::2] = True
    counts = np.empty(2 * starts.size - 1, dtype=np.int64)
    counts[0::2] = lengths
    counts[1::2] = gaps
    flat[starts[0] : starts[-1] + lengths[-1]] = np.repeat(values, counts)
