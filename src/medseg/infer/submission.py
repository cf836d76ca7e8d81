"""Submission files: writing them, and a validator that refuses broken or degenerate ones.

A submission is a CSV with a header and one ``id,rle`` row per test frame (``img,pixels`` for the Kaggle
Ultrasound Nerve Segmentation competition), in the sample submission's order, an empty cell for an
empty mask (in the siim RLE dialect: ``ImageId,EncodedPixels``, ``-1`` for an empty mask); with several
structures per frame, one ``id,class,rle`` row per frame and class (the dialects of
:mod:`medseg.data.long_rle`), checked class by class (:func:`validate_long`). :func:`validate` finds two
kinds of trouble:

- **problems**: ids missing, extra or repeated against the sample submission, and RLE cells that are
  malformed or run past their frame. Such a file is wrong and is always refused.
- **degenerate output**: every mask full or nearly full, every mask the same, or every mask empty
  while the training data had masks. Such a file is valid but almost surely the product of a broken
  model (it scores about what an all-empty or all-full submission scores), so it is refused unless
  the user insists (``--allow-degenerate``).

What could not be checked (bounds without frame sizes, for instance) is said in the report's notes.
"""

from __future__ import annotations

import csv
import io as text_io
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from medseg.data import io, long_rle, rle
from medseg.data.datasets import written_header
from medseg.errors import DataError
from medseg.files import atomic_write

FULL_FRACTION = 0.9
"""A mask covering at least this fraction of its frame counts as (nearly) full."""

_SHOWN = 5
_UNBOUNDED = (2**62, 1)
_ID_COLUMNS = ("img", "id", "imageid")
_MASK_COLUMNS = ("pixels", "rle", "encodedpixels")

Size = tuple[int, int]
Sizes = Mapping[str, Size] | Size | None
_HEADERS = {"siim": ("ImageId", "EncodedPixels")}


def submission_header(dialect: str) -> tuple[str, str]:
    """The id and mask column names of a submission in an RLE dialect: ``img,pixels``, ``ImageId,EncodedPixels`` for siim."""
    return _HEADERS.get(dialect, ("img", "pixels"))


class SubmissionError(DataError):
    """A submission that cannot be used: unreadable, wrong ids, malformed RLE, or degenerate output."""


@dataclass(frozen=True)
class SubmissionReport:
    """What :func:`validate` found in a submission.

    Attributes:
        rows: Number of data rows.
        empty: Rows with a valid, empty mask.
        problems: Hard problems (ids, RLE), each one line naming the id or row.
        degenerate: Degenerate-output findings, each one line.
        bounds_checked: Whether every row's RLE was checked against its frame size.
        notes: What was not checked, and why; each one line. Not a failure.
        path: The file the rows were read from or will be written to, named in error messages.
    """

    rows: int
    empty: int
    problems: list[str]
    degenerate: list[str]
    bounds_checked: bool
    notes: list[str] = field(default_factory=list)
    path: Path | None = None

    @property
    def ok(self) -> bool:
        """Whether there are no problems and no degenerate findings."""
        return not self.problems and not self.degenerate


@dataclass
class _Masks:
    """Per-row facts gathered while checking the RLE cells; ``None`` marks an invalid cell."""

    runs: list[str | None]
    sizes: list[Size | None]


def read_sample_ids(path: Path) -> list[str]:
    """Read the ids of a sample submission, in order.

    Args:
        path: The sample submission CSV; ids come from its ``img`` column, else its first column, with
            surrounding whitespace removed.

    Returns:
        The ids.

    Raises:
        DataError: If the file cannot be read as a CSV, has no rows, or has empty or repeated ids.
    """
    path = Path(path)
    table = io.read_csv(path, ())
    column = "img" if "img" in table.columns else table.columns[0]
    ids = [value.strip() for value in table[column]]
    if not ids:
        raise DataError(f"{path}: sample submission has no rows; it needs one row per test id")
    if "" in ids:
        raise DataError(f"{path}: row {ids.index('') + 1} has an empty id in column {column}; fill it in or drop the row")
    repeated = _repeated(ids)
    if repeated:
        raise DataError(f"{path}: {len(repeated)} id(s) listed more than once ({_first(repeated)}); keep one row per id")
    return ids


def validate(
    ids: Sequence[str],
    rles: Sequence[str],
    sample_ids: Sequence[str] | None = None,
    sizes: Sizes = None,
    train_had_masks: bool | None = None,
    order: str = "F",
    *,
    dialect: str | None = None,
    path: Path | None = None,
) -> SubmissionReport:
    """Check the rows of a submission.

    Problems: ids missing from, not in, or repeated against ``sample_ids`` (repeats are checked even
    without a sample); RLE cells that are malformed or, where the frame size is known, run past the
    frame. Without a size for a row only its syntax and run order are checked (``bounds_checked`` is
    then false and a note says so).

    Degenerate output, judged on the rows with valid RLE when there are at least two of them:

    - every non-empty mask (at least two of them; the others empty) covers at least 90% of its frame.
      This needs every non-empty row's size and is skipped with a note otherwise: an RLE alone does
      not tell how large its frame is, and guessing it from the last run would call a small mask in
      the first columns "full";
    - every mask is the same non-empty mask;
    - every mask is empty while ``train_had_masks`` is true. When it is ``None`` (unknown), an
      all-empty submission is not judged degenerate; a note says so. When false, all-empty is fine.

    Args:
        ids: The id of each row.
        rles: The RLE of each row; ``""`` is the empty mask.
        sample_ids: The ids the submission must list, each exactly once.
        sizes: ``(height, width)`` of every frame, or a mapping from id to it.
        train_had_masks: Whether the training data had non-empty masks.
        order: RLE pixel order, ``"F"`` (Kaggle, column-major) or ``"C"`` (row-major).
        dialect: RLE dialect (``kaggle``, ``row-major``, ``siim``); ``None`` is the one of ``order``.
        path: The file the rows come from or go to, kept for messages.

    Returns:
        The report. Rows in messages are data rows counted from 1 (the header is not counted).

    Raises:
        ValueError: If ``ids`` and ``rles`` differ in length.
        RLEError: If ``order``, ``dialect`` or a frame size is invalid, or ``order`` and ``dialect`` contradict.
    """
    if len(ids) != len(rles):
        raise ValueError(f"{len(ids)} ids but {len(rles)} RLE strings; give one RLE per id")
    dialect = _dialect(order, dialect)
    size_of = _size_lookup(sizes)
    problems = _id_problems(ids, sample_ids)
    masks, rle_problems, unsized = _check_masks(ids, rles, size_of, dialect)
    problems += rle_problems
    notes = _size_notes(ids, unsized, sizes is None)
    degenerate = _degenerate(masks, train_had_masks, notes)
    empty = sum(runs == "" for runs in masks.runs)
    bounds_checked = sizes is not None and not unsized
    return SubmissionReport(len(ids), empty, problems, degenerate, bounds_checked, notes, path)


def validate_file(
    path: Path,
    sample: Path | None = None,
    sizes: Sizes = None,
    train_had_masks: bool | None = None,
    order: str = "F",
    *,
    dialect: str | None = None,
) -> SubmissionReport:
    """Read a submission CSV and :func:`validate` it.

    The id column is ``img``, ``id`` or ``ImageId`` (else the first column), the mask column
    ``pixels``, ``rle`` or ``EncodedPixels`` (names in any case).

    Args:
        path: The submission CSV (UTF-8).
        sample: The sample submission whose ids the file must list.
        sizes: Frame sizes, as for :func:`validate`.
        train_had_masks: Whether the training data had non-empty masks.
        order: RLE pixel order.
        dialect: RLE dialect; ``None`` with order ``"F"`` tells kaggle from siim by the file's cells
            (:func:`medseg.data.rle.guess_dialect`), kaggle where they do not tell (a note says so).

    Returns:
        The report, naming ``path``.

    Raises:
        SubmissionError: If the file is missing, not UTF-8, not a CSV or has no mask column, or its cells
            read as kaggle in some rows and as siim in others.
        DataError: If the sample submission cannot be read.
    """
    path = Path(path)
    long_table = _long_table(path)
    if long_table is not None:
        ids, classes, rles = long_table
        sample_pairs = read_sample_pairs(Path(sample))[0] if sample is not None else None
        return validate_long(ids, classes, rles, sample_pairs, sizes, None, order, dialect=dialect, path=path)
    ids, rles = _read_submission(path)
    sample_ids = read_sample_ids(sample) if sample is not None else None
    notes: list[str] = []
    if dialect is None and order == "F":
        dialect = _file_dialect(path, ids, rles, sizes, notes)
    report = validate(ids, rles, sample_ids, sizes, train_had_masks, order, dialect=dialect, path=path)
    return replace(report, notes=notes + report.notes)


def _file_dialect(path: Path, ids: list[str], rles: list[str], sizes: Sizes, notes: list[str]) -> str:
    """The RLE dialect a submission's cells are written in; kaggle, with a note, where they do not tell.

    Raises:
        SubmissionError: If some cells read only as kaggle and others only as siim.
    """
    size_of = _size_lookup(sizes)
    siim_header = written_header(path) == rle.SIIM_HEADER
    guess = rle.guess_dialect(rles, [size_of(i) for i in ids], siim_header=siim_header)
    if guess.contradictory:
        raise SubmissionError(f"{path}: cannot tell the RLE dialect: {guess.reason}; name it with --rle-format kaggle, row-major or siim")
    if guess.dialect is None:
        notes.append(f"RLE dialect not told by the file ({guess.reason}): checked as kaggle; name another with --rle-format")
    return guess.dialect or "kaggle"


def _dialect(order: str, dialect: str | None) -> str:
    """The RLE dialect of a validation: ``dialect`` (checked against a non-default ``order``), else ``order``'s.

    Raises:
        RLEError: If either is unknown, or they contradict.
    """
    if dialect is None:
        rle.check("", (1, 1), order)
        return "row-major" if order == "C" else "kaggle"
    rle.check("", (1, 1), None if order == "F" else order, dialect=dialect)
    return dialect


def _long_table(path: Path) -> tuple[list[str], list[str], list[str]] | None:
    """The ids, classes and RLE cells of a long submission (one row per frame and class), or ``None``."""
    try:
        table = io.read_csv(path, ())
        dialect = long_rle.detect_format(list(table.columns), path=path)
    except DataError as error:
        raise SubmissionError(str(error)) from error
    if dialect is None:
        return None
    strip = [value.strip() for value in table[dialect.class_column]]
    return table[dialect.id_column].tolist(), strip, table[dialect.rle_column].tolist()


def read_sample_pairs(path: Path) -> tuple[list[tuple[str, str]], tuple[str, str, str]]:
    """The (id, class) pairs of a long sample submission, in order, and its id, class and RLE column names
    (a submission writes them back so).

    Raises:
        DataError: If it is not a long table (one row per frame and class) or lists a pair twice.
    """
    table = io.read_csv(path, ())
    dialect = long_rle.detect_format(list(table.columns), path=path)
    if dialect is None:
        raise DataError(f"{path}: not a sample of one row per frame and class (id,class,rle); give the long sample submission")
    pairs = list(
        zip((value.strip() for value in table[dialect.id_column]), (value.strip() for value in table[dialect.class_column]), strict=True)
    )
    repeated = _repeated(pairs)
    if repeated:
        raise DataError(f"{path}: {len(repeated)} (id, class) pair(s) listed more than once ({_first(repeated)}); keep one row per pair")
    return pairs, (dialect.id_column, dialect.class_column, dialect.rle_column)


def validate_long(
    ids: Sequence[str],
    classes: Sequence[str],
    rles: Sequence[str],
    sample_pairs: Sequence[tuple[str, str]] | None = None,
    sizes: Sizes = None,
    train_had_masks: Mapping[str, bool] | None = None,
    order: str = "F",
    *,
    dialect: str | None = None,
    path: Path | None = None,
) -> SubmissionReport:
    """Check a long submission: one row per frame and class (several structures per frame).

    Every class's rows are checked as :func:`validate` checks a submission of one structure (each id once
    against the sample's ids of that class, valid RLE within its frame, degenerate output), and each
    finding names its class; classes the sample does not list are problems too.

    Args:
        ids: The frame id of each row.
        classes: The class of each row.
        rles: The RLE of each row; ``""`` is the empty mask.
        sample_pairs: The (id, class) pairs the submission must list, each exactly once.
        sizes: ``(height, width)`` of every frame, or a mapping from id to it.
        train_had_masks: Whether the training data had masks, per class.
        order: RLE pixel order.
        dialect: RLE dialect; ``None`` is the one of ``order``.
        path: The file the rows come from or go to, kept for messages.

    Returns:
        The report; ``rows`` and ``empty`` count (id, class) rows.

    Raises:
        ValueError: If ``ids``, ``classes`` and ``rles`` differ in length.
    """
    if not len(ids) == len(classes) == len(rles):
        raise ValueError(f"{len(ids)} ids, {len(classes)} classes and {len(rles)} RLE strings; give one class and RLE per id")
    wanted = list(dict.fromkeys(label for _, label in sample_pairs)) if sample_pairs is not None else []
    found = list(dict.fromkeys(classes))
    problems, degenerate, notes = [], [], []
    extra = [label for label in found if sample_pairs is not None and label not in wanted]
    if extra:
        problems.append(f"{len(extra)} class(es) not in the sample submission ({_first(extra)}); drop their rows")
    rows = empty = 0
    bounds_checked = True
    for label in wanted + [label for label in found if label not in wanted]:
        chosen = [index for index, value in enumerate(classes) if value == label]
        sample_ids = [sample_id for sample_id, value in sample_pairs if value == label] if sample_pairs is not None else None
        had_masks = None if train_had_masks is None else train_had_masks.get(label)
        report = validate([ids[i] for i in chosen], [rles[i] for i in chosen], sample_ids, sizes, had_masks, order, dialect=dialect)
        problems += [f"class {label!r}: {problem}" for problem in report.problems]
        degenerate += [f"class {label!r}: {finding}" for finding in report.degenerate]
        notes += [f"class {label!r}: {note}" for note in report.notes]
        rows, empty, bounds_checked = rows + report.rows, empty + report.empty, bounds_checked and report.bounds_checked
    return SubmissionReport(rows, empty, problems, degenerate, bounds_checked and bool(ids), notes, path)


def write_submission(
    path: Path, ids: Sequence[str], rles: Sequence[str], header: tuple[str, str] = ("img", "pixels"), exclusive: bool = False
) -> None:
    """Write a submission CSV atomically: a header, then one ``id,rle`` row per id, ``\\n`` line ends.

    Args:
        path: Output file; replaced whole or left as it was.
        ids: Row ids, in the order to write them.
        rles: The RLE of each row; ``""`` (an empty cell) for an empty mask.
        header: The two column names.
        exclusive: Never replace a file (one another process wrote meanwhile): :func:`medseg.files.atomic_write`.

    Raises:
        ValueError: If ``ids`` and ``rles`` differ in length.
        OutputExistsError: With ``exclusive``, if the file exists by the time it is written.
    """
    if len(ids) != len(rles):
        raise ValueError(f"{len(ids)} ids but {len(rles)} RLE strings; give one RLE per id")
    buffer = text_io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(zip(ids, rles))
    with atomic_write(Path(path), "wb", exclusive=exclusive) as stream:
        stream.write(buffer.getvalue().encode("utf-8"))


def check_or_raise(report: SubmissionReport, allow_degenerate: bool, warn: Callable[[str], None]) -> None:
    """Refuse a submission with problems, or with degenerate output unless that is allowed.

    Args:
        report: What :func:`validate` found.
        allow_degenerate: Accept degenerate output, calling ``warn`` once per finding instead.
        warn: Receives one line per degenerate finding when they are allowed.

    Raises:
        SubmissionError: Listing the first few problems and their count, or saying why the output is
            degenerate and that ``--allow-degenerate`` writes it anyway.
    """
    where = f"{report.path}: " if report.path is not None else "submission: "
    if report.problems:
        listing = _first(report.problems, "; ", quote=False)
        raise SubmissionError(f"{where}{len(report.problems)} problem(s): {listing}; fix them and write the submission again")
    if not report.degenerate:
        return
    if not allow_degenerate:
        raise SubmissionError(
            f"{where}degenerate submission: {'; '.join(report.degenerate)}; the model has likely collapsed "
            "(check its training curves and threshold), or pass --allow-degenerate to write it anyway"
        )
    for finding in report.degenerate:
        warn(f"{where}degenerate submission: {finding}; accepted because of --allow-degenerate")


def _read_submission(path: Path) -> tuple[list[str], list[str]]:
    try:
        table = io.read_csv(path, ())
    except SubmissionError:
        raise
    except DataError as error:
        raise SubmissionError(str(error)) from error
    lowered = [column.lower() for column in table.columns]
    mask_column = next((table.columns[i] for i, name in enumerate(lowered) if name in _MASK_COLUMNS), None)
    if mask_column is None:
        raise SubmissionError(
            f"{path}: no mask column (found: {', '.join(table.columns)}); a submission needs columns img,pixels "
            "(or id,rle / ImageId,EncodedPixels)"
        )
    id_column = next((table.columns[i] for i, name in enumerate(lowered) if name in _ID_COLUMNS), None)
    if id_column is None:
        id_column = next((column for column in table.columns if column != mask_column), None)
    if id_column is None:
        raise SubmissionError(f"{path}: no id column (found: {', '.join(table.columns)}); a submission needs columns img,pixels")
    return table[id_column].tolist(), table[mask_column].tolist()


def _size_lookup(sizes: Sizes) -> Callable[[str], Size | None]:
    """A function from id to its frame size (``None`` where unknown), with every size checked once."""
    if sizes is None:
        return lambda _: None
    if isinstance(sizes, Mapping):
        for size in set(map(tuple, sizes.values())):
            rle.check("", size)
        return sizes.get
    rle.check("", sizes)
    size = (int(sizes[0]), int(sizes[1]))
    return lambda _: size


def _id_problems(ids: Sequence[str], sample_ids: Sequence[str] | None) -> list[str]:
    problems = []
    blank = [row for row, sample_id in enumerate(ids, 1) if not str(sample_id).strip()]
    if blank:
        problems.append(f"{len(blank)} row(s) with an empty id (rows {_first(blank)}); every row needs the id of its frame")
    repeated = _repeated(ids)
    if repeated:
        problems.append(f"{len(repeated)} id(s) listed more than once ({_first(repeated)}); keep one row per id")
    if sample_ids is None:
        return problems
    listed, wanted = set(ids), set(sample_ids)
    missing = [sample_id for sample_id in sample_ids if sample_id not in listed]
    if missing:
        problems.append(f"{len(missing)} sample id(s) missing ({_first(missing)}); add a row for each, empty for no mask")
    extra = [sample_id for sample_id in dict.fromkeys(ids) if sample_id not in wanted and str(sample_id).strip()]
    if extra:
        problems.append(f"{len(extra)} id(s) not in the sample submission ({_first(extra)}); drop those rows")
    return problems


def _check_masks(
    ids: Sequence[str], rles: Sequence[str], size_of: Callable[[str], Size | None], dialect: str
) -> tuple[_Masks, list[str], list[str]]:
    """Check every RLE cell; return the normalised runs (``""`` for an empty mask), the problems, and the ids
    checked without a size."""
    masks = _Masks([], [])
    problems, unsized = [], []
    for row, (sample_id, text) in enumerate(zip(ids, rles), 1):
        size = size_of(sample_id)
        try:
            rle.check(text, size or _UNBOUNDED, dialect=dialect)
        except rle.RLEError as error:
            problems.append(f"row {row}, id {sample_id!r}: {error}")
            masks.runs.append(None)
        else:
            runs = " ".join(text.split())
            masks.runs.append("" if runs == rle.SIIM_EMPTY else runs)
        masks.sizes.append(size)
        if size is None:
            unsized.append(sample_id)
    return masks, problems, unsized


def _size_notes(ids: Sequence[str], unsized: list[str], no_sizes: bool) -> list[str]:
    if no_sizes and ids:
        return ["no frame sizes given: RLE bounds were checked only for syntax and run order, not against the frames"]
    if unsized:
        return [f"no frame size for {len(unsized)} id(s) ({_first(unsized)}): their RLE bounds were not checked"]
    return []


def _degenerate(masks: _Masks, train_had_masks: bool | None, notes: list[str]) -> list[str]:
    """Degenerate-output findings of the valid rows; what could not be judged goes to ``notes``."""
    valid = [(runs, size) for runs, size in zip(masks.runs, masks.sizes) if runs is not None]
    if len(valid) < 2:
        notes.append(f"degenerate output not judged: it needs at least 2 rows with valid RLE, found {len(valid)}")
        return []
    filled = [(runs, size) for runs, size in valid if runs]
    if not filled:
        return _all_empty(len(valid), train_had_masks, notes)
    findings = []
    if len(filled) >= 2 and _all_full(filled, notes):
        findings.append(_full_finding(len(filled), len(valid)))
    if len(filled) == len(valid) and len({runs for runs, _ in filled}) == 1:
        findings.append(f"every mask is the same non-empty mask ({len(valid)} rows, {_area(filled[0][0])} pixels each)")
    return findings


def _all_empty(rows: int, train_had_masks: bool | None, notes: list[str]) -> list[str]:
    if train_had_masks:
        return [f"every mask is empty ({rows} rows) while the training data had masks"]
    if train_had_masks is None:
        notes.append(f"every mask is empty ({rows} rows); not judged degenerate because it is unknown whether the training data had masks")
    return []


def _all_full(filled: list[tuple[str, Size | None]], notes: list[str]) -> bool:
    """Whether every non-empty mask covers at least :data:`FULL_FRACTION` of its frame."""
    if any(size is None for _, size in filled):
        notes.append("full-mask check skipped: it needs the frame size of every non-empty mask")
        return False
    return all(_area(runs) >= FULL_FRACTION * size[0] * size[1] for runs, size in filled)


def _full_finding(filled: int, rows: int) -> str:
    share = f"{FULL_FRACTION:.0%}"
    if filled == rows:
        return f"every mask is full or nearly full ({rows} of {rows} cover >= {share} of their frame)"
    return f"every non-empty mask is full or nearly full ({filled} of {rows} cover >= {share} of their frame, the rest are empty)"


def _area(runs: str) -> int:
    """Foreground pixels of a valid, non-empty RLE string."""
    return int(np.fromstring(runs, dtype=np.int64, sep=" ")[1::2].sum())


def _repeated(values: Sequence[str]) -> list[str]:
    return [value for value, count in Counter(values).items() if count > 1]


def _first(items: Sequence, separator: str = ", ", quote: bool = True) -> str:
    """The first few items (text quoted when ``quote``), and how many more there are."""
    shown = separator.join(repr(item) if quote else str(item) for item in items[:_SHOWN])
    return shown + (f"{separator}and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")
