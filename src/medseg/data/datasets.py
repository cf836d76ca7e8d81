"""Data set layouts: find every image, its mask source and its subject.

Three layouts are read (see DESIGN.md):

- ``kaggle``: ``train/{subject}_{n}.tif`` with ``train/{subject}_{n}_mask.tif`` and/or ``train_masks.csv``
  (``subject,img,pixels``); ``test/{n}.tif``; ``sample_submission.csv`` (``img,pixels``).
- ``folders``: ``images/NAME.ext`` with ``masks/NAME.ext`` (or ``masks/NAME_mask.ext``); optional ``test/``;
  the subject from a regular expression on the name.
- ``rle-csv``: ``images/NAME.ext`` plus one CSV of ``id,rle`` (column names configurable); optional ``test/``.
  Its RLE dialect (:mod:`medseg.data.rle`) is told from the cells unless named; in the siim dialect a
  frame may have several rows, OR-ed together.

Loading reads file names, CSV tables and image headers only (and, where ``--mask-value``,
``--mask-threshold`` or the labels of class-index masks are given, mask files until one shows the label is
there). Structural problems (a frame without a mask, a CSV row without a frame, duplicate ids, unexpected
files, ids that cannot be file names, a label no mask holds) are collected in :attr:`Dataset.problems`,
never skipped silently. Names that become paths are checked where they enter: a class (a long table's
class column, a ``masks/<class>/`` folder) must follow :data:`~medseg.files.NAME_RULE`, else loading is
refused; a frame id (a file's name, a CSV row's id) must follow :data:`~medseg.data.io.FRAME_ID_RULE`,
else it is an ``unsafe_name`` problem and the frame or row is left out.

:func:`read_sample` decodes one frame and its mask and raises a :class:`~medseg.errors.FileError` for every
pixel-level problem (unreadable file, a frame above ``data.max_pixels`` or with NaN pixels, size mismatch,
non-binary mask, malformed RLE row, mask file and RLE row that disagree); the inspector collects them.
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from medseg.config import DataOptions
from medseg.data import io, long_rle, rle
from medseg.errors import DataError, FileError, ImageReadError, UsageError
from medseg.files import check_name, shown

KAGGLE_MASKS_CSV = "train_masks.csv"
KAGGLE_SAMPLE_CSV = "sample_submission.csv"
RLE_COLUMN_GUESSES = (("id", "rle"), ("ImageId", "EncodedPixels"), ("img", "pixels"), ("id", "pixels"))
_KAGGLE_NAME = re.compile(r"^(?P<subject>[^_]+)_(?P<n>[^_]+?)(?P<mask>_mask)?$")
_SHOWN_LEVELS = 8


@dataclass(frozen=True)
class Record:
    """One frame and where its mask comes from.

    Attributes:
        id: Sample id as used in submissions (Kaggle: ``{subject}_{n}`` in train, ``{n}`` in test).
        image_path: The frame.
        mask_path: Mask file, if there is one.
        rle: Mask as an RLE string from a CSV row, if there is one (``""`` is the empty mask).
        subject: Subject (patient) id, or ``None`` when unknown.
        size: ``(height, width)`` of the frame from its header, or ``None`` when the header is unreadable.
        rle_source: The CSV file the RLE row comes from.
        class_masks: With several structures in per-class folders, each structure's binary mask file.
        class_rles: With several structures in a long RLE table, each structure's RLE string.
        extra_rles: More RLE rows of the frame, OR-ed with ``rle`` (a siim table lists regions on several rows).
    """

    id: str
    image_path: Path
    mask_path: Path | None = None
    rle: str | None = None
    subject: str | None = None
    size: tuple[int, int] | None = None
    rle_source: Path | None = None
    class_masks: tuple[tuple[str, Path], ...] = ()
    class_rles: tuple[tuple[str, str], ...] = ()
    extra_rles: tuple[str, ...] = ()

    @property
    def has_mask(self) -> bool:
        """Whether a mask file or an RLE row exists for this frame."""
        return self.mask_path is not None or self.rle is not None or bool(self.class_masks) or bool(self.class_rles)


@dataclass(frozen=True)
class Problem:
    """Something wrong with a data set, tied to the file where it is.

    Attributes:
        kind: Short machine-readable name, e.g. ``missing_mask``.
        path: The file (or folder) that has the problem.
        message: What is wrong and how to fix it.
    """

    kind: str
    path: Path
    message: str


@dataclass
class Dataset:
    """A data set as found on disk.

    Attributes:
        root: The data folder.
        layout: The layout it was read as.
        options: The options it was read with, its RLE dialect (``rle_format``) named.
        train: Labelled frames.
        test: Unlabelled frames (may be empty).
        sample_submission: Path of the sample submission, if any.
        sample_ids: Ids of the sample submission, in its order.
        problems: Structural problems found while loading.
        classes: The structures of a data set with several per frame, in channel order; ``()`` for one.
    """

    root: Path
    layout: str
    options: DataOptions
    train: list[Record]
    test: list[Record] = field(default_factory=list)
    sample_submission: Path | None = None
    sample_ids: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    classes: tuple[str, ...] = ()


def load_dataset(root: Path, options: DataOptions | None = None) -> Dataset:
    """Find the records of a data folder.

    Args:
        root: The data folder.
        options: How to read it; defaults detect everything.

    Returns:
        The data set with its structural problems.

    Raises:
        UsageError: If the folder does not exist, is empty, has no recognisable layout, a named option
            (layout, CSV, subject pattern) does not fit it, or a class (a long table's class, a
            ``masks/<class>/`` folder) cannot become a file name.
        DataError: If a CSV table of the data set cannot be read, names a column twice or lacks its columns.
    """
    root = Path(root)
    options = options or DataOptions()
    layout = options.layout or detect_layout(root)
    loader = {"kaggle": _load_kaggle, "folders": _load_folders, "rle-csv": _load_rle_csv}[layout]
    dataset = loader(root, options)
    dataset.problems[:0] = label_problems(dataset)
    if dataset.options.rle_format is None:
        dataset.options = dataset.options.model_copy(update={"rle_format": options.dialect})
    if not dataset.train:
        raise DataError(f"{root}: no labelled images found for the {layout} layout; check the folder or --layout")
    return dataset


def label_problems(dataset: Dataset) -> list[Problem]:
    """The labels the options name that no mask file holds, as problems of the masks' folder.

    ``--mask-value V`` (one structure) and each label of class-index ``--classes NAME=V`` must be held by
    at least one mask file (some masks may well be empty); ``--mask-threshold T`` must leave at least one
    mask non-empty where the masks have values above 0. Mask files are read in order until every label
    is found, so usually a few; all of them only where a label is missing. Unreadable masks are skipped
    (the inspector lists them).
    """
    options = dataset.options
    wanted = _wanted_labels(dataset)
    paths = [record.mask_path for record in dataset.train if record.mask_path is not None and not record.class_masks]
    if not paths or (not wanted and options.mask_threshold is None):
        return []
    missing, levels = _scan_levels(paths, set(wanted.values()), options.mask_threshold, options.max_pixels)
    if levels is None:
        return []
    folder, held = paths[0].parent, _levels_text(levels)
    problems = [_absent_label(folder, name, value, held) for name, value in wanted.items() if value in missing]
    top = levels.max()
    if options.mask_threshold is not None and 0 < top <= options.mask_threshold:
        message = (
            f"every mask is empty above --mask-threshold {options.mask_threshold} (the highest mask value is {top:g}); "
            f"use a threshold below {top:g}"
        )
        problems.append(Problem("empty_after_threshold", folder, message))
    return problems


def _absent_label(folder: Path, name: str | None, value: int, held: str) -> Problem:
    """The problem of a mask value no mask holds: ``--mask-value``'s (``name`` ``None``) or a class-index class's."""
    if name is None:
        named, fix = f"(--mask-value {value})", "pick one of those with --mask-value"
    else:
        named, fix = f"of class {name} (--classes {name}={value})", f"fix the label of {name}"
    return Problem("absent_label", folder, f"no mask holds the value {value} {named}; the masks hold {held}; {fix}")


def _wanted_labels(dataset: Dataset) -> dict[str | None, int]:
    """The mask values the options name, by structure (``None`` for ``--mask-value``'s one structure)."""
    options = dataset.options
    if options.mask_value is not None:
        return {None: options.mask_value}
    if options.classes is not None and dataset.layout == "folders":
        return {name: label for name, label in options.classes.items() if isinstance(label, int)}
    return {}


def _scan_levels(paths: list[Path], wanted: set[int], threshold: int | None, max_pixels: int) -> tuple[set[int], np.ndarray | None]:
    """Read mask files until every wanted value is found (and one is above ``threshold``, if given).

    Returns:
        The wanted values no mask read holds, and the distinct values of the masks read (``None`` if none could be).
    """
    missing, levels = set(wanted), None
    for path in paths:
        try:
            found = _levels(io.read_mask_values(path, max_pixels=max_pixels))
        except ImageReadError:
            continue
        levels = found if levels is None else np.union1d(levels, found)
        missing.difference_update(found.tolist())
        if not missing and (threshold is None or levels.max() > threshold):
            break
    return missing, levels


def _levels(values: np.ndarray) -> np.ndarray:
    """The distinct values of a mask, sorted (counted in one pass for 8- and 16-bit masks)."""
    if values.dtype == np.bool_:
        values = values.view(np.uint8)
    if values.dtype in (np.uint8, np.uint16):
        return np.flatnonzero(np.bincount(values.ravel()))
    return np.unique(values)


def _levels_text(levels: np.ndarray) -> str:
    """The first few values of a sorted array, and how many more there are."""
    shown = ", ".join(f"{value:g}" for value in levels[:_SHOWN_LEVELS].tolist())
    if levels.size == 1:
        return f"only {shown}"
    more = levels.size - _SHOWN_LEVELS
    return f"{shown} and {more} more" if more > 0 else shown


def require_clean(dataset: Dataset) -> Dataset:
    """Return the data set if loading found no structural problem.

    Raises:
        DataError: Counting the problems, showing the first and pointing at ``medseg inspect``.
    """
    if dataset.problems:
        first = dataset.problems[0]
        raise DataError(
            f"{dataset.root}: {len(dataset.problems)} problem(s) in the data set, first: {first.path}: {first.message}; "
            f"`medseg inspect {dataset.root}` lists them all"
        )
    return dataset


def detect_layout(root: Path) -> str:
    """Tell the layout of a data folder from what it contains.

    Raises:
        UsageError: If the folder is missing, empty or matches no layout.
    """
    root = Path(root)
    if not root.exists():
        raise UsageError(f"{root}: folder does not exist; check the path")
    if not root.is_dir():
        raise UsageError(f"{root}: not a folder; DATA is the folder that holds the images")
    if not any(root.iterdir()):
        raise UsageError(f"{root}: folder is empty; put the images (and masks or an RLE CSV) in it")
    if (root / "train").is_dir():
        return "kaggle"
    if (root / "images").is_dir() and (root / "masks").is_dir():
        return "folders"
    if (root / "images").is_dir() and any(root.glob("*.csv")):
        return "rle-csv"
    raise UsageError(
        f"{root}: cannot tell the layout; expected train/ (kaggle), images/ + masks/ (folders) "
        "or images/ + an RLE CSV (rle-csv); or name it with --layout"
    )


def read_sample(record: Record, options: DataOptions) -> tuple[np.ndarray, np.ndarray]:
    """Decode a labelled frame and its mask, checked against each other.

    Args:
        record: A labelled record.
        options: Mask value, threshold and RLE dialect.

    Returns:
        The gray frame (``uint8``) and its boolean mask.

    Raises:
        FileError: Naming the file and the problem (its ``kind`` is the inspector's problem name).

    Shape:
        Returns: (H, W) and (H, W).
    """
    image = io.read_image(record.image_path, options.intensity_window, max_pixels=options.max_pixels)
    if is_multi_structure(record, options):
        return image, structure_masks(record, options, image.shape)
    return image, mask_of(record, options, image.shape)


def is_multi_structure(record: Record, options: DataOptions) -> bool:
    """Whether a record holds several structures (class-index masks with ``classes``, per-class folders, a long table)."""
    return options.classes is not None or bool(record.class_masks) or bool(record.class_rles)


def structure_names(record: Record, options: DataOptions) -> list[str]:
    """The structures of a multi-structure record, in channel order."""
    if record.class_masks:
        return [name for name, _ in record.class_masks]
    if record.class_rles:
        return [name for name, _ in record.class_rles]
    return list(options.classes or {})


def structure_masks(record: Record, options: DataOptions, shape: tuple[int, int] | None = None) -> np.ndarray:
    """One boolean mask per structure of a record, from its class-index mask, per-class files or long-table rows.

    Args:
        record: A labelled record with several structures (:func:`is_multi_structure`).
        options: The classes, the mask threshold and the RLE order.
        shape: ``(height, width)`` of the decoded frame, when known; every mask must have it.

    Raises:
        FileError: As :func:`mask_of`, naming the structure.

    Shape:
        Returns: (C, H, W), channels in :func:`structure_names` order.
    """
    if not record.has_mask:
        raise FileError(record.image_path, f"no mask file or RLE row for id {record.id}; add one or remove the frame", "missing_mask")
    if record.class_rles:
        shape = shape or record.size or io.image_size(record.image_path, max_pixels=options.max_pixels)
        return np.stack([_decode_row(record, name, text, shape, options) for name, text in record.class_rles])
    if record.class_masks:
        single = options.model_copy(update={"classes": None})
        return np.stack([_mask_file(replace(record, mask_path=path), single, shape) for _, path in record.class_masks])
    values = _mask_values(record, shape, options.max_pixels)
    return np.stack([values == int(value) for value in (options.classes or {}).values()])


def _decode_row(record: Record, name: str, text: str, shape: tuple[int, int], options: DataOptions) -> np.ndarray:
    try:
        return rle.decode(text, shape, dialect=options.dialect)
    except rle.RLEError as error:
        raise FileError(
            record.rle_source or record.image_path,
            f"row of id {record.id}, class {name}: {error}; fix or regenerate this row",
            "malformed_rle",
        ) from error


def mask_of(record: Record, options: DataOptions, shape: tuple[int, int] | None = None) -> np.ndarray:
    """The boolean mask of a record, from its mask file and/or RLE row.

    Args:
        record: A labelled record.
        options: Mask value, threshold and RLE dialect.
        shape: ``(height, width)`` of the decoded frame, when known; the mask must have it.

    Returns:
        The mask (the union of its RLE rows).

    Raises:
        FileError: If the record has no mask (``missing_mask``), the mask file is unreadable
            (``unreadable_mask``), of another size than the frame (``size_mismatch``) or not binary
            (``non_binary_mask``), the RLE row is malformed (``malformed_rle``), or the mask file and the
            RLE row disagree (``mask_csv_disagree``).

    Shape:
        Returns: (H, W).
    """
    if not record.has_mask:
        raise FileError(record.image_path, f"no mask file or RLE row for id {record.id}; add one or remove the frame", "missing_mask")
    if is_multi_structure(record, options):
        raise ValueError(f"{record.id} holds several structures; read them with structure_masks")
    from_file = _mask_file(record, options, shape) if record.mask_path is not None else None
    if record.rle is None:
        return from_file
    shape = shape or (from_file.shape if from_file is not None else None) or record.size
    shape = shape or io.image_size(record.image_path, max_pixels=options.max_pixels)
    try:
        from_rle = rle.decode_union((record.rle, *record.extra_rles), shape, dialect=options.dialect)
    except rle.RLEError as error:
        raise FileError(
            record.rle_source or record.image_path, f"row of id {record.id}: {error}; fix or regenerate this row", "malformed_rle"
        ) from error
    if from_file is not None and not np.array_equal(from_file, from_rle):
        differ = int(np.count_nonzero(from_file ^ from_rle))
        raise FileError(
            record.mask_path,
            f"mask file and RLE row of id {record.id} disagree ({differ} pixels differ); keep one source or fix the other",
            "mask_csv_disagree",
        )
    return from_rle


def _mask_values(record: Record, shape: tuple[int, int] | None, max_pixels: int = io.DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The pixel values of a record's mask file, checked against the frame's size."""
    try:
        values = io.read_mask_values(record.mask_path, max_pixels=max_pixels)
    except ImageReadError as error:
        raise FileError(error.path, error.reason, "unreadable_mask") from error
    if shape is not None and values.shape != tuple(shape):
        raise FileError(
            record.mask_path,
            f"mask is {size_text(values.shape)} but its frame is {size_text(shape)}; save the mask at the frame's size",
            "size_mismatch",
        )
    return values


def _mask_file(record: Record, options: DataOptions, shape: tuple[int, int] | None) -> np.ndarray:
    values = _mask_values(record, shape, options.max_pixels)
    if options.mask_value is None and options.mask_threshold is None and not io.is_binary_mask(values):
        levels = np.unique(values)
        shown = ", ".join(map(str, levels[:6])) + (", ..." if levels.size > 6 else "")
        raise FileError(
            record.mask_path,
            f"mask has {levels.size} levels ({shown}), not 0 and one foreground value; "
            "pick a class with --mask-value V, or binarise anti-aliased masks with --mask-threshold 127",
            "non_binary_mask",
        )
    return io.binarize_mask(values, value=options.mask_value, threshold=options.mask_threshold)


def size_text(shape: tuple[int, ...]) -> str:
    """``WxH`` of an array shape ``(H, W, ...)``, as image sizes are usually written."""
    return f"{shape[1]}x{shape[0]}"


def subject_matcher(pattern: str | None):
    """Compile a subject pattern into a function from id to subject (``None`` when it does not match).

    Raises:
        UsageError: If the pattern is not a valid regular expression.
    """
    if pattern is None:
        return lambda sample_id: None
    try:
        compiled = re.compile(pattern)
    except re.error as error:
        raise UsageError(f"--subject-pattern {pattern!r} is not a valid regular expression: {error}") from error

    def subject(sample_id: str) -> str | None:
        match = compiled.search(sample_id)
        if match is None:
            return None
        if "subject" in compiled.groupindex:
            return match.group("subject")
        return match.group(1) if compiled.groups else match.group(0)

    return subject


def _natural_key(text: str) -> tuple:
    """``frame2`` before ``frame10``: runs of ASCII digits compare as numbers (``¹`` or ``٣`` stay text)."""
    return tuple((0, int(part), "") if part.isascii() and part.isdigit() else (1, 0, part) for part in re.split(r"([0-9]+)", text) if part)


def _list_files(folder: Path, problems: list[Problem]) -> list[Path]:
    """Image files of a folder; other files (except hidden ones) become problems."""
    images = []
    for path in sorted(folder.iterdir(), key=lambda p: _natural_key(p.name)):
        if path.name.startswith("."):
            continue
        if path.is_file() and io.is_image_file(path):
            images.append(path)
        else:
            problems.append(Problem("unexpected_file", path, _unexpected_file_message(path, folder)))
    return images


def _unexpected_file_message(path: Path, folder: Path) -> str:
    """Why a folder entry is not taken as a frame, and the fix."""
    if path.is_symlink() and not path.exists():
        return f"broken link to {path.readlink()}; restore its target or remove the link from {folder.name}/"
    return f"not an image file ({', '.join(io.IMAGE_SUFFIXES)}); move it out of {folder.name}/"


def _header_size(path: Path, max_pixels: int) -> tuple[int, int] | None:
    try:
        return io.image_size(path, max_pixels=max_pixels)
    except ImageReadError:
        return None


def _index_by_id(paths: list[Path], id_of, problems: list[Problem], what: str) -> dict[str, Path]:
    """Map ids to paths, reporting ids found twice."""
    found: dict[str, Path] = {}
    for path in paths:
        sample_id = id_of(path)
        if not io.is_frame_id(sample_id):
            rule = f"cannot be a frame id ({io.FRAME_ID_RULE}); rename the file"
            problems.append(Problem("unsafe_name", path, f"{what} id {shown(sample_id)} {rule}"))
            continue
        if sample_id in found:
            problems.append(
                Problem("duplicate_id", path, f"{what} id {sample_id} also used by {found[sample_id].name}; keep one file per id")
            )
            continue
        found[sample_id] = path
    return found


def _rle_rows(csv_path: Path, ids: list[str], rles: list[str], problems: list[Problem]) -> dict[str, str]:
    """Map CSV ids to RLE strings, reporting duplicate ids (row numbers count the header as row 1)."""
    rows: dict[str, str] = {}
    first_row: dict[str, int] = {}
    for number, (sample_id, text) in enumerate(zip(ids, rles), start=2):
        if not _safe_row_id(csv_path, number, sample_id, problems):
            continue
        if sample_id in rows:
            problems.append(
                Problem(
                    "duplicate_id", csv_path, f"row {number}: id {sample_id} already on row {first_row[sample_id]}; keep one row per id"
                )
            )
            continue
        rows[sample_id] = text
        first_row[sample_id] = number
    return rows


def _safe_row_id(csv_path: Path, number: int, sample_id: str, problems: list[Problem]) -> bool:
    """Whether a CSV row's id may be a frame id (:data:`~medseg.data.io.FRAME_ID_RULE`); if not, an ``unsafe_name`` problem."""
    if io.is_frame_id(sample_id):
        return True
    reason = "is empty" if not sample_id else f"{shown(sample_id)} cannot be a frame id ({io.FRAME_ID_RULE})"
    problems.append(Problem("unsafe_name", csv_path, f"row {number}: the id {reason}; fix the id or drop the row"))
    return False


def image_records(folder: Path, max_pixels: int = io.DEFAULT_MAX_PIXELS) -> tuple[list[Record], list[Problem]]:
    """Unlabelled records of every image in a folder (id = file stem), and what else the folder holds.

    Args:
        folder: The folder.
        max_pixels: The pixel limit of the frames' headers (``data.max_pixels``); a larger frame has no size.

    Returns:
        The records in natural order of their names, and problems: non-image files, ids found twice, names
        that cannot be frame ids (those files are not records).
    """
    problems: list[Problem] = []
    return _test_records(Path(folder), problems, max_pixels), problems


def _test_records(folder: Path, problems: list[Problem], max_pixels: int = io.DEFAULT_MAX_PIXELS) -> list[Record]:
    if not folder.is_dir():
        return []
    paths = _index_by_id(_list_files(folder, problems), io.frame_id, problems, "image")
    return [Record(id=sample_id, image_path=path, size=_header_size(path, max_pixels)) for sample_id, path in paths.items()]


def _load_kaggle(root: Path, options: DataOptions) -> Dataset:
    if options.classes is not None:
        raise UsageError(
            f"{root}: the kaggle layout has one structure per frame; --classes is for class-index masks (folders), "
            "masks/<class>/ folders or a long RLE table (id,class,rle)"
        )
    problems: list[Problem] = []
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DataError(f"{root}: no train/ folder; the kaggle layout needs train/{{subject}}_{{n}}.tif")
    images, masks = _split_kaggle_names(_list_files(train_dir, problems), problems)
    rows = _kaggle_csv_rows(root / KAGGLE_MASKS_CSV, problems)
    records = []
    for sample_id, path in images.items():
        subject = _KAGGLE_NAME.match(sample_id).group("subject")
        record = Record(
            sample_id,
            path,
            masks.get(sample_id),
            rows.get(sample_id),
            subject,
            _header_size(path, options.max_pixels),
            root / KAGGLE_MASKS_CSV,
        )
        if not record.has_mask:
            problems.append(
                Problem("missing_mask", path, f"no {sample_id}_mask{path.suffix} and no row in {KAGGLE_MASKS_CSV}; add the mask")
            )
        records.append(record)
    for sample_id, path in masks.items():
        if sample_id not in images:
            problems.append(
                Problem("missing_image", path, f"mask without its frame train/{sample_id}.tif; add the frame or remove the mask")
            )
    for sample_id in rows:
        if sample_id not in images:
            problems.append(
                Problem(
                    "missing_image", root / KAGGLE_MASKS_CSV, f"id {sample_id} has no frame train/{sample_id}.tif; add it or drop the row"
                )
            )
    test = _test_records(root / "test", problems, options.max_pixels)
    sample_path = root / KAGGLE_SAMPLE_CSV
    sample_ids = _sample_ids(sample_path, test, problems) if sample_path.exists() else []
    return Dataset(root, "kaggle", options, records, test, sample_path if sample_path.exists() else None, sample_ids, problems)


def _split_kaggle_names(paths: list[Path], problems: list[Problem]) -> tuple[dict[str, Path], dict[str, Path]]:
    images, masks = [], []
    for path in paths:
        match = _KAGGLE_NAME.match(path.stem)
        if match is None:
            problems.append(Problem("unexpected_file", path, "name is not {subject}_{n}.tif or {subject}_{n}_mask.tif; rename or move it"))
        else:
            (masks if match.group("mask") else images).append(path)
    image_ids = _index_by_id(images, io.frame_id, problems, "image")
    mask_ids = _index_by_id(masks, lambda path: path.stem[: -len("_mask")], problems, "mask")
    return image_ids, mask_ids


def _kaggle_csv_rows(csv_path: Path, problems: list[Problem]) -> dict[str, str]:
    if not csv_path.exists():
        return {}
    table = io.read_csv(csv_path, ("subject", "img", "pixels"))
    ids = [f"{subject.strip()}_{img.strip()}" for subject, img in zip(table["subject"], table["img"])]
    return _rle_rows(csv_path, ids, list(table["pixels"]), problems)


def _sample_ids(sample_path: Path, test: list[Record], problems: list[Problem]) -> list[str]:
    table = io.read_csv(sample_path, ("img", "pixels"))
    rows = enumerate((value.strip() for value in table["img"]), start=2)
    ids = [sample_id for number, sample_id in rows if _safe_row_id(sample_path, number, sample_id, problems)]
    for sample_id, count in Counter(ids).items():
        if count > 1:
            problems.append(Problem("duplicate_id", sample_path, f"id {sample_id} is listed {count} times; keep one row per id"))
    test_ids = {record.id for record in test}
    for sample_id in dict.fromkeys(ids):
        if sample_id not in test_ids:
            problems.append(Problem("missing_image", sample_path, f"id {sample_id} has no frame in test/; add it or drop the row"))
    listed = set(ids)
    for record in test:
        if record.id not in listed:
            problems.append(
                Problem("unlisted_test_image", record.image_path, f"test frame {record.id} is not in {sample_path.name}; add a row for it")
            )
    return ids


def _load_folders(root: Path, options: DataOptions) -> Dataset:
    problems: list[Problem] = []
    for name in ("images", "masks"):
        if not (root / name).is_dir():
            raise DataError(f"{root}: no {name}/ folder; the folders layout needs images/NAME.ext and masks/NAME.ext")
    class_dirs = sorted(
        (path for path in (root / "masks").iterdir() if path.is_dir() and not path.name.startswith(".")), key=lambda p: _natural_key(p.name)
    )
    if class_dirs:
        for path in class_dirs:
            check_name(path.name, "class folder", root / "masks")
        return _load_class_folders(root, options, class_dirs)
    subject_of = subject_matcher(options.subject_pattern)
    images = _index_by_id(_list_files(root / "images", problems), io.frame_id, problems, "image")
    masks = _index_by_id(_list_files(root / "masks", problems), _folder_mask_id, problems, "mask")
    records = []
    for sample_id, path in images.items():
        record = Record(
            sample_id,
            path,
            masks.get(sample_id),
            None,
            _subject(sample_id, path, subject_of, options, problems),
            _header_size(path, options.max_pixels),
        )
        if not record.has_mask:
            problems.append(Problem("missing_mask", path, f"no mask masks/{sample_id}.* for this image; add it"))
        records.append(record)
    for sample_id, path in masks.items():
        if sample_id not in images:
            problems.append(Problem("missing_image", path, f"mask without an image images/{sample_id}.*; add the image or remove the mask"))
    classes = tuple(options.classes or ())
    for name, label in (options.classes or {}).items():
        if not isinstance(label, int):
            raise UsageError(
                f"{root / 'masks'}: class-index masks name each class by its mask value, not {label!r}; write e.g. --classes {name}=2"
            )
    return Dataset(
        root, "folders", options, records, _test_records(root / "test", problems, options.max_pixels), problems=problems, classes=classes
    )


def _load_class_folders(root: Path, options: DataOptions, class_dirs: list[Path]) -> Dataset:
    """The folders layout with one mask folder per structure: ``masks/<class>/NAME.ext``."""
    problems: list[Problem] = []
    wanted = _wanted_classes(options, [path.name for path in class_dirs], root / "masks")
    subject_of = subject_matcher(options.subject_pattern)
    images = _index_by_id(_list_files(root / "images", problems), io.frame_id, problems, "image")
    per_class = {
        name: _index_by_id(_list_files(root / "masks" / label, problems), _folder_mask_id, problems, f"{name} mask")
        for name, label in wanted.items()
    }
    records = []
    for sample_id, path in images.items():
        missing = [name for name in wanted if sample_id not in per_class[name]]
        for name in missing:
            problems.append(
                Problem(
                    "missing_mask", path, f"no mask masks/{wanted[name]}/{sample_id}.* for this image; add it (all zeros is an empty mask)"
                )
            )
        found = () if missing else tuple((name, per_class[name][sample_id]) for name in wanted)
        subject = _subject(sample_id, path, subject_of, options, problems)
        records.append(Record(sample_id, path, subject=subject, size=_header_size(path, options.max_pixels), class_masks=found))
    for name, masks in per_class.items():
        for sample_id, path in masks.items():
            if sample_id not in images:
                problems.append(
                    Problem("missing_image", path, f"{name} mask without an image images/{sample_id}.*; add the image or remove the mask")
                )
    test = _test_records(root / "test", problems, options.max_pixels)
    return Dataset(root, "folders", options, records, test, problems=problems, classes=tuple(wanted))


def _wanted_classes(options: DataOptions, found: list[str], where: Path) -> dict[str, str]:
    """Each structure's name and its label in the data: all labels found, or those ``--classes`` names.

    Raises:
        UsageError: If ``--classes`` names a label the data does not have.
    """
    if options.classes is None:
        return {label: label for label in found}
    for name, label in options.classes.items():
        check_name(name, "class", "--classes")
        if str(label) not in found:
            raise UsageError(f"{where}: no class {str(label)!r} (--classes {name}={label}); the data has {', '.join(found)}")
    return {name: str(label) for name, label in options.classes.items()}


def _folder_mask_id(path: Path) -> str:
    return path.stem.removesuffix("_mask")


def _subject(sample_id: str, path: Path, subject_of, options: DataOptions, problems: list[Problem]) -> str | None:
    subject = subject_of(sample_id)
    if subject is None and options.subject_pattern is not None:
        problems.append(
            Problem(
                "no_subject",
                path,
                f"id {sample_id} does not match --subject-pattern {options.subject_pattern!r}; fix the pattern or the name",
            )
        )
    return subject


def _load_rle_csv(root: Path, options: DataOptions) -> Dataset:
    problems: list[Problem] = []
    if not (root / "images").is_dir():
        raise DataError(f"{root}: no images/ folder; the rle-csv layout needs images/NAME.ext and a CSV of id,rle")
    csv_path = _find_rle_csv(root, options)
    table = io.read_csv(csv_path, ())
    dialect = long_rle.detect_format(list(table.columns), options.id_column, options.class_column, options.rle_column, csv_path)
    if dialect is not None:
        return _load_long_table(root, options, csv_path, dialect)
    if options.classes is not None:
        raise UsageError(f"{csv_path}: --classes needs a class column (id,class,rle); name it with --class-column")
    id_column, rle_column = _rle_columns(csv_path, list(table.columns), options)
    io.require_columns(table, csv_path, (id_column, rle_column))
    ids = [_strip_image_suffix(value.strip()) for value in table[id_column]]
    cells = list(table[rle_column])
    listing: list[Problem] = []
    images = _index_by_id(_list_files(root / "images", listing), io.frame_id, listing, "image")
    sizes = {sample_id: _header_size(path, options.max_pixels) for sample_id, path in images.items()}
    dialect = options.named_dialect or _told_dialect(csv_path, ids, cells, sizes)
    if dialect == "siim":
        rows = _grouped_rows(csv_path, ids, cells, problems)
    else:
        rows = {i: (text,) for i, text in _rle_rows(csv_path, ids, cells, problems).items()}
    problems += listing
    subject_of = subject_matcher(options.subject_pattern)
    records = []
    for sample_id, path in images.items():
        first, *more = rows.get(sample_id, (None,))
        record = Record(
            sample_id,
            path,
            None,
            first,
            _subject(sample_id, path, subject_of, options, problems),
            sizes[sample_id],
            csv_path,
            extra_rles=tuple(more),
        )
        if not record.has_mask:
            problems.append(
                Problem("missing_mask", path, f"no row for id {sample_id} in {csv_path.name}; add one (an empty RLE is an empty mask)")
            )
        records.append(record)
    for sample_id in rows:
        if sample_id not in images:
            problems.append(Problem("missing_image", csv_path, f"id {sample_id} has no image in images/; add it or drop the row"))
    read_as = options.model_copy(update={"rle_format": dialect})
    return Dataset(root, "rle-csv", read_as, records, _test_records(root / "test", problems, options.max_pixels), problems=problems)


def _told_dialect(csv_path: Path, ids: list[str], cells: list[str], sizes: dict[str, tuple[int, int] | None]) -> str:
    """The RLE dialect of a table's cells (frame sizes bound them where known).

    Raises:
        UsageError: If the cells do not tell it or contradict each other, naming ``--rle-format``.
    """
    siim_header = written_header(csv_path) == rle.SIIM_HEADER
    guess = rle.guess_dialect(cells, [sizes.get(i) for i in ids], siim_header=siim_header, first_row=2)
    if guess.dialect is None:
        raise UsageError(f"{csv_path}: cannot tell the RLE dialect: {guess.reason}; name it with --rle-format kaggle, row-major or siim")
    return guess.dialect


def _grouped_rows(csv_path: Path, ids: list[str], cells: list[str], problems: list[Problem]) -> dict[str, tuple[str, ...]]:
    """Every RLE row of each id, in file order (a siim table's rows of one frame are OR-ed); unsafe ids are problems."""
    rows: dict[str, list[str]] = {}
    for number, (sample_id, text) in enumerate(zip(ids, cells, strict=True), start=2):
        if _safe_row_id(csv_path, number, sample_id, problems):
            rows.setdefault(sample_id, []).append(text)
    return {sample_id: tuple(texts) for sample_id, texts in rows.items()}


def written_header(path: Path) -> tuple[str, ...]:
    """A CSV file's header names as written, spaces kept (``io.read_csv`` strips them); ``()`` if unreadable."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            return tuple(next(csv.reader(handle), ()))
    except (OSError, UnicodeDecodeError, csv.Error):
        return ()


def _load_long_table(root: Path, options: DataOptions, csv_path: Path, dialect: long_rle.LongFormat) -> Dataset:
    """The rle-csv layout with a long table: one row per frame and structure (:mod:`medseg.data.long_rle`)."""
    problems: list[Problem] = []
    table = long_rle.read_long_table(csv_path, dialect)
    for number, sample_id in table.unsafe:
        _safe_row_id(csv_path, number, sample_id, problems)
    for number, sample_id, label, first in table.duplicates:
        problems.append(
            Problem(
                "duplicate_id",
                csv_path,
                f"row {number}: id {sample_id}, class {label} already on row {first}; keep one row per id and class",
            )
        )
    wanted = _wanted_classes(options, table.labels, csv_path)
    subject_of = subject_matcher(options.subject_pattern)
    images = _index_by_id(_list_files(root / "images", problems), io.frame_id, problems, "image")
    records = []
    for sample_id, path in images.items():
        found, missing = table.masks_of(sample_id, wanted.values())
        for label in missing:
            problems.append(
                Problem(
                    "missing_mask",
                    path,
                    f"no row for id {sample_id}, class {label} in {csv_path.name}; add one (an empty RLE is an empty mask)",
                )
            )
        rles = () if missing else tuple((name, found[label]) for name, label in wanted.items())
        subject = _subject(sample_id, path, subject_of, options, problems)
        records.append(
            Record(sample_id, path, subject=subject, size=_header_size(path, options.max_pixels), rle_source=csv_path, class_rles=rles)
        )
    for sample_id in table.rows:
        if sample_id not in images:
            problems.append(Problem("missing_image", csv_path, f"id {sample_id} has no image in images/; add it or drop its rows"))
    test = _test_records(root / "test", problems, options.max_pixels)
    return Dataset(root, "rle-csv", options, records, test, problems=problems, classes=tuple(wanted))


def _find_rle_csv(root: Path, options: DataOptions) -> Path:
    if options.csv is not None:
        path = Path(options.csv) if Path(options.csv).is_absolute() else root / options.csv
        if not path.is_file():
            raise UsageError(f"{path}: RLE table not found; check --csv")
        return path
    tables = sorted(root.glob("*.csv"))
    if len(tables) != 1:
        found = ", ".join(path.name for path in tables) or "none"
        raise UsageError(f"{root}: expected one RLE CSV, found {found}; name it with --csv")
    return tables[0]


def _rle_columns(csv_path: Path, header: list[str], options: DataOptions) -> tuple[str, str]:
    if options.id_column and options.rle_column:
        return options.id_column, options.rle_column
    for id_column, rle_column in RLE_COLUMN_GUESSES:
        if (options.id_column or id_column) in header and (options.rle_column or rle_column) in header:
            return options.id_column or id_column, options.rle_column or rle_column
    raise DataError(f"{csv_path}: no id and RLE columns among {', '.join(header)}; name them with --id-column and --rle-column")


def _strip_image_suffix(sample_id: str) -> str:
    """An id without its image suffix; one that is no frame id (``../x.png``) as written, to be refused as such."""
    path = Path(sample_id)
    return path.stem if io.has_image_suffix(path) and io.is_frame_id(sample_id) else sample_id


def sample_data_path() -> Path:
    """The bundled sample data set (Kaggle layout, CC-BY 4.0, see its README)."""
    return Path(__file__).parents[1] / "sample_data" / "uns-sample"
