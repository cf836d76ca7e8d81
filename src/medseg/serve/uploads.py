"""What clients send, read in memory and checked: the body within its size limit, multipart frames, KServe v2 tensors.

Nothing a client sends is written to disk: the body is read into memory up to ``--max-upload`` bytes (a larger
one is refused, from its ``Content-Length`` before a byte is read where it declares one), multipart parts are
parsed by python-multipart's streaming parser into memory (Starlette's form parsing would spool parts above
1 MB to a temporary file), and a frame is decoded from its bytes (:class:`medseg.data.io.FrameBytes`). A part's
file name is only shown: it is cleaned of control characters, cut short, and never names a file on the server.
Every problem is an :class:`HttpError` with its status and one line.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np

from medseg.data import intensity, io
from medseg.data.intensity import IntensityWindow
from medseg.data.io import FrameBytes
from medseg.errors import ImageReadError

MAX_NAME = 120
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
V2_TYPES = {"UINT8": np.uint8, "UINT16": np.uint16, "FP32": np.float32}
"""The tensor types ``/v2/models/{name}/infer`` takes for its ``image`` input."""


class HttpError(Exception):
    """A request the server refuses: its HTTP status, one line saying why, and headers to send.

    Attributes:
        status: The HTTP status.
        message: What is wrong and how to fix it.
        headers: Extra response headers (``Retry-After``, ``WWW-Authenticate``).
    """

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


@dataclass
class Part:
    """One part of a multipart body.

    Attributes:
        name: The form field's name.
        filename: The file name the client gave (``None`` for a plain form field).
        data: The part's bytes.
    """

    name: str = ""
    filename: str | None = None
    data: bytearray = field(default_factory=bytearray)


async def read_body(chunks: AsyncIterator[bytes], declared: str | None, limit: int) -> bytes:
    """The request's body, refused as soon as it is known to be larger than ``limit`` bytes.

    Args:
        chunks: The body as it arrives.
        declared: The ``Content-Length`` header, if any.
        limit: The most bytes taken (``--max-upload``).

    Raises:
        HttpError: 413 above the limit, 400 for a ``Content-Length`` that is not a number.
    """
    if declared is not None:
        if not declared.strip().isdigit():
            raise HttpError(400, f"Content-Length {declared[:40]!r} is not a number of bytes")
        if int(declared) > limit:
            raise HttpError(413, _too_large(int(declared), limit))
    from starlette.requests import ClientDisconnect

    body = bytearray()
    try:
        async for chunk in chunks:
            body += chunk
            if len(body) > limit:
                raise HttpError(413, _too_large(len(body), limit, at_least=True))
    except ClientDisconnect:
        raise HttpError(400, "the client went away before sending the whole body") from None
    return bytes(body)


def _too_large(size: int, limit: int, at_least: bool = False) -> str:
    return (
        f"the upload is {'more than ' if at_least else ''}{size:,} bytes, above the server's limit of {limit:,} "
        "(medseg serve --max-upload); send fewer frames per request"
    )


def multipart_boundary(content_type: str | None) -> bytes:
    """The boundary of a ``multipart/form-data`` request, checked before its body is read.

    Raises:
        HttpError: 415 for another content type, 400 for one without a boundary.
    """
    from python_multipart.multipart import parse_options_header

    kind, options = parse_options_header(content_type or "")
    if kind != b"multipart/form-data":
        raise HttpError(
            415, f"Content-Type {_shown(content_type or 'none')}; send the frames as multipart/form-data files (curl -F frames=@FILE)"
        )
    boundary = options.get(b"boundary")
    if not boundary:
        raise HttpError(400, "the multipart Content-Type has no boundary; let the client library build the request")
    return boundary


def multipart_frames(body: bytes, boundary: bytes, max_frames: int) -> list[FrameBytes]:
    """The files of a ``multipart/form-data`` body, as frames in memory, in the order sent.

    Args:
        body: The request's body.
        boundary: Its boundary (:func:`multipart_boundary`).
        max_frames: The most files one request may hold.

    Raises:
        HttpError: 400 for a body that does not parse, a form field that is not a file, or no file; 413 for more
            than ``max_frames`` files.
    """
    parts = _parts(body, boundary)
    fields = [part.name for part in parts if part.filename is None]
    if fields:
        raise HttpError(400, f"form field {_shown(fields[0])} is not a file; send each frame as a file part (curl -F frames=@FILE)")
    if not parts:
        raise HttpError(400, "the request holds no file; send one or several frames as file parts (curl -F frames=@FILE)")
    if len(parts) > max_frames:
        raise HttpError(413, f"{len(parts)} frames in one request, more than the server's {max_frames}; send them in several requests")
    return [FrameBytes(frame_name(part.filename, index), bytes(part.data)) for index, part in enumerate(parts, start=1)]


def _parts(body: bytes, boundary: bytes) -> list[Part]:
    """The parts of a multipart body, each with its field name, file name and bytes."""
    from python_multipart.multipart import MultipartParseError, MultipartParser, parse_options_header

    parts: list[Part] = []
    header: dict[str, bytearray] = {"field": bytearray(), "value": bytearray()}

    def header_end() -> None:
        if bytes(header["field"]).lower() == b"content-disposition":
            _, options = parse_options_header(bytes(header["value"]))
            parts[-1].name = options.get(b"name", b"").decode("utf-8", "replace")
            filename = options.get(b"filename")
            parts[-1].filename = None if filename is None else filename.decode("utf-8", "replace")
        header["field"].clear()
        header["value"].clear()

    ended = []
    callbacks = {
        "on_end": lambda: ended.append(True),
        "on_part_begin": lambda: parts.append(Part()),
        "on_part_data": lambda data, start, end: parts[-1].data.extend(data[start:end]),
        "on_header_field": lambda data, start, end: header["field"].extend(data[start:end]),
        "on_header_value": lambda data, start, end: header["value"].extend(data[start:end]),
        "on_header_end": header_end,
    }
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except (MultipartParseError, ValueError) as error:
        raise HttpError(400, f"the multipart body does not parse ({_shown(str(error))}); let the client library build it") from None
    if not ended:
        raise HttpError(400, "the multipart body ends before its closing boundary (cut short?); send it again")
    return parts


def frame_name(filename: str | None, index: int) -> str:
    """The name a posted frame is shown by: its file name without folders or control characters, cut short, else
    ``frame N``."""
    name = _CONTROL.sub("", (filename or "").replace("\\", "/").rsplit("/", 1)[-1]).strip()
    return name[:MAX_NAME] or f"frame {index}"


def _shown(text: str, limit: int = 60) -> str:
    """A client's text in a message: quoted, control characters dropped, cut to ``limit`` characters."""
    text = _CONTROL.sub("", text)
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


@dataclass(frozen=True)
class TensorRequest:
    """A KServe v2 inference request, checked: its frames and the outputs asked for.

    Attributes:
        frames: Gray frames as :func:`medseg.data.io.read_image` gives them.
        outputs: The names of the outputs to return (every one when the request names none).
        id: The request's id, returned with the answer.
    """

    frames: list[np.ndarray]
    outputs: list[str]
    id: str | None


def require_json(content_type: str | None) -> None:
    """Refuse a v2 inference request that is not JSON, before its body is read.

    Raises:
        HttpError: 415.
    """
    if (content_type or "").split(";")[0].strip().lower() != "application/json":
        raise HttpError(415, f"Content-Type {_shown(content_type or 'none')}; send the v2 request as application/json")


def v2_request(body: bytes, outputs: list[str], window: IntensityWindow, max_pixels: int, max_frames: int) -> TensorRequest:
    """The frames of a KServe v2 JSON inference request (input ``image``: ``[N, H, W]`` or ``[H, W]``, UINT8, UINT16
    or FP32, data flat or nested in row-major order).

    Frames deeper than 8 bits (UINT16, FP32) get the run's intensity window, as a 16-bit file would.

    Args:
        body: The request's body (JSON: :func:`require_json`).
        outputs: The outputs the model gives.
        window: The run's ``data.intensity_window``.
        max_pixels: The most pixels a frame may have.
        max_frames: The most frames one request may hold.

    Raises:
        HttpError: 400 for a request that is not a v2 request of the model's input (naming what), 413 for more frames
            than ``max_frames``, 422 for frames above the pixel limit or holding NaN.
    """
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise HttpError(400, f"the body is not JSON ({_shown(str(error))})") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list) or len(request["inputs"]) != 1:
        raise HttpError(400, 'a v2 request is {"inputs": [{"name": "image", "shape": [N, H, W], "datatype": "UINT8", "data": [...]}]}')
    tensor = request["inputs"][0]
    if not isinstance(tensor, dict) or tensor.get("name") != "image":
        raise HttpError(400, 'the model has one input, named "image"')
    parameters = tensor.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise HttpError(400, "the image input's parameters must be an object")
    if (parameters or {}).get("binary_data_size") is not None:
        raise HttpError(400, "the binary tensor extension is not supported; send the pixels as JSON data")
    values = _tensor_values(tensor, max_pixels, max_frames)
    frames = [_frame(values[index], window, index) for index in range(values.shape[0])]
    return TensorRequest(frames, _outputs(request.get("outputs"), outputs), _request_id(request.get("id")))


def _tensor_values(tensor: dict, max_pixels: int, max_frames: int) -> np.ndarray:
    """The ``image`` tensor's values as an (N, H, W) array of its type, its shape checked before its data is read."""
    datatype = tensor.get("datatype")
    if datatype not in V2_TYPES:
        raise HttpError(400, f"datatype {_shown(str(datatype))}; the image input takes {', '.join(V2_TYPES)}")
    shape = tensor.get("shape")
    if not isinstance(shape, list) or len(shape) not in (2, 3) or not all(isinstance(side, int) and side > 0 for side in shape):
        raise HttpError(400, f"shape {_shown(str(shape))}; the image input's shape is [N, H, W] or [H, W] with sides above 0")
    shape = [1, *shape] if len(shape) == 2 else shape
    if shape[0] > max_frames:
        raise HttpError(413, f"{shape[0]} frames in one request, more than the server's {max_frames}; send them in several requests")
    if shape[1] * shape[2] > max_pixels:
        raise HttpError(422, f"frames of {shape[2]}x{shape[1]} = {shape[1] * shape[2]:,} pixels, more than the limit of {max_pixels:,}")
    try:
        values = np.asarray(tensor.get("data"))
    except (TypeError, ValueError, OverflowError):
        values = np.asarray([])
    if values.dtype.kind not in "iuf" or (values.size == 0 and math.prod(shape)):
        raise HttpError(400, "the image data must be numbers, flat or nested in row-major order")
    values = values.astype(np.float64)
    if values.size != math.prod(shape):
        raise HttpError(400, f"the image data holds {values.size:,} values; shape {shape} needs {math.prod(shape):,}")
    return _typed(values.reshape(shape), datatype)


def _typed(values: np.ndarray, datatype: str) -> np.ndarray:
    """Values in the range and steps of their declared type."""
    target = V2_TYPES[datatype]
    if datatype == "FP32":
        bad = values.size - int(np.count_nonzero(np.isfinite(values)))
        if bad:
            raise HttpError(422, f"{bad:,} of {values.size:,} values of the image data are NaN or infinite; send finite values")
        return values.astype(np.float32)
    info = np.iinfo(target)
    finite = np.isfinite(values)
    if not finite.all() or values.min() < info.min or values.max() > info.max or not np.array_equal(values, np.round(values)):
        raise HttpError(400, f"{datatype} data must be whole numbers from {info.min} to {info.max}")
    return values.astype(target)


def _frame(values: np.ndarray, window: IntensityWindow, index: int) -> np.ndarray:
    """One tensor frame as :func:`medseg.data.io.read_image` makes a file's: 8-bit as it is, deeper data windowed."""
    name = f"image[{index}]"
    try:
        io.check_finite(values, name)
        return intensity.to_frame(values, window)
    except ImageReadError as error:
        raise HttpError(422, f"{name}: {error.reason}") from None
    except ValueError as error:
        raise HttpError(422, f"{name}: {error}") from None


def _outputs(asked, given: list[str]) -> list[str]:
    if asked is None:
        return list(given)
    if not isinstance(asked, list) or not all(isinstance(item, dict) and isinstance(item.get("name"), str) for item in asked):
        raise HttpError(400, 'outputs is a list of {"name": ...}')
    names = [item["name"] for item in asked]
    unknown = [name for name in names if name not in given]
    if unknown:
        raise HttpError(400, f"output {_shown(unknown[0])} is not one of the model's: {', '.join(given)}")
    return names


def _request_id(value) -> str | None:
    return None if value is None else _CONTROL.sub("", str(value))[:MAX_NAME]
