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

Every file may be hostile. A frame's size is read from its header and checked against a pixel limit
(``data.max_pixels``, :data:`DEFAULT_MAX_PIXELS`) before a byte of it is decoded, for every format, so
that a small file declaring a huge frame (a decompression bomb) is refused instead of filling memory;
Pillow's own guard is replaced by that check. A frame holding NaN or infinite values is refused, not
predicted as an empty mask. A DICOM file's numbers (rescale, window, frames) are checked before use. A CSV
table is bounded in size before it is parsed, and a column named twice in its header is refused.

A frame may also come as bytes in memory (:class:`FrameBytes`, an upload to ``medseg serve``): the readers take
it where they take a path, with the same checks, and nothing of it is written to disk.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
import tifffile
from PIL import BmpImagePlugin, Image, JpegImagePlugin, PngImagePlugin

from medseg.config import DataOptions
from medseg.data import intensity
from medseg.data.intensity import IntensityWindow
from medseg.errors import DataError, ImageReadError, UnsupportedFormatError
from medseg.files import shown

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
_PILLOW_FILES = {"PNG": PngImagePlugin.PngImageFile, "JPEG": JpegImagePlugin.JpegImageFile, "BMP": BmpImagePlugin.BmpImageFile}
_PILLOW_BOMBS = (Image.DecompressionBombError, Image.DecompressionBombWarning)
_MAX_CHANNELS = 4
_TEXT_VRS = ("IS", "DS", "CS")
_FIELDS_MISMATCH = re.compile(r"Expected (\d+) fields in line (\d+), saw (\d+)")

DEFAULT_MAX_PIXELS: int = DataOptions.model_fields["max_pixels"].default
"""The pixel limit of a frame or mask when the caller names none: ``data.max_pixels``'s default."""
MAX_TABLE_BYTES = 1024**3
"""The largest CSV table read (1 GiB): the RLE tables of SIIM and UW-Madison are tens of MB."""
FRAME_ID_RULE = "no / or \\, no control characters, not . or .., no leading -, UTF-8, at most 200 bytes"
"""What a frame id may hold: it names a mask file that ``predict --masks-dir`` writes, beside others."""
_MAX_ID_BYTES = 200
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


@dataclass(frozen=True)
class StoredFrame:
    """A frame's gray values as stored, and how the file says to show them.

    Attributes:
        values: Gray values (a DICOM file's after its modality rescale).
        window: The ``(low, high)`` window a DICOM file stores, if any.
        inverted: MONOCHROME1: the lowest value is white.
        window_problem: Why the window a DICOM file stores cannot be used (malformed), if it cannot; it
            only matters where the stored window would be used (``data.intensity_window=auto``).
    """

    values: np.ndarray
    window: tuple[float, float] | None = None
    inverted: bool = False
    window_problem: str | None = None


@dataclass(frozen=True)
class FrameBytes:
    """An image file held in memory (a frame posted to ``medseg serve``): its bytes and the name it came with.

    The frame readers take it where they take a path, with the same checks. The name is only shown in
    messages and its suffix checked against the content, as a file's is; it never names a file.

    Attributes:
        name: The name the file came with (shown; its suffix checked against the content).
        data: The file's bytes.
    """

    name: str
    data: bytes = field(repr=False)

    @property
    def suffix(self) -> str:
        """The name's suffix (``.tif``), as :attr:`pathlib.Path.suffix` gives a file's."""
        return PurePosixPath(self.name.replace("\\", "/")).suffix

    @property
    def stem(self) -> str:
        """The name without its suffix."""
        return PurePosixPath(self.name.replace("\\", "/")).stem

    def __str__(self) -> str:
        return self.name


Source = Path | FrameBytes
"""Where a frame is read from: a file, or a file's bytes in memory."""


def _source(path: Path | str | FrameBytes) -> Source:
    """A path as :class:`~pathlib.Path`; bytes in memory as they are."""
    return path if isinstance(path, FrameBytes) else Path(path)


def _opened(source: Source) -> Path | BytesIO:
    """What the decoders (tifffile, Pillow, pydicom) read: the path, or a stream over the bytes."""
    return BytesIO(source.data) if isinstance(source, FrameBytes) else source


def _byte_size(source: Source) -> int:
    """The file's size in bytes."""
    return len(source.data) if isinstance(source, FrameBytes) else source.stat().st_size


def _head(source: Source, size: int) -> bytes:
    """The first ``size`` bytes of the file.

    Raises:
        OSError: If the file cannot be opened.
    """
    if isinstance(source, FrameBytes):
        return source.data[:size]
    with open(source, "rb") as handle:
        return handle.read(size)


def is_image_file(path: Path) -> bool:
    """Whether medseg reads the file as an image: one of the image suffixes, or the DICOM preamble."""
    return has_image_suffix(path) or _has_dicom_preamble(path)


def has_image_suffix(path: Path) -> bool:
    """Whether a name ends in one of the image suffixes medseg reads (the name alone; no file is opened)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def frame_id(path: Path) -> str:
    """The id of an image file: its name without the image suffix (the whole name of an extension-less DICOM)."""
    return path.stem if has_image_suffix(path) else path.name


def is_frame_id(name: object) -> bool:
    """Whether ``name`` may be a frame id (:data:`FRAME_ID_RULE`): a file name of its own, inside any folder.

    Looser than :data:`~medseg.files.NAME_RULE`, since real file names hold spaces and accents
    (``patient 7.png``): what it refuses is what leaves a folder (``/``, ``..``), breaks a line or a CSV
    row (control characters), reads as an option (a leading ``-``) or cannot be written (undecodable bytes,
    a name longer than a file system takes).
    """
    if not isinstance(name, str) or name in ("", ".", "..") or name.startswith("-") or "/" in name or "\\" in name:
        return False
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return False
    return size <= _MAX_ID_BYTES and _CONTROL.search(name) is None


def read_image(path: Path | FrameBytes, window: IntensityWindow = "auto", *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image as a 2-D gray frame.

    Args:
        path: A TIFF (LZW and other compressions), PNG, JPEG, BMP or DICOM file.
        window: The intensity window of frames deeper than 8 bits (see :mod:`medseg.data.intensity`).
        max_pixels: The most pixels the file may declare (``data.max_pixels``); checked before decoding.

    Returns:
        The gray frame: ``uint8`` as stored for 8-bit data, ``float32`` in [0, 1] for deeper data.

    Raises:
        ImageReadError: If the file is missing, empty, truncated, corrupt, not of the format its name says,
            holds several frames, no pixels, more than ``max_pixels`` (``too_many_pixels``), NaN or infinite
            values (``non_finite_pixels``), a malformed DICOM window (``bad_dicom_window``, where that
            window would be used) or an unsupported pixel type.

    Shape:
        Returns: (H, W).
    """
    path = _source(path)
    stored = read_stored(path, max_pixels=max_pixels)
    check_finite(stored.values, path)
    if stored.window_problem is not None and window == "auto":
        raise ImageReadError(path, stored.window_problem, "bad_dicom_window")
    try:
        return intensity.to_frame(stored.values, window, stored.window, stored.inverted)
    except ValueError as error:
        raise ImageReadError(path, str(error)) from None


def check_finite(values: np.ndarray, path: Path) -> None:
    """Refuse a frame that holds NaN or infinite values (a float TIFF or a DICOM rescale can).

    Raises:
        ImageReadError: ``non_finite_pixels``, saying how many and the fix.
    """
    if not np.issubdtype(values.dtype, np.floating):
        return
    bad = values.size - int(np.count_nonzero(np.isfinite(values)))
    if bad:
        raise ImageReadError(
            path,
            f"{bad:,} of {values.size:,} pixels are NaN or infinite; replace them with finite values (e.g. 0) in the file, "
            "or remove the file from the data set",
            "non_finite_pixels",
        )


def read_stored(path: Path | FrameBytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> StoredFrame:
    """A frame's gray values as stored (colour to gray by luma), and a DICOM file's window and inversion.

    Raises:
        ImageReadError: As :func:`read_image`.
    """
    path = _source(path)
    if sniff_format(path) == "DICOM":
        return _read_dicom(path, max_pixels)
    return StoredFrame(_gray(read_raw(path, max_pixels=max_pixels), path))


def read_mask(
    path: Path | FrameBytes, value: int | None = None, threshold: int | None = None, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Read a mask as a 2-D boolean array.

    Args:
        path: Mask file (0/255 or 0/1 masks, class-index masks, anti-aliased masks).
        value: For class-index masks: the class that is foreground (``mask == value``).
        threshold: For anti-aliased masks: foreground is ``mask > threshold``.
        max_pixels: The most pixels the file may declare; checked before decoding.

    Returns:
        The foreground.

    Raises:
        ImageReadError: If the file cannot be read as a single-channel mask.

    Shape:
        Returns: (H, W).
    """
    return binarize_mask(read_mask_values(path, max_pixels=max_pixels), value=value, threshold=threshold)


def read_mask_values(path: Path | FrameBytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read the raw values of a mask: class indices of palette images, gray levels otherwise.

    Raises:
        ImageReadError: If the file cannot be read, declares more than ``max_pixels``, holds NaN or infinite
            values, or holds a colour image whose channels differ.
    """
    path = _source(path)
    raw = read_raw(path, keep_palette=True, max_pixels=max_pixels)
    check_finite(raw, path)
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


def image_size(path: Path | FrameBytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """The ``(height, width)`` of an image, read from its header without decoding the pixels.

    Raises:
        ImageReadError: If the header cannot be read, or declares no pixels or more than ``max_pixels``.
    """
    path = _source(path)
    fmt = sniff_format(path)
    try:
        if fmt == "DICOM":
            return _dicom_size(path, max_pixels)
        if fmt == "TIFF":
            with tifffile.TiffFile(_opened(path)) as tif:
                return _tiff_size(path, tif, max_pixels)
        with _open_with_pillow(path, fmt, max_pixels) as image:
            return image.height, image.width
    except ImageReadError:
        raise
    except _PILLOW_BOMBS as error:
        raise _bomb_error(path, error) from None
    except Exception as error:
        raise ImageReadError(path, f"cannot read the {fmt} header ({_reason(error)}); replace the file") from error


def check_pixels(path: Path, height: int, width: int, max_pixels: int, frames: int = 1, channels: int = 1) -> None:
    """Refuse a frame whose header declares no pixels, more than ``max_pixels`` or more channels than an image has.

    Args:
        path: The file, for the message.
        height: Declared rows.
        width: Declared columns.
        max_pixels: The limit (``data.max_pixels``).
        frames: Declared frames (a DICOM file's NumberOfFrames, a TIFF's depth).
        channels: Declared samples per pixel.

    Raises:
        ImageReadError: ``too_many_pixels`` above the limit (naming the size and ``--set data.max_pixels``),
            else one naming what is wrong.
    """
    if height < 1 or width < 1 or frames < 1:
        raise ImageReadError(path, f"the header declares a frame of {width}x{height} pixels, which holds none; replace the file")
    if channels > _MAX_CHANNELS:
        raise ImageReadError(path, f"the header declares {channels} samples per pixel; save the image as gray or RGB")
    pixels = height * width * frames
    if pixels > max_pixels:
        size = f"{width}x{height}" + (f"x{frames} frames" if frames > 1 else "")
        raise ImageReadError(
            path,
            f"the header declares {size} = {pixels:,} pixels, more than the limit of {max_pixels:,} (a decompression bomb?); "
            f"if the frame is real, raise the limit with --max-pixels {pixels} (data.max_pixels), else replace the file",
            "too_many_pixels",
        )


def sniff_format(path: Path | FrameBytes) -> str:
    """The image format from the file's first bytes, checked against its suffix.

    Returns:
        ``"TIFF"``, ``"PNG"``, ``"JPEG"``, ``"BMP"`` or ``"DICOM"``.

    Raises:
        ImageReadError: If the file is missing, empty, of an unknown format, or of another format than
            its suffix says.
    """
    path = _source(path)
    try:
        head = _head(path, _DICOM_PREAMBLE + 4)
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except OSError as error:
        raise ImageReadError(path, f"cannot open ({error.strerror}); check its permissions") from error
    if not head:
        raise ImageReadError(path, "file is empty (0 bytes); replace it or remove it from the data set")
    dicom = head[_DICOM_PREAMBLE:] == b"DICM"
    fmt = "DICOM" if dicom else next((name for magic, name in _MAGIC if head.startswith(magic)), None)
    if fmt is None:
        raise UnsupportedFormatError(path, "not a TIFF, PNG, JPEG, BMP or DICOM image (unknown content); replace the file")
    expected = _FORMAT_OF_SUFFIX.get(path.suffix.lower())
    if expected is not None and expected != fmt:
        raise ImageReadError(path, f"file is a {fmt} image named {path.suffix}; rename it to {path.stem}{_SUFFIX_OF_FORMAT[fmt]}")
    return fmt


def read_raw(path: Path | FrameBytes, keep_palette: bool = False, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an image file into its stored array (2-D, or 3-D with channels last).

    Args:
        path: Image file.
        keep_palette: Return the indices of a palette image instead of its colours.
        max_pixels: The most pixels the file may declare; checked from the header before decoding.

    Raises:
        ImageReadError: If the file cannot be decoded or declares more than ``max_pixels``.
    """
    path = _source(path)
    fmt = sniff_format(path)
    if fmt == "DICOM":
        return _read_dicom(path, max_pixels).values
    try:
        array = _read_tiff(path, max_pixels) if fmt == "TIFF" else _read_with_pillow(path, fmt, keep_palette, max_pixels)
    except ImageReadError:
        raise
    except _PILLOW_BOMBS as error:
        raise _bomb_error(path, error) from None
    except Exception as error:
        raise ImageReadError(path, f"cannot decode the {fmt} data ({_reason(error)}); the file is corrupt or truncated") from error
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or array.size == 0 or (array.ndim == 3 and array.shape[2] > _MAX_CHANNELS):
        raise ImageReadError(path, f"expected one 2-D frame, found an array of shape {array.shape}; save one frame per file")
    return array


def _tiff_size(path: Source, tif: tifffile.TiffFile, max_pixels: int) -> tuple[int, int]:
    """The ``(height, width)`` of a TIFF's first page, checked against ``max_pixels`` from its tags alone."""
    if not tif.pages:
        raise ImageReadError(path, "TIFF has no readable frame (truncated or corrupt); replace the file")
    page = tif.pages.first
    height, width = int(page.imagelength), int(page.imagewidth)
    check_pixels(path, height, width, max_pixels, frames=int(page.imagedepth), channels=int(page.samplesperpixel))
    return height, width


def _read_tiff(path: Source, max_pixels: int) -> np.ndarray:
    with tifffile.TiffFile(_opened(path)) as tif:
        _tiff_size(path, tif, max_pixels)
        if len(tif.pages) > 1:
            raise ImageReadError(path, f"TIFF holds {len(tif.pages)} frames; save one frame per file")
        page = tif.pages.first
        size = _byte_size(path)
        if any(offset + count > size for offset, count in zip(page.dataoffsets, page.databytecounts)):
            raise ImageReadError(path, "TIFF is truncated (its pixel data runs past the end of the file); replace the file")
        array = page.asarray()
        if page.planarconfig == tifffile.PLANARCONFIG.SEPARATE and array.ndim == 3:
            array = np.moveaxis(array, 0, -1)
        return array


def _open_with_pillow(path: Source, fmt: str, max_pixels: int) -> Image.Image:
    """A PNG, JPEG or BMP file opened by its format's Pillow plugin (the header only), checked against ``max_pixels``.

    The plugin is called directly rather than through ``Image.open``: this check replaces Pillow's fixed
    decompression-bomb guard, so that ``data.max_pixels`` decides alone, above Pillow's limit as below it.
    """
    image = _PILLOW_FILES[fmt](_opened(path))
    try:
        check_pixels(path, image.height, image.width, max_pixels, channels=len(image.getbands()))
    except ImageReadError:
        image.close()
        raise
    return image


def _read_with_pillow(path: Path, fmt: str, keep_palette: bool, max_pixels: int) -> np.ndarray:
    with _open_with_pillow(path, fmt, max_pixels) as image:
        image.load()
        if image.mode == "P" and not keep_palette:
            image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        elif image.mode in ("LA", "PA"):
            image = image.convert("L")
        elif image.mode == "CMYK" or image.mode.startswith("YCbCr"):
            image = image.convert("RGB")
        return np.asarray(image)


def _bomb_error(path: Path, error: Exception) -> ImageReadError:
    """Pillow's decompression-bomb guard, should it ever fire, as the same problem as the pixel limit's."""
    return ImageReadError(
        path,
        f"Pillow refuses it as a decompression bomb ({_reason(error)}); if the frame is real, raise the limit with "
        "--max-pixels N (data.max_pixels), else replace the file",
        "too_many_pixels",
    )


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


def _dicom_dataset(path: Source, pixels: bool = True):
    """The pydicom dataset of a file (its header only without ``pixels``)."""
    import pydicom

    try:
        return pydicom.dcmread(_opened(path), stop_before_pixels=not pixels)
    except Exception as error:
        raise ImageReadError(path, f"cannot read the DICOM file ({_reason(error)}); it is corrupt or truncated, replace it") from error


def _dicom_size(path: Source, max_pixels: int) -> tuple[int, int]:
    return _dicom_checked_size(path, _dicom_dataset(path, pixels=False), max_pixels)


def _dicom_checked_size(path: Path, dataset, max_pixels: int) -> tuple[int, int]:
    """A DICOM file's ``(Rows, Columns)``, its Rows x Columns x NumberOfFrames checked against ``max_pixels``."""
    if "Rows" not in dataset or "Columns" not in dataset:
        raise ImageReadError(path, "DICOM file holds no image (no Rows/Columns); remove it from the images")
    rows, columns = _dicom_count(path, dataset, "Rows", 0), _dicom_count(path, dataset, "Columns", 0)
    frames = _dicom_count(path, dataset, "NumberOfFrames", 1) or 1
    check_pixels(path, rows, columns, max_pixels, frames=frames, channels=_dicom_count(path, dataset, "SamplesPerPixel", 1) or 1)
    return rows, columns


def _dicom_count(path: Path, dataset, keyword: str, default: int) -> int:
    """A whole, non-negative number of a DICOM header (``default`` where the element is absent or empty).

    Raises:
        ImageReadError: If the element holds anything else (text, several values, a negative number).
    """
    value = _dicom_value(path, dataset, keyword)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):
        number = -1
    if number < 0:
        raise _header_error(path, keyword, value, "a whole number of 0 or more")
    return number


def _dicom_value(path: Path, dataset, keyword: str):
    """The value of a DICOM header element, ``None`` where it is absent.

    Text elements still as read (numbers as text, codes) are split here, without pydicom's conversion, which
    warns of a malformed value instead of telling it: their value is the text, or the list of its parts.

    Raises:
        ImageReadError: If pydicom cannot make a value of the element's bytes.
    """
    from pydicom.datadict import dictionary_VR

    try:
        element = dataset.get_item(keyword)
        if element is not None and isinstance(element.value, bytes) and (element.VR or dictionary_VR(element.tag)) in _TEXT_VRS:
            parts = [part.strip(" \x00") for part in element.value.decode("latin-1").split("\\")]
            return parts[0] if len(parts) == 1 else parts
        return dataset.get(keyword)
    except Exception as error:
        reason = f"cannot read DICOM {keyword} ({_reason(error)}); fix the file's header or replace it"
        raise ImageReadError(path, reason, "bad_dicom_header") from error


def _header_error(path: Path, keyword: str, value, wanted: str) -> ImageReadError:
    """A DICOM header element that holds something else than ``wanted``, naming it and its value."""
    reason = f"DICOM {keyword} is {shown(str(value), 40)}, not {wanted}; fix the file's header or replace it"
    return ImageReadError(path, reason, "bad_dicom_header")


def _read_dicom(path: Source, max_pixels: int) -> StoredFrame:
    """A DICOM frame: pixels decoded (compressed ones too), modality rescale applied, window and inversion read."""
    dataset = _dicom_dataset(path)
    if not any(key in dataset for key in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ImageReadError(path, "DICOM file holds no pixel data (a report or other non-image object); remove it from the images")
    _dicom_checked_size(path, dataset, max_pixels)
    frames = _dicom_count(path, dataset, "NumberOfFrames", 1) or 1
    if frames > 1:
        raise ImageReadError(path, f"DICOM file holds {frames} frames; save one frame per file")
    try:
        pixels = dataset.pixel_array
    except Exception as error:
        syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
        named = f"{syntax.name}: " if syntax is not None else ""
        reason = f"cannot decode the DICOM pixel data ({named}{_reason(error)}); the file is corrupt or truncated"
        raise ImageReadError(path, reason) from error
    values = _rescaled(path, dataset, _gray(pixels, path))
    inverted = str(_dicom_value(path, dataset, "PhotometricInterpretation")).strip() == "MONOCHROME1"
    window, problem = _dicom_window(path, dataset)
    return StoredFrame(np.ascontiguousarray(values), window, inverted, problem)


def _rescaled(path: Path, dataset, values: np.ndarray) -> np.ndarray:
    """Stored values through the file's modality rescale (slope and intercept, or its LUT), when it has one.

    Raises:
        ImageReadError: If the slope or intercept is not a finite number, the slope is 0, or the LUT cannot be applied.
    """
    from pydicom.pixels import apply_modality_lut

    slope, intercept = _dicom_float(path, dataset, "RescaleSlope", 1.0), _dicom_float(path, dataset, "RescaleIntercept", 0.0)
    if slope == 0.0:
        raise _header_error(path, "RescaleSlope", "0", "a number other than 0 (0 maps every pixel to one value)")
    if "ModalityLUTSequence" not in dataset and slope == 1.0 and intercept == 0.0:
        return values
    try:
        with np.errstate(all="ignore"):  # a rescale that overflows is told as non-finite pixels
            return apply_modality_lut(values, dataset)
    except Exception as error:
        reason = f"cannot apply the DICOM modality rescale ({_reason(error)}); fix the file's header or replace it"
        raise ImageReadError(path, reason, "bad_dicom_header") from error


def _dicom_float(path: Path, dataset, keyword: str, default: float) -> float:
    """A finite number of a DICOM header (``default`` where the element is absent or empty).

    Raises:
        ImageReadError: If the element holds anything else.
    """
    value = _dicom_value(path, dataset, keyword)
    if value is None or value == "":
        return default
    number = _finite(value)
    if number is None:
        raise _header_error(path, keyword, value, "a finite number")
    return number


def _finite(value) -> float | None:
    """A DICOM value as a finite float (the first of several), or ``None`` when it is none."""
    if not isinstance(value, str | bytes) and hasattr(value, "__len__"):
        value = value[0] if len(value) else None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _dicom_window(path: Path, dataset) -> tuple[tuple[float, float] | None, str | None]:
    """The first window (centre, width) a DICOM file stores, as the ``(low, high)`` it maps to black and white.

    Returns:
        The window (``None`` where the file stores none, or one narrower than 1) and, where the file's
        window is malformed (text, an empty value, one of the two missing, a width of 0 or less), why.
    """
    centre, width = (_dicom_value(path, dataset, keyword) for keyword in ("WindowCenter", "WindowWidth"))
    centre, width = (None if value == "" else value for value in (centre, width))
    if centre is None and width is None:
        return None, None
    low_high = (_finite(centre), _finite(width))
    if None in low_high or low_high[1] <= 0:
        found = ", ".join(f"{key} {shown(str(value), 30)}" for key, value in (("WindowCenter", centre), ("WindowWidth", width)))
        return None, (
            f"DICOM window is malformed ({found}; the width must be a number above 0); fix the file's window, "
            "or leave stored windows unused with --set data.intensity_window=percentile"
        )
    middle, wide = low_high
    return ((middle - wide / 2, middle + wide / 2) if wide >= 1 else None), None


def _reason(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:160] if text else type(error).__name__


def read_csv(path: Path, required: tuple[str, ...], *, limit: int | None = None) -> pd.DataFrame:
    """Read a CSV table with every column as text and empty cells as ``""``.

    Args:
        path: The CSV file (UTF-8).
        required: Columns that must be present.
        limit: The largest file read, in bytes (default :data:`MAX_TABLE_BYTES`); a larger one is refused before
            it is parsed.

    Returns:
        The table.

    Raises:
        DataError: If the file is missing, larger than ``limit``, not UTF-8, not a CSV, names a column
            twice, has rows wider than its header, or lacks a required column.
    """
    path = Path(path)
    _check_table_size(path, MAX_TABLE_BYTES if limit is None else limit)
    try:
        rows = pd.read_csv(path, header=None, dtype=str, keep_default_na=False, encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as error:
        raise DataError(f"{path}: cannot read the file ({error.strerror or error}); check that it is a readable file") from None
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text (byte {error.start}); save the CSV as UTF-8") from error
    except pd.errors.EmptyDataError:
        needs = f" with {', '.join(required)}" if required else ""
        raise DataError(f"{path}: CSV is empty; it needs a header row{needs}") from None
    except (pd.errors.ParserError, ValueError) as error:
        raise DataError(f"{path}: {_parse_failure(error)}; fix the file") from error
    table = rows.iloc[1:].reset_index(drop=True)
    table.columns = _header(path, list(rows.iloc[0]))
    require_columns(table, path, required)
    return table


def _check_table_size(path: Path, limit: int) -> None:
    """Refuse a CSV table larger than ``limit`` bytes before it is read."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as error:
        raise DataError(f"{path}: cannot read the file ({error.strerror or error}); check its permissions") from None
    if size > limit:
        raise DataError(f"{path}: {size:,} bytes, more than a CSV table medseg reads ({limit:,}); is it the right file?")


def _parse_failure(error: Exception) -> str:
    """What pandas could not parse, in words: rows wider than the header say which line."""
    wider = _FIELDS_MISMATCH.search(str(error))
    if wider:
        expected, line, saw = wider.groups()
        return f"line {line} has {saw} fields, more than the {expected} of the header (a trailing comma?)"
    return f"not a valid CSV ({_reason(error)})"


def _header(path: Path, names: list[str]) -> list[str]:
    """The column names of a header row as written (blanks stripped; an empty one ``Unnamed: N``), each once.

    Raises:
        DataError: If a name appears twice (pandas would silently rename the second, and its values be lost).
    """
    columns = [str(name).strip() or f"Unnamed: {index}" for index, name in enumerate(names)]
    seen = set()
    for column in columns:
        if column in seen:
            raise DataError(f"{path}: column {shown(column)} appears more than once in the header; keep one")
        seen.add(column)
    return columns


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
