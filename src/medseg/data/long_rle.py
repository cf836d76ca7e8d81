"""Long RLE tables: one row per frame and structure, as the multi-structure competitions ship their masks.

Three dialects are recognised by their header (or named with ``--id-column``, ``--class-column`` and
``--rle-column``):

- ``medseg``: ``id,class,rle``; every (frame, class) has a row (an empty RLE is an empty mask).
- ``uw-madison`` (Kaggle UW-Madison GI Tract): ``id,class,segmentation``; every (slice, class) has a row.
- ``severstal`` (Kaggle Severstal steel defects): ``ImageId,ClassId,EncodedPixels``; only the (image, class)
  pairs with a defect are listed, so a missing row is an empty mask.

Where a dialect lists every pair, a missing (frame, class) row is a problem, never silently an empty
mask. A class label becomes a folder name (``predict --masks-dir``) and must follow
:data:`~medseg.files.NAME_RULE`; a frame id must follow :data:`~medseg.data.io.FRAME_ID_RULE`, else its row
is set aside as unsafe (the loader lists it). This module owns the format: reading a table into per-frame,
per-class RLE strings and writing one (training tables and long submissions alike).
"""

from __future__ import annotations

import csv
import io as text_io
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from medseg.data import io
from medseg.errors import DataError
from medseg.files import atomic_write, check_name


@dataclass(frozen=True)
class LongFormat:
    """One dialect of long RLE table.

    Attributes:
        name: The dialect's name.
        id_column: Column of the frame id.
        class_column: Column of the structure's label.
        rle_column: Column of the RLE string.
        missing_is_empty: Whether a (frame, class) without a row is an empty mask (else it is a problem).
    """

    name: str
    id_column: str
    class_column: str
    rle_column: str
    missing_is_empty: bool


LONG_FORMATS = (
    LongFormat("medseg", "id", "class", "rle", missing_is_empty=False),
    LongFormat("uw-madison", "id", "class", "segmentation", missing_is_empty=False),
    LongFormat("severstal", "ImageId", "ClassId", "EncodedPixels", missing_is_empty=True),
)


@dataclass
class LongTable:
    """A long RLE table, read.

    Attributes:
        path: The CSV file.
        format: Its dialect.
        labels: The class labels it holds, in order of first appearance.
        rows: RLE string by frame id, then by class label.
        row_numbers: The row (counting the header as row 1) of each (id, label).
        duplicates: ``(row, id, label, first row)`` of every pair listed twice (the first row is kept).
        unsafe: ``(row, id)`` of every row whose id cannot be a frame id (the row is not read).
    """

    path: Path
    format: LongFormat
    labels: list[str] = field(default_factory=list)
    rows: dict[str, dict[str, str]] = field(default_factory=dict)
    row_numbers: dict[tuple[str, str], int] = field(default_factory=dict)
    duplicates: list[tuple[int, str, str, int]] = field(default_factory=list)
    unsafe: list[tuple[int, str]] = field(default_factory=list)

    def masks_of(self, sample_id: str, labels: Iterable[str]) -> tuple[dict[str, str], list[str]]:
        """The RLE string of each wanted label of one frame, and the labels that have no row.

        A label without a row is the empty mask where the dialect says so (and then not listed as missing).
        """
        listed = self.rows.get(sample_id, {})
        found, missing = {}, []
        for label in labels:
            if label in listed:
                found[label] = listed[label]
            elif self.format.missing_is_empty:
                found[label] = ""
            else:
                missing.append(label)
        return found, missing


def detect_format(
    header: list[str],
    id_column: str | None = None,
    class_column: str | None = None,
    rle_column: str | None = None,
    path: Path | None = None,
) -> LongFormat | None:
    """The dialect of a table's header, or ``None`` when it has no class column (a table of one structure).

    Columns named explicitly replace the dialect's.

    Raises:
        DataError: If ``class_column`` is named but not in the header.
    """
    if class_column is not None and class_column not in header:
        raise DataError(f"{path or 'the table'}: no class column {class_column!r} (found: {', '.join(header)}); check --class-column")
    for dialect in LONG_FORMATS:
        columns = (id_column or dialect.id_column, class_column or dialect.class_column, rle_column or dialect.rle_column)
        if all(column in header for column in columns):
            return LongFormat(dialect.name, *columns, dialect.missing_is_empty)
    return None


def read_long_table(path: Path, dialect: LongFormat) -> LongTable:
    """Read a long RLE table: the RLE string of every (frame, class) pair it lists.

    Ids that name an image file (``0002cc93b.jpg``) are taken without the suffix, as frame ids are.

    Raises:
        DataError: If the file cannot be read as a CSV with the dialect's columns, or a row has no class.
        UsageError: If a class label cannot become a folder name (:data:`~medseg.files.NAME_RULE`).
    """
    path = Path(path)
    table = io.read_csv(path, (dialect.id_column, dialect.class_column, dialect.rle_column))
    result = LongTable(path, dialect)
    columns = zip(table[dialect.id_column], table[dialect.class_column], table[dialect.rle_column], strict=True)
    for number, (raw_id, raw_label, text) in enumerate(columns, start=2):
        sample_id, label = frame_id(raw_id.strip()), raw_label.strip()
        if not label:
            raise DataError(f"{path}: row {number}: the {dialect.class_column} cell is empty; give every row its class")
        if label not in result.labels:
            result.labels.append(check_name(label, "class", f"{path}: row {number}"))
        if not io.is_frame_id(sample_id):
            result.unsafe.append((number, sample_id))
            continue
        if (sample_id, label) in result.row_numbers:
            result.duplicates.append((number, sample_id, label, result.row_numbers[sample_id, label]))
            continue
        result.rows.setdefault(sample_id, {})[label] = text.strip()
        result.row_numbers[sample_id, label] = number
    return result


def frame_id(value: str) -> str:
    """A frame id as a table writes it, without an image suffix (``0002cc93b.jpg`` -> ``0002cc93b``).

    A value that is no frame id (``../x.png``) is kept as written, to be refused as such, not cut to a safe ``x``.
    """
    path = Path(value)
    return path.stem if io.has_image_suffix(path) and io.is_frame_id(value) else value


def write_long_table(
    path: Path, rows: Iterable[tuple[str, str, str]], header: tuple[str, str, str] = ("id", "class", "rle"), exclusive: bool = False
) -> None:
    """Write ``(id, class, rle)`` rows under ``header``, atomically, in the order given.

    Args:
        path: The CSV file.
        rows: One row per (frame, class); an empty RLE is an empty mask.
        header: The id, class and RLE column names (e.g. a sample submission's).
        exclusive: Never replace a file another process wrote meanwhile (:func:`medseg.files.atomic_write`).
    """
    buffer = text_io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    with atomic_write(Path(path), exclusive=exclusive) as stream:
        stream.write(buffer.getvalue())
