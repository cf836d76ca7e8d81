"""Reading images, masks and RLE tables from disk.

Images are TIFF, PNG, JPEG, BMP or DICOM (``.dcm``, or any file that carries the DICOM preamble, such as
the extension-less files of a PACS export; compressed transfer syntaxes are decoded by pylibjpeg). They
come back as 2-D gray frames (colour converted with the ITU-R 601 luma weights): ``uint8`` as stored for
8-bit data, and ``float32`` in [0, 1] through an intensity window for deeper data, which keeps its precision
(:mod:`medseg.data.intensity`). A DICOM frame gets its modality rescale (slope and intercept), its window
when it stores one, and MONOCHROME1 inversion. Masks come back as 2-D ``bool`` arrays. The file format is
taken from the file's first bytes, not its name, so that a JPEG saved under a ``.tif`` name is reported
instead of misread. Every failure raises :class:`~medseg.errors.ImageReadError` or
:class:`~medseg.errors.DataError` naming the file.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
from PIL import Image

from medseg.data import intensity
from medseg.data.intensity import IntensityWindow
from medseg.errors import DataError, ImageReadError

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp", ".dcm", ".dicom")
_FORMAT_OF_SUFFIX = {
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".bmp": "BMP",
    ".dcm": "DICOM",
    ".dicom": "DICOM",
}
_SUFFIX_OF_FORMAT = {"TIFF": ".tif", "PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "DICOM": ".dcm"}
_DICOM_PREAMBLE = 128
_MAGIC = (
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),
    (b"MM\x00+", "TIFF"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"BM", "BMP"),
)
_LUMA = np.array([0.299, 0.587, 0.114])


@dataclass(frozen=True)
class StoredFrame:
    """A frame's gray values as stored, and how the file says to show them.

    Attributes:
        values: Gray values (a DICOM file's after its modality rescale).
        window: The ``(low, high)`` window a DICOM file stores, if any.
        inverted: MONOCHROME1: the lowest value is white.
    """

    values: np.ndarray
    window: tuple[float, float] | None = None
    inverted: bool = False


def is_image_file(path: Path) -> bool:
    """Whether medseg reads the file as an image: one of the image suffixes, or the DICOM preamble."""
    return has_image_suffix(path) or _has_dicom_preamble(path)


def has_image_suffix(path: Path) -> bool:
    """Whether a name ends in one of the image suffixes medseg reads (the name alone; no file is opened)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def frame_id(path: Path) -> str:
    """The id of an image file: its name without the image suffix (the whole name of an extension-less DICOM)."""
    return path.stem if has_image_suffix(path) else path.name


def read_image(path: Path, window: IntensityWindow = "auto") -> np.ndarray:
    """Read an image as a 2-D gray frame.

    Args:
        path: A TIFF (LZW and other compressions), PNG, JPEG, BMP or DICOM file.
        window: The intensity window of frames deeper than 8 bits (see :mod:`medseg.data.intensity`).

    Returns:
        The gray frame: ``uint8`` as stored for 8-bit data, ``float32`` in [0, 1] for deeper data.

    Raises:
        ImageReadError: If the file is missing, empty, truncated, corrupt, not of the format its name says,
            holds several frames, no pixels or an unsupported pixel type.

    Shape:
        Returns: (H, W).
    """
    path = Path(path)
    stored = read_stored(path)
    try:
        return intensity.to_frame(stored.values, window, stored.window, stored.inverted)
    except ValueError as error:
        raise ImageReadError(path, str(error)) from None


def read_stored(path: Path) -> StoredFrame:
    """A frame's gray values as stored (colour to gray by luma), and a DICOM file's window and inversion.

    Raises:
        ImageReadError: As :func:`read_image`.
    """
    path = Path(path)
    if sniff_format(path) == "DICOM":
        return _read_dicom(path)
    return StoredFrame(_gray(read_raw(path), path))


def read_mask(path: Path, value: int | None = None, threshold: int | None = None) -> np.ndarray:
    """Read a mask as a 2-D boolean array.

    Args:
        path: Mask file (0/255 or 0/1 masks, class-index masks, anti-aliased masks).
        value: For class-index masks: the class that is foreground (``mask == value``).
        threshold: For anti-aliased masks: foreground is ``mask > threshold``.

    Returns:
        The foreground.

    Raises:
        ImageReadError: If the file cannot be read as a single-channel mask.

    Shape:
        Returns: (H, W).
    """
    return binarize_mask(read_mask_values(path), value=value, threshold=threshold)


def read_mask_values(path: Path) -> np.ndarray:
    """Read the raw values of a mask: class indices of palette images, gray levels otherwise.

    Raises:
        ImageReadError: If the file cannot be read, or holds a colour image whose channels differ.
    """
    path = Path(path)
    raw = read_raw(path, keep_palette=True)
    if raw.ndim == 3:
        if raw.shape[2] in (3, 4) and not (np.array_equal(raw[..., 0], raw[..., 1]) and np.array_equal(raw[..., 0], raw[..., 2])):
            raise ImageReadError(path, "mask is a colour image; save masks as single-channel 0/255 or class-index images")
        raw = raw[..., 0]
    return raw


def binarize_mask(values: np.ndarray, value: int | None = None, threshold: int | None = None) -> np.ndarray:
    """Turn raw mask values into a boolean foreground.

    Args:
        values: Raw mask values.
        value: Foreground class for class-index masks.
        threshold: Foreground is above this level (anti-aliased masks).

    Returns:
        ``values == value`` if ``value`` is given, else ``values > threshold`` if ``threshold`` is given,
        else ``values != 0``.
    """
    if value is not None:
        return values == value
    if threshold is not None:
        return values > threshold
    return values != 0


def is_binary_mask(values: np.ndarray) -> bool:
    """Whether a raw mask has at most one non-zero value (0/255 or 0/1 masks)."""
    foreground = values[values != 0]
    return foreground.size == 0 or bool((foreground == foreground[0]).all())


def image_size(path: Path) -> tuple[int, int]:
    """The ``(height, width)`` of an image, read from its header without decoding the pixels.

    Raises:
        ImageReadError: If the header cannot be read.
    """
    path = Path(path)
    fmt = sniff_format(path)
    try:
        if fmt == "DICOM":
            return _dicom_size(path)
        if fmt == "TIFF":
            with tifffile.TiffFile(path) as tif:
                if not tif.pages:
                    raise ImageReadError(path, "TIFF has no readable frame (truncated or corrupt); replace the file")
                page = tif.pages.first
                return int(page.imagelength), int(page.imagewidth)
        with Image.open(path) as image:
            return image.height, image.width
    except ImageReadError:
        raise
    except Exception as error:
        raise ImageReadError(path, f"cannot read the {fmt} header ({_reason(error)}); replace the file") from error


def sniff_format(path: Path) -> str:
    """The image format from the file's first bytes, checked against its suffix.

    Returns:
        ``"TIFF"``, ``"PNG"``, ``"JPEG"``, ``"BMP"`` or ``"DICOM"``.

    Raises:
        ImageReadError: If the file is missing, empty, of an unknown format, or of another format than
            its suffix says.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(_DICOM_PREAMBLE + 4)
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except OSError as error:
        raise ImageReadError(path, f"cannot open ({error.strerror}); check its permissions") from error
    if not head:
        raise ImageReadError(path, "file is empty (0 bytes); replace it or remove it from the data set")
    dicom = head[_DICOM_PREAMBLE:] == b"DICM"
    fmt = "DICOM" if dicom else next((name for magic, name in _MAGIC if head.startswith(magic)), None)
    if fmt is None:
        raise ImageReadError(path, "not a TIFF, PNG, JPEG, BMP or DICOM image (unknown content); replace the file")
    expected = _FORMAT_OF_SUFFIX.get(path.suffix.lower())
    if expected is not None and expected != fmt:
        raise ImageReadError(path, f"file is a {fmt} image named {path.suffix}; rename it to {path.stem}{_SUFFIX_OF_FORMAT[fmt]}")
    return fmt


def read_raw(path: Path, keep_palette: bool = False) -> np.ndarray:
    """Decode an image file into its stored array (2-D, or 3-D with channels last).

    Args:
        path: Image file.
        keep_palette: Return the indices of a palette image instead of its colours.

    Raises:
        ImageReadError: If the file cannot be decoded.
    """
    path = Path(path)
    fmt = sniff_format(path)
    if fmt == "DICOM":
        return _read_dicom(path).values
    try:
        array = _read_tiff(path) if fmt == "TIFF" else _read_with_pillow(path, keep_palette)
    except ImageReadError:
        raise
    except Exception as error:
        raise ImageReadError(path, f"cannot decode the {fmt} data ({_reason(error)}); the file is corrupt or truncated") from error
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or array.size == 0 or (array.ndim == 3 and array.shape[2] > 4):
        raise ImageReadError(path, f"expected one 2-D frame, found an array of shape {array.shape}; save one frame per file")
    return array


def _read_tiff(path: Path) -> np.ndarray:
    with tifffile.TiffFile(path) as tif:
        if not tif.pages:
            raise ImageReadError(path, "TIFF has no readable frame (truncated or corrupt); replace the file")
        if len(tif.pages) > 1:
            raise ImageReadError(path, f"TIFF holds {len(tif.pages)} frames; save one frame per file")
        page = tif.pages.first
        size = path.stat().st_size
        if any(offset + count > size for offset, count in zip(page.dataoffsets, page.databytecounts)):
            raise ImageReadError(path, "TIFF is truncated (its pixel data runs past the end of the file); replace the file")
        array = page.asarray()
        if page.planarconfig == tifffile.PLANARCONFIG.SEPARATE and array.ndim == 3:
            array = np.moveaxis(array, 0, -1)
        return array


def _read_with_pillow(path: Path, keep_palette: bool) -> np.ndarray:
    with Image.open(path) as image:
        image.load()
        if image.mode == "P" and not keep_palette:
            image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        elif image.mode in ("LA", "PA"):
            image = image.convert("L")
        elif image.mode == "CMYK" or image.mode.startswith("YCbCr"):
            image = image.convert("RGB")
        return np.asarray(image)


def _gray(array: np.ndarray, path: Path) -> np.ndarray:
    """One gray channel of the stored type: the first of gray+alpha, the luma of colour (rounded for integers)."""
    gray_type = array.dtype == np.bool_ or np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    if not gray_type:
        raise ImageReadError(path, f"unsupported pixel type {array.dtype}; save the image as 8- or 16-bit gray")
    if array.ndim == 3 and array.shape[2] < 3:
        array = array[..., 0]
    elif array.ndim == 3 and np.issubdtype(array.dtype, np.integer):
        array = np.rint(array[..., :3] @ _LUMA).astype(array.dtype)
    elif array.ndim == 3:
        array = (array[..., :3] @ _LUMA).astype(np.float32)
    return np.ascontiguousarray(array)


def _has_dicom_preamble(path: Path) -> bool:
    """Whether a file carries the DICOM preamble (``DICM`` after 128 bytes); ``False`` if it cannot be read."""
    try:
        with open(path, "rb") as handle:
            return handle.read(_DICOM_PREAMBLE + 4)[_DICOM_PREAMBLE:] == b"DICM"
    except OSError:
        return False


def _dicom_dataset(path: Path, pixels: bool = True):
    """The pydicom dataset of a file (its header only without ``pixels``)."""
    import pydicom

    try:
        return pydicom.dcmread(path, stop_before_pixels=not pixels)
    except Exception as error:
        raise ImageReadError(path, f"cannot read the DICOM file ({_reason(error)}); it is corrupt or truncated, replace it") from error


def _dicom_size(path: Path) -> tuple[int, int]:
    dataset = _dicom_dataset(path, pixels=False)
    if "Rows" not in dataset or "Columns" not in dataset:
        raise ImageReadError(path, "DICOM file holds no image (no Rows/Columns); remove it from the images")
    return int(dataset.Rows), int(dataset.Columns)


def _read_dicom(path: Path) -> StoredFrame:
    """A DICOM frame: pixels decoded (compressed ones too), modality rescale applied, window and inversion read."""
    from pydicom.pixels import apply_modality_lut

    dataset = _dicom_dataset(path)
    if not any(key in dataset for key in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ImageReadError(path, "DICOM file holds no pixel data (a report or other non-image object); remove it from the images")
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageReadError(path, f"DICOM file holds {frames} frames; save one frame per file")
    try:
        pixels = dataset.pixel_array
    except Exception as error:
        syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
        named = f"{syntax.name}: " if syntax is not None else ""
        reason = f"cannot decode the DICOM pixel data ({named}{_reason(error)}); the file is corrupt or truncated"
        raise ImageReadError(path, reason) from error
    values = apply_modality_lut(_gray(pixels, path), dataset) if _has_rescale(dataset) else _gray(pixels, path)
    inverted = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).strip() == "MONOCHROME1"
    return StoredFrame(np.ascontiguousarray(values), _dicom_window(dataset), inverted)


def _has_rescale(dataset) -> bool:
    slope, intercept = dataset.get("RescaleSlope", 1), dataset.get("RescaleIntercept", 0)
    return "ModalityLUTSequence" in dataset or float(slope) != 1.0 or float(intercept) != 0.0


def _dicom_window(dataset) -> tuple[float, float] | None:
    """The first window (centre, width) a DICOM file stores, as the ``(low, high)`` it maps to black and white."""
    centre, width = dataset.get("WindowCenter"), dataset.get("WindowWidth")
    if centre is None or width is None:
        return None
    centre, width = (float(value[0]) if isinstance(value, Sequence) else float(value) for value in (centre, width))
    return (centre - width / 2, centre + width / 2) if width >= 1 else None


def _reason(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:160] if text else type(error).__name__


def read_csv(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    """Read a CSV table with every column as text and empty cells as ``""``.

    Args:
        path: The CSV file (UTF-8).
        required: Columns that must be present.

    Returns:
        The table.

    Raises:
        DataError: If the file is missing, not UTF-8, not a CSV, or lacks a required column.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)
            table = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8", index_col=False)
    except pd.errors.ParserWarning:
        raise DataError(f"{path}: rows have more fields than the header (a trailing comma?); fix the file") from None
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text (byte {error.start}); save the CSV as UTF-8") from error
    except pd.errors.EmptyDataError:
        needs = f" with {', '.join(required)}" if required else ""
        raise DataError(f"{path}: CSV is empty; it needs a header row{needs}") from None
    except (pd.errors.ParserError, ValueError) as error:
        raise DataError(f"{path}: not a valid CSV ({_reason(error)}); fix the file") from error
    table.columns = [str(column).strip() for column in table.columns]
    repeated = sorted({column for column in table.columns if list(table.columns).count(column) > 1})
    if repeated:
        raise DataError(f"{path}: column {repeated[0]!r} appears more than once in the header; keep one")
    require_columns(table, path, required)
    return table


def require_columns(table: pd.DataFrame, path: Path, required: tuple[str, ...]) -> None:
    """Check that a table read from ``path`` has the ``required`` columns.

    Raises:
        DataError: Naming the missing columns and the ones found.
    """
    missing = [column for column in required if column not in table.columns]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(map(str, table.columns))}); "
            f"the CSV needs {', '.join(required)}"
        )
