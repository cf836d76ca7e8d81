"""Frames to leave out of training: the exclusions file, its rule, and the one reader and writer of its format.

``medseg inspect DATA --write-exclusions FILE`` writes it from the near-duplicate pairs whose masks
contradict; ``medseg train DATA --exclude FILE`` (or ``data.exclude: FILE``) leaves its frames out of
training, validation and tuning, and records them in ``run.json``. The format is a small CSV, UTF-8,
with ``#`` comment lines (the rule that chose the frames), a header and one row per frame::

    # medseg exclusions: ...
    id,reason
    1_40,"no mask, but its near-duplicate 1_1 (similarity 0.990) has one of 4616 px"

A hand-written file needs only the ``id`` column. The rule, per pair of near-duplicate frames of one
subject whose masks contradict (per structure, with several; a frame is listed once with every reason):

- one mask empty and the other not: the empty one is left out; the annotator missed the structure (the
  rule the best Ultrasound Nerve Segmentation write-ups applied by hand);
- both masks there but overlapping with a Dice below 0.5: both are left out, since nothing tells which
  one is right, and a model cannot learn both.
"""

from __future__ import annotations

import csv
import io as text_io
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

from medseg.data import io
from medseg.data.datasets import Dataset
from medseg.data.inspector import Contradiction
from medseg.errors import DataError, UsageError
from medseg.files import atomic_write, shown

COLUMNS = ("id", "reason")
RULE = (
    "of two near-duplicate frames whose masks contradict, the one without a mask is left out where the other has one "
    "(the annotator missed the structure); where both have masks that overlap with a Dice below 0.5, both are left out "
    "(which one is right is unknown); with several structures the rule applies per structure"
)
_PREVIEW = 5
MAX_BYTES = 16 * 1024 * 1024
"""The largest exclusions file read (16 MiB): one of every frame of a 100,000-frame data set, with reasons, is about 10 MB."""


def leave_out(contradictions: Iterable[Contradiction]) -> dict[str, str]:
    """The frames the rule leaves out, each with its reasons.

    Args:
        contradictions: The inspector's contradicting pairs (:attr:`medseg.data.inspector.Inspection.contradictions`).

    Returns:
        Reason by frame id, in the order the pairs were found; a frame of several pairs (or structures)
        is listed once, its reasons joined by ``; ``.
    """
    reasons: dict[str, list[str]] = {}
    for item in contradictions:
        for frame, other in _left_out(item):
            reasons.setdefault(frame, []).append(_reason(item, frame, other))
    return {frame: "; ".join(found) for frame, found in reasons.items()}


def _left_out(item: Contradiction) -> list[tuple[str, str]]:
    """``(frame left out, the other frame of the pair)`` by the rule: the empty one, or both."""
    first, second = item.first.id, item.second.id
    if item.dice is not None:
        return [(first, second), (second, first)]
    return [(first, second)] if item.areas[0] == 0 else [(second, first)]


def _reason(item: Contradiction, frame: str, other: str) -> str:
    prefix = f"{item.structure}: " if item.structure is not None else ""
    near = f"its near-duplicate {other} (similarity {item.similarity:.3f})"
    if item.dice is not None:
        return f"{prefix}its mask overlaps that of {near} with Dice {item.dice:.2f} only: which one is right is unknown"
    return f"{prefix}no mask, but {near} has one of {max(item.areas)} px"


def write_exclusions(path: Path, excluded: dict[str, str], source: str = "", exclusive: bool = False) -> None:
    """Write an exclusions file atomically: the rule as a comment, the header, one row per frame.

    Args:
        path: The file.
        excluded: Reason by frame id.
        source: What the frames were found in (the data folder), for the comment.
        exclusive: Never replace a file another process wrote meanwhile (:func:`medseg.files.atomic_write`).
    """
    buffer = text_io.StringIO()
    found_in = f" of {source}" if source else ""
    buffer.write(f"# medseg exclusions{found_in}: frames left out of training and tuning by `medseg train --exclude FILE`\n")
    buffer.write(f"# rule: {RULE}\n")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerows(excluded.items())
    with atomic_write(path, exclusive=exclusive) as stream:
        stream.write(buffer.getvalue())


def read_exclusions(path: Path) -> dict[str, str]:
    """Read an exclusions file.

    Returns:
        Reason by frame id, in the file's order (``""`` where the file gives none).

    Raises:
        UsageError: If the file is missing or unreadable.
        DataError: If it is not an exclusions file: larger than :data:`MAX_BYTES`, no ``id`` column, a column
            named twice, an empty, repeated or unsafe id (:data:`~medseg.data.io.FRAME_ID_RULE`), a row with
            too many cells, a cell longer than Python's CSV field limit. The message names the file, the line and the fix.
    """
    path = Path(path)
    try:
        _check_size(path)
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UsageError(f"{path}: exclusions file not found; write one with `medseg inspect DATA --write-exclusions {path}`") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a UTF-8 text file; an exclusions file is a CSV of id,reason") from None
    except OSError as error:
        raise UsageError(f"{path}: cannot read the exclusions file ({error.strerror or error})") from None
    rows = [(number, row) for number, row in _rows(path, text) if any(cell.strip() for cell in row)]
    if not rows:
        raise DataError(f"{path}: no header; an exclusions file starts with the line id,reason")
    (header_line, header), body = rows[0], rows[1:]
    columns = _columns(path, header_line, header)
    return _entries(path, body, columns)


def _check_size(path: Path) -> None:
    """Refuse a file larger than :data:`MAX_BYTES` before it is read (``FileNotFoundError`` passes through)."""
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise DataError(f"{path}: {size:,} bytes, more than an exclusions file can be ({MAX_BYTES:,}); is it the right file?")


def _rows(path: Path, text: str) -> list[tuple[int, list[str]]]:
    """The CSV rows of a text, each with the line it ends on, ``#`` comment lines left out.

    Raises:
        DataError: If the CSV cannot be parsed (a NUL byte, an unclosed quote at the end).
    """
    lines = [(number, line) for number, line in enumerate(text.splitlines(), start=1) if not line.lstrip().startswith("#")]
    reader = csv.reader((line for _, line in lines), strict=True)
    rows = []
    try:
        for row in reader:
            rows.append((lines[reader.line_num - 1][0], row))
    except csv.Error as error:
        raise DataError(f"{path}: not a CSV file ({error}); an exclusions file is a CSV of id,reason") from None
    return rows


def _columns(path: Path, line: int, header: list[str]) -> int:
    names = tuple(cell.strip().lower() for cell in header)
    repeated = next((name for index, name in enumerate(names) if name in names[:index]), None)
    if repeated is not None:
        raise DataError(f"{path}: line {line}: column {shown(repeated)} appears more than once in the header; keep one")
    if names not in (COLUMNS[:1], COLUMNS):
        raise DataError(f"{path}: line {line}: the header is {','.join(header)!r}, not id,reason; start the file with the line id,reason")
    return len(names)


def _entries(path: Path, body: list[tuple[int, list[str]]], columns: int) -> dict[str, str]:
    excluded: dict[str, str] = {}
    seen: dict[str, int] = {}
    for line, row in body:
        if len(row) > columns:
            raise DataError(f"{path}: line {line}: {len(row)} cells for {columns} column(s); quote a reason that holds a comma")
        frame = row[0].strip()
        if not frame:
            raise DataError(f"{path}: line {line}: no id; give the frame's id (as in a submission) or delete the line")
        if not io.is_frame_id(frame):
            raise DataError(f"{path}: line {line}: {shown(frame)} cannot be a frame id ({io.FRAME_ID_RULE}); fix it or delete the line")
        if frame in seen:
            raise DataError(f"{path}: line {line}: {frame} is listed already on line {seen[frame]}; list each frame once")
        seen[frame] = line
        excluded[frame] = row[1].strip() if len(row) > 1 else ""
    return excluded


def read_for(path: str | Path | None, dataset: Dataset) -> dict[str, str]:
    """The frames an exclusions file (``data.exclude``) names, read and checked against the data set; none without one.

    Raises:
        UsageError: If the file is missing.
        DataError: If it is malformed or names frames the data set does not have.
    """
    if path is None:
        return {}
    excluded = read_exclusions(Path(path))
    check_known(Path(path), excluded, dataset)
    return excluded


def check_known(path: Path, excluded: dict[str, str], dataset: Dataset) -> None:
    """Check that every excluded frame is a labelled frame of the data set, and that some are left.

    Raises:
        DataError: Naming the file, the unknown ids and the fix.
    """
    known = {record.id for record in dataset.train}
    unknown = [frame for frame in excluded if frame not in known]
    if unknown:
        shown = ", ".join(unknown[:_PREVIEW]) + (f" and {len(unknown) - _PREVIEW} more" if len(unknown) > _PREVIEW else "")
        raise DataError(
            f"{path}: {len(unknown)} id(s) are not labelled frames of {dataset.root} ({shown}); "
            f"write the file for this data with `medseg inspect {dataset.root} --write-exclusions FILE --force` or delete those lines"
        )
    if known and known <= set(excluded):
        raise DataError(f"{path}: leaves out every labelled frame of {dataset.root}; nothing would be left to train on")


def without(dataset: Dataset, excluded: Iterable[str]) -> Dataset:
    """The data set without the excluded labelled frames (the same object when none are excluded)."""
    excluded = set(excluded)
    if not excluded:
        return dataset
    return replace(dataset, train=[record for record in dataset.train if record.id not in excluded])
