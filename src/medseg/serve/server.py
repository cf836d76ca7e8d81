"""``medseg serve``: the run's model loaded and checked, the port bound, then uvicorn serving :mod:`medseg.serve.app`.

Everything that can fail for a user's reason fails before the server starts, in one line: a run that is not
trained, a damaged checkpoint, an unknown engine, a port in use or not allowed. The server stops on SIGTERM or
Ctrl+C after finishing the requests in flight (uvicorn's graceful shutdown; the model thread then predicts what
is still queued). With ``--workers N`` uvicorn's supervisor starts N processes on the one socket, each loading
the model from the settings it is handed as JSON (:data:`REQUEST_VARIABLE`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
from collections.abc import Callable, Iterator

from medseg.errors import UsageError
from medseg.runs import open_run
from medseg.serve.settings import ServeRequest

REQUEST_VARIABLE = "MEDSEG_SERVE_REQUEST"
"""The environment variable a worker process reads its :class:`ServeRequest` from (JSON)."""
GRACEFUL_S = 60
"""How long a stopping server waits for the requests in flight before it closes their connections."""
_PACKAGES = {"fastapi": "fastapi", "uvicorn": "uvicorn", "python_multipart": "python-multipart"}


def require_packages() -> None:
    """Refuse to serve without the ``serve`` extra.

    Raises:
        UsageError: Naming the missing packages and the command that installs them.
    """
    missing = [name for module, name in _PACKAGES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise UsageError(f"medseg serve needs {', '.join(missing)}: pip install 'medseg[serve]'")


def serve(
    request: ServeRequest, on_message: Callable[[str], None] = print, announce: Callable[[str], None] = print, log_level: str = "info"
) -> None:
    """Load the run's model, bind the port and serve until SIGTERM or Ctrl+C.

    Args:
        request: The run and the server's settings.
        on_message: Told what is loaded (an ONNX export on first use).
        announce: Told what is served where (the port, when 0 was asked), and warned (a line starting ``warning:``)
            about a bind beyond this machine without a token.
        log_level: uvicorn's log level (``info`` logs each request; ``warning`` only problems).

    Raises:
        UsageError: On settings that cannot work, a missing extra, a port that cannot be bound.
        MedsegError: On a run that cannot be loaded (not trained, damaged files).
    """
    request.check()
    require_packages()
    from medseg.serve.model import ServedModel, check_servable

    run = open_run(request.run)
    if request.workers > 1:
        check_servable(run, request.model, on_message)  # a broken run is told before the port opens; each worker loads its own
    else:
        model = ServedModel(run, request.model, on_message)
    sock = bind(request.host, request.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    announce(
        f"serving {run.path} as model {request.model_name!r} ({len(run.folds)} fold model(s), {request.model.engine}, TTA "
        f"{request.model.tta}) on http://{shown}:{port}/ (the page; the API under /v2 and /v1/predict); SIGTERM or Ctrl+C stops it"
    )
    if not request.loopback and request.token is None:
        announce(
            f"warning: listening on {request.host} without --token: anyone who reaches this port can send frames; "
            "set --token (or MEDSEG_SERVE_TOKEN) and put a reverse proxy with TLS in front"
        )
    if request.workers > 1:
        _serve_processes(request, sock, log_level)
    else:
        _serve_here(request, model, sock, log_level)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: one the system picks).

    Raises:
        UsageError: If the address cannot be bound (in use, not this machine's, a port below 1024 without rights).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port} ({error.strerror or error}); choose another --port or --host") from None
    except (OverflowError, UnicodeError) as error:
        sock.close()
        raise UsageError(f"cannot listen on {host!r}:{port} ({error}); give an address of this machine and a port up to 65535") from None
    sock.set_inheritable(True)
    return sock


def _uvicorn_config(app, request: ServeRequest, log_level: str, **extra):
    import uvicorn

    return uvicorn.Config(
        app,
        log_level=log_level,
        timeout_graceful_shutdown=GRACEFUL_S,
        server_header=False,
        workers=request.workers,
        limit_concurrency=max(32, request.max_queue),  # bodies held at once (each up to --max-upload); more get 503
        **extra,
    )


def _serve_here(request: ServeRequest, model, sock: socket.socket, log_level: str) -> None:
    import uvicorn

    from medseg.serve.app import create_app

    server = uvicorn.Server(_uvicorn_config(create_app(request, model), request, log_level))
    with sock, _stopping_is_success():
        server.run(sockets=[sock])


@contextlib.contextmanager
def _stopping_is_success() -> Iterator[None]:
    """SIGTERM and Ctrl+C end the command with exit 0 once uvicorn has drained.

    uvicorn captures both signals for its graceful shutdown and, once done, raises them again for the handlers it
    found: with Python's own, SIGTERM would then kill the process (exit -15) and Ctrl+C raise KeyboardInterrupt
    after the server had stopped as asked. The handlers it finds here take them as done.
    """
    stops = (signal.SIGTERM, signal.SIGINT)
    previous = {stop: signal.signal(stop, lambda *_: None) for stop in stops}
    try:
        yield
    finally:
        for stop, handler in previous.items():
            signal.signal(stop, handler)


def _serve_processes(request: ServeRequest, sock: socket.socket, log_level: str) -> None:
    from uvicorn.supervisors import Multiprocess

    os.environ[REQUEST_VARIABLE] = request.to_json()
    config = _uvicorn_config("medseg.serve.server:worker_app", request, log_level, factory=True)
    with sock:
        Multiprocess(config, sockets=[sock]).run()


def worker_app():
    """The app of one worker process of ``--workers N``: the model loaded from the parent's settings."""
    from medseg.serve.app import create_app
    from medseg.serve.model import ServedModel

    request = ServeRequest.from_json(os.environ[REQUEST_VARIABLE])
    _share_cores(request.workers)
    return create_app(request, ServedModel(open_run(request.run), request.model, lambda _: None), warm_first=True)


def _share_cores(workers: int) -> None:
    """PyTorch's threads of one of ``workers`` processes: the usable cores shared among them, not each taking all."""
    import torch

    from medseg.devices import usable_cores

    torch.set_num_threads(max(1, usable_cores() // workers))
