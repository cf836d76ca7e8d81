"""The command of the serving stage: ``serve`` (the run's model as an HTTP API and a page)."""

from __future__ import annotations

from typing import Annotated

import typer

from medseg.cli.options import (
    EngineOption,
    OnnxOption,
    QuietOption,
    RunArgument,
    RunMaxPixelsOption,
    TtaOption,
    VflipOption,
    run_max_pixels,
    tta_mode,
)
from medseg.cli.printers import say, stderr, warn

MEGABYTE = 1024**2


def serve_command(
    run: RunArgument,
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on; the default answers this machine only (0.0.0.0: every network).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port (0: any free one, printed).", min=0, max=65535)] = 8000,
    engine: EngineOption = "torch",
    onnx_file: OnnxOption = None,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="MEDSEG_SERVE_TOKEN",
            help="Bearer token every route but /v2/health/live needs (Authorization: Bearer TOKEN); "
            "set MEDSEG_SERVE_TOKEN instead to keep it out of the process list.",
            show_envvar=False,
            metavar="TOKEN",
        ),
    ] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Most frames predicted in one pass, from concurrent requests.", min=1)] = 16,
    max_queue: Annotated[
        int,
        typer.Option(
            "--max-queue", help="Most frames waiting; a request beyond gets 503 with Retry-After (and the most per request).", min=1
        ),
    ] = 64,
    max_upload: Annotated[int, typer.Option("--max-upload", help="Largest request body in MB (413 above).", min=1, metavar="MB")] = 32,
    workers: Annotated[int, typer.Option("--workers", help="Server processes, each with its own model and queue.", min=1)] = 1,
    name: Annotated[str | None, typer.Option("--name", help="Model name in the API's paths (default: the run folder's name).")] = None,
    tta: TtaOption = True,
    vflip: VflipOption = False,
    max_pixels: RunMaxPixelsOption = None,
    quiet: QuietOption = False,
) -> int:
    """Serve the run's model over HTTP: KServe v2 (/v2), multipart frames (/v1/predict) and a page (/).

    The same frames give the masks and RLE of `medseg predict`. Nothing sent is written to disk. It listens on
    127.0.0.1 unless told otherwise: for other machines, put a reverse proxy with TLS (nginx, Caddy) in front and
    set a token. SIGTERM or Ctrl+C stops it after the requests in flight.
    """
    from medseg.serve.model import ModelOptions
    from medseg.serve.server import serve
    from medseg.serve.settings import ServeRequest

    request = ServeRequest(
        run, host, port, ModelOptions(engine, onnx_file, tta_mode(tta, vflip), run_max_pixels(max_pixels)), token, max_batch, max_queue,
        max_upload * MEGABYTE, workers, name,
    )  # fmt: skip
    serve(request, on_message=say(quiet), announce=_announce, log_level="warning" if quiet else "info")
    return 0


def _announce(line: str) -> None:
    """The serving line, and the warning about a wide bind without a token: shown with --quiet too."""
    if line.startswith("warning: "):
        warn(line.removeprefix("warning: "))
    else:
        stderr.print(line, highlight=False, markup=False)
