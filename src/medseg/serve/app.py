"""The HTTP API of ``medseg serve``: the Open Inference Protocol (KServe v2), ``/v1/predict`` for files, and the page.

Routes:

- ``GET /v2/health/live``: the process answers (the one route without the token).
- ``GET /v2/health/ready``, ``GET /v2/models/{name}/ready``: 200 once the model is loaded and warmed up, else 503.
- ``GET /v2``: the server's metadata; ``GET /v2/models/{name}``: the model's (structures, input size and
  normalisation, the tuned post-processing, the RLE convention, medseg's version, the run's identity).
- ``POST /v2/models/{name}/infer``: a v2 JSON tensor request (input ``image``, ``[N, H, W]``); outputs ``mask``,
  ``presence`` (with a presence head), ``area`` and ``rle``, each ``[N, C]`` (``mask`` ``[N, C, H, W]``).
- ``POST /v1/predict``: frames as multipart files (TIFF, PNG, JPEG, BMP, DICOM; 8 or 16 bit); per frame and
  structure: present, presence probability, area, RLE in the run's dialect and, with ``?masks=true``, the mask as
  a base64 PNG (``?preview=true`` adds the frame as the model saw it, as an 8-bit PNG, for the page).
- ``GET /``: the page (:mod:`medseg.serve.page`).

Every error is JSON, ``{"error": "one line"}`` (v2's error form), with its status: 400 a malformed request, 401 a
missing or wrong token, 403 a post from a page of another site (without a token), 404 an unknown model or route, 413
an upload above ``--max-upload``, or more frames or pixels than the server ever holds at once, 415 a content type or
file format the server does not read, 422 a frame that cannot be read (empty, truncated, above the pixel limit, a
DICOM without pixels), 503 (with ``Retry-After``) while warming up, with the queue or the pixel budget full (told
before the frames are decoded) or while stopping. The server goes on serving after each.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import secrets
import sys
import threading
import traceback
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from medseg import __version__
from medseg.data.intensity import as_eight_bit
from medseg.data.io import FrameBytes
from medseg.devices import usable_cores
from medseg.errors import ImageReadError, UnsupportedFormatError
from medseg.infer.outputs import mask_png
from medseg.serve.batcher import Batcher, Closed, PixelBudget, QueueFull
from medseg.serve.model import Answer, ServedModel
from medseg.serve.page import page_html
from medseg.serve.settings import ServeRequest
from medseg.serve.uploads import HttpError, TensorRequest, multipart_boundary, multipart_frames, read_body, require_json, v2_request

RETRY_AFTER = {"Retry-After": "1"}
MAX_PIXELS_IN_FLIGHT = 2**27
"""The most pixels of frames a server process holds at once, from decoding to the answer (about 134 million: some
GB of memory at the ten or so bytes a pixel costs on its way); at least ``--max-pixels``, so that one frame always fits."""
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}
PAGE_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data: blob:; connect-src 'self'; "
    "form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)


class Service:
    """The model, its batcher and whether it is ready, for one server process.

    Args:
        request: The server's settings.
        model: The loaded model.
    """

    def __init__(self, request: ServeRequest, model: ServedModel) -> None:
        self.request = request
        self.model = model
        self.batcher = Batcher(model.predict, request.max_batch, request.max_queue)
        self.budget = PixelBudget(max(MAX_PIXELS_IN_FLIGHT, model.max_pixels))
        self.decoders = asyncio.Semaphore(usable_cores())
        self.ready = False
        self.problem = "the model is warming up"

    def start(self) -> None:
        """Start the model thread, and warm the model up in the background (ready once done)."""
        self.batcher.start()
        threading.Thread(target=self.warm_up, name="medseg-warm-up", daemon=True).start()

    def warm_up(self) -> None:
        """Predict a blank frame once (the lazy set-up done); ready after it, else why not."""
        try:
            self.model.warm_up()
        except Exception as error:  # noqa: BLE001 - told by the ready probe and on stderr; the process stays up to tell it
            self.problem = f"the model failed to warm up ({str(error).splitlines()[0][:160] if str(error) else type(error).__name__})"
            traceback.print_exc(file=sys.stderr)
            return
        self.ready = True

    def stop(self) -> None:
        """Predict what is waiting, then stop the model thread."""
        self.batcher.close()

    def require_ready(self) -> None:
        """Refuse a prediction before the model is warmed up.

        Raises:
            HttpError: 503 with ``Retry-After``.
        """
        if not self.ready:
            raise HttpError(503, f"not ready: {self.problem}", RETRY_AFTER)

    def require_model(self, name: str) -> None:
        """Refuse a model name that is not the one served.

        Raises:
            HttpError: 404 naming the model served.
        """
        if name != self.request.model_name:
            raise HttpError(
                404,
                f"no model named {name[:64]!r}; this server serves {self.request.model_name!r} (GET /v2/models/{self.request.model_name})",
            )

    def require_room(self, frames: int) -> None:
        """Refuse a request whose frames the queue cannot take now, before they are decoded.

        Raises:
            HttpError: 413 for more frames than the queue ever holds, 503 with ``Retry-After`` when it is full now.
        """
        if frames > self.request.max_queue:
            raise HttpError(
                413, f"{frames} frames in one request, more than the server's {self.request.max_queue}; send them in several requests"
            )
        if self.batcher.queued + frames > self.request.max_queue:
            raise HttpError(
                503, f"busy: {self.batcher.queued} frames are waiting, the most is {self.request.max_queue}; retry in a moment", RETRY_AFTER
            )

    @contextlib.contextmanager
    def holding(self, pixels: int) -> Iterator[None]:
        """Hold the pixels of a request's frames from decoding to its answer (:class:`~medseg.serve.batcher.PixelBudget`).

        Raises:
            HttpError: 413 for more pixels than the server ever holds, 503 with ``Retry-After`` when it holds too many now.
        """
        if pixels > self.budget.limit:
            raise HttpError(
                413,
                f"the frames hold {pixels:,} pixels, more than the server holds at once ({self.budget.limit:,}); send fewer frames",
            )
        try:
            with self.budget.reserved(pixels):
                yield
        except QueueFull as error:
            raise HttpError(503, f"busy: {error}; retry in a moment", RETRY_AFTER) from None

    async def decoded(self, function, *arguments):
        """``function(*arguments)`` on a worker thread, at most one a core at once (decoding holds memory and CPU)."""
        async with self.decoders:
            return await run_in_threadpool(function, *arguments)

    async def answers(self, frames: list[np.ndarray]) -> list[Answer]:
        """The frames' answers from a shared batch.

        Raises:
            HttpError: 503 with ``Retry-After`` when the queue is full or the server stops; 500 when prediction fails.
        """
        self.require_ready()
        try:
            return await self.batcher.predict(frames)
        except QueueFull as error:
            raise HttpError(503, f"busy: {error}; retry in a moment", RETRY_AFTER) from None
        except Closed:
            raise HttpError(503, "the server is stopping; retry on another replica or once it is back", RETRY_AFTER) from None


def create_app(request: ServeRequest, model: ServedModel, *, warm_first: bool = False) -> FastAPI:
    """The FastAPI app serving ``model`` with ``request``'s settings.

    Args:
        request: The server's settings (token, limits, model name).
        model: The loaded model.
        warm_first: Warm the model up before the server takes connections (one of several worker processes on one
            port: the kernel would hand a cold one requests it could only refuse); else in the background while the
            live probe already answers (ready once done).
    """
    service = Service(request, model)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if warm_first:
            await run_in_threadpool(service.warm_up)
            if not service.ready:
                raise RuntimeError(service.problem)  # uvicorn stops this worker instead of serving only 503s
            service.batcher.start()
        else:
            service.start()
        try:
            yield
        finally:
            service.stop()  # uvicorn has finished the requests in flight by now

    app = FastAPI(title="medseg", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    _add_error_handlers(app)
    _add_headers(app, check_origin=request.token is None)
    authorised = [Depends(_token_check(request.token))]
    _add_health_routes(app, service, authorised)
    _add_v2_routes(app, service, authorised)
    _add_v1_routes(app, service, authorised)
    page = page_html()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def the_page() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_POLICY})

    return app


def _token_check(token: str | None):
    """A dependency that refuses a request without ``Authorization: Bearer TOKEN`` (nothing when no token is set)."""
    expected = None if token is None else f"Bearer {token}".encode()

    async def check(request: Request) -> None:
        if expected is None:
            return
        given = request.headers.get("authorization", "").encode("utf-8", "replace")
        if not secrets.compare_digest(given, expected):
            raise HttpError(401, "missing or wrong token; send the header Authorization: Bearer TOKEN", {"WWW-Authenticate": "Bearer"})

    return check


def _add_health_routes(app: FastAPI, service: Service, authorised: list) -> None:
    @app.get("/v2/health/live")
    async def live() -> dict:
        return {"live": True}

    @app.get("/v2/health/ready", dependencies=authorised)
    async def ready() -> JSONResponse:
        return _readiness(service)

    @app.get("/v2/models/{name}/ready", dependencies=authorised)
    async def model_ready(name: str) -> JSONResponse:
        service.require_model(name)
        return _readiness(service)


def _readiness(service: Service) -> JSONResponse:
    if service.ready:
        return JSONResponse({"ready": True})
    return JSONResponse({"ready": False, "error": service.problem}, status_code=503, headers=RETRY_AFTER)


def _add_v2_routes(app: FastAPI, service: Service, authorised: list) -> None:
    request_settings = service.request

    @app.get("/v2", dependencies=authorised)
    async def server_metadata() -> dict:
        return {"name": "medseg", "version": __version__, "extensions": []}

    @app.get("/v2/models/{name}", dependencies=authorised)
    async def model_metadata(name: str) -> dict:
        service.require_model(name)
        return service.model.metadata(name)

    @app.post("/v2/models/{name}/infer", dependencies=authorised)
    async def infer(name: str, request: Request) -> Response:
        service.require_model(name)
        service.require_ready()
        require_json(request.headers.get("content-type"))
        body = await read_body(request.stream(), request.headers.get("content-length"), request_settings.max_upload)
        model = service.model
        window = model.run.config.data.intensity_window
        asked = await service.decoded(v2_request, body, model.output_names, window, model.max_pixels, request_settings.max_queue)
        service.require_room(len(asked.frames))
        with service.holding(sum(frame.size for frame in asked.frames)):
            answers = await service.answers(asked.frames)
            return await run_in_threadpool(_v2_reply, model, name, asked, answers)


def _add_v1_routes(app: FastAPI, service: Service, authorised: list) -> None:
    settings = service.request

    @app.post("/v1/predict", dependencies=authorised)
    async def predict(request: Request, masks: bool = False, preview: bool = False) -> Response:
        service.require_ready()
        boundary = multipart_boundary(request.headers.get("content-type"))
        body = await read_body(request.stream(), request.headers.get("content-length"), settings.max_upload)
        uploads = await run_in_threadpool(multipart_frames, body, boundary, settings.max_queue)
        service.require_room(len(uploads))
        pixels = await service.decoded(_declared_pixels, service.model, uploads)
        with service.holding(pixels):
            frames = await service.decoded(_read_frames, service.model, uploads)
            answers = await service.answers(frames)
            return await run_in_threadpool(_v1_reply, service, uploads, frames, answers, masks, preview)


def _declared_pixels(model: ServedModel, uploads: list[FrameBytes]) -> int:
    """The pixels the uploads' headers declare, each checked against the pixel limit, before anything is decoded.

    Raises:
        HttpError: As :func:`_read_frames`.
    """
    return sum(math.prod(_readable(model.size, upload)) for upload in uploads)


def _read_frames(model: ServedModel, uploads: list[FrameBytes]) -> list[np.ndarray]:
    """The frames of the uploads, read as ``medseg predict`` reads files.

    Raises:
        HttpError: 415 for a format the readers do not know, 422 for a frame that cannot be read (naming it).
    """
    return [_readable(model.read, upload) for upload in uploads]


def _readable(read, upload: FrameBytes):
    """``read(upload)``, its file errors as HTTP errors: 415 for an unknown format, 422 for a frame that cannot be read."""
    try:
        return read(upload)
    except UnsupportedFormatError as error:
        raise HttpError(415, f"{error.path}: not a TIFF, PNG, JPEG, BMP or DICOM image; send one of those") from None
    except ImageReadError as error:
        raise HttpError(422, f"{error.path}: {error.reason}") from None


def _v1_reply(
    service: Service, uploads: list[FrameBytes], frames: list[np.ndarray], answers: list[Answer], masks: bool, preview: bool
) -> Response:
    """The answer of ``/v1/predict``: each frame's name, size and structures (and its preview), as JSON."""
    results = []
    for upload, frame, answer in zip(uploads, frames, answers, strict=True):
        result = {
            "name": upload.name,
            "height": frame.shape[0],
            "width": frame.shape[1],
            "structures": service.model.structures_of(answer, with_masks=masks),
        }
        if preview:
            result["preview_png"] = base64.b64encode(mask_png(as_eight_bit(frame), scale=1)).decode("ascii")
        results.append(result)
    return json_response({"model": service.request.model_name, "run_id": service.model.run_id, "frames": results})


def _v2_reply(model: ServedModel, name: str, asked: TensorRequest, answers: list[Answer]) -> Response:
    """The answer of a v2 inference request, as JSON."""
    reply = {"model_name": name, "model_version": __version__, "outputs": model.v2_outputs(answers, asked.outputs)}
    return json_response(reply if asked.id is None else {**reply, "id": asked.id})


def json_response(content: dict, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """JSON serialised here (on a worker thread for large answers), not by FastAPI's encoder on the event loop."""
    return Response(json.dumps(content, separators=(",", ":")).encode(), status, headers, media_type="application/json")


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HttpError)
    async def refused(_: Request, error: HttpError) -> JSONResponse:
        return JSONResponse({"error": error.message}, status_code=error.status, headers=error.headers)

    @app.exception_handler(HTTPException)
    async def routing(_: Request, error: HTTPException) -> JSONResponse:
        message = {404: "no such route; the API is under /v2 and /v1/predict, the page at /"}.get(error.status_code, str(error.detail))
        return JSONResponse({"error": message}, status_code=error.status_code, headers=getattr(error, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()))
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid request')}"}, status_code=422)

    @app.exception_handler(Exception)
    async def failed(_: Request, error: Exception) -> JSONResponse:
        traceback.print_exception(error, file=sys.stderr)
        reason = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
        return json_response({"error": f"the server failed on this request ({reason}); it goes on serving"}, 500, SECURITY_HEADERS)


def _add_headers(app: FastAPI, check_origin: bool) -> None:
    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        if check_origin and (refusal := _cross_origin(request)) is not None:
            return json_response({"error": refusal}, 403, SECURITY_HEADERS)
        response = await call_next(request)
        for key, value in SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        return response


def _cross_origin(request: Request) -> str | None:
    """Why a request sent by a web page of another site is refused (a server without a token), else ``None``.

    A browser posts a form to any address a page names, this server's on 127.0.0.1 too, without asking it first; it
    says which page sent it in ``Origin``. Without a token, a request whose ``Origin`` is not the server's own address
    (its ``Host``) is refused. A reverse proxy must then pass the ``Host`` its clients asked for (nginx:
    ``proxy_set_header Host $host``), or the server be given a token.
    """
    origin = request.headers.get("origin")
    if request.method in ("GET", "HEAD", "OPTIONS") or origin is None:
        return None
    if urlsplit(origin).netloc.lower() == request.headers.get("host", "").lower():
        return None
    return "a request from a page of another site (its Origin is not this server's address); without --token it answers its own page only"
