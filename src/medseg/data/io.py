"""Reading images, masks and RLE tables from disk.

Images come back as 2-D ``uint8`` arrays (colour converted to gray with the ITU-R 601 luma weights,
16-bit scaled to 8-bit), masks as 2-D ``bool`` arrays. The file format is taken from the file's first
bytes, not its name, so that a JPEG saved under a ``.tif`` name is reported instead of misread. Every
failure raises :class:`~medseg.errors.ImageReadError` or :class:`~medseg.errors.DataError` naming the file.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
from PIL import Image

from medseg.errors import DataError, ImageReadError

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")
_FORMAT_OF_SUFFIX = {".tif": "TIFF", ".tiff": "TIFF", ".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP"}
_SUFFIX_OF_FORMAT = {"TIFF": ".tif", "PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp"}
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


def is_image_file(path: Path) -> bool:
    """Whether the file name has one of the image suffixes medseg reads."""
    return path.suffix.lower() in IMAGE_SUFFIXES


def read_image(path: Path) -> np.ndarray:
    """Read an image as 2-D ``uint8`` gray levels.

    Args:
        path: A TIFF (LZW and other compressions), PNG, JPEG or BMP file.

    Returns:
        The gray image.

    Raises:
        ImageReadError: If the file is missing, empty, truncated, corrupt, not of the format its name says,
            or holds several frames or an unsupported pixel type.

    Shape:
        Returns: (H, W).
    """
    return _to_gray_uint8(read_raw(path), Path(path))


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
        ``"TIFF"``, ``"PNG"``, ``"JPEG"`` or ``"BMP"``.

    Raises:
        ImageReadError: If the file is missing, empty, of an unknown format, or of another format than
            its suffix says.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except OSError as error:
        raise ImageReadError(path, f"cannot open ({error.strerror}); check its permissions") from error
    if not head:
        raise ImageReadError(path, "file is empty (0 bytes); replace it or remove it from the data set")
    fmt = next((name for magic, name in _MAGIC if head.startswith(magic)), None)
    if fmt is None:
        raise ImageReadError(path, "not a TIFF, PNG, JPEG or BMP image (unknown content); replace the file")
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


def _to_gray_uint8(array: np.ndarray, path: Path) -> np.ndarray:
    array = _to_uint8(array, path)
    if array.ndim == 3:
        array = array[..., 0] if array.shape[2] < 3 else np.rint(array[..., :3] @ _LUMA).astype(np.uint8)
    return np.ascontiguousarray(array)


def _to_uint8(array: np.ndarray, path: Path) -> np.ndarray:
    """Scale pixel values to 8 bits by their type: 16-bit by 257, floats in [0, 1] by 255."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.dtype == np.uint16:
        return ((array.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        finite = np.nan_to_num(array.astype(np.float32), nan=0.0)
        scale = 255.0 if finite.max(initial=0.0) <= 1.0 else 1.0
        return np.clip(np.rint(finite * scale), 0, 255).astype(np.uint8)
    raise ImageReadError(path, f"unsupported pixel type {array.dtype}; save the image as 8- or 16-bit gray")


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
