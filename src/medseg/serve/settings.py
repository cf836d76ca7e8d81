"""What ``medseg serve`` is asked to do: :class:`ServeRequest`, passed to each worker process as JSON."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

from medseg.errors import UsageError
from medseg.serve.model import ModelOptions

MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
"""A model name: it is part of the API's paths (``/v2/models/{name}``)."""
LOOPBACK = ("127.0.0.1", "::1", "localhost")
TOKEN = re.compile(r"[!-~]{8,512}")
"""A bearer token: 8 to 512 visible ASCII characters (an HTTP header carries them as they are), no spaces."""


@dataclass(frozen=True)
class ServeRequest:
    """How to serve a run.

    Attributes:
        run: The run folder.
        host: The address to listen on (loopback unless told otherwise).
        port: The TCP port.
        model: Engine, TTA and pixel limit.
        token: The bearer token every route but the live probe needs; ``None``: no token.
        max_batch: The most frames predicted in one pass (frames of several requests together).
        max_queue: The most frames waiting to be predicted; a request past it gets 503 with ``Retry-After``.
        max_upload: The largest request body, in bytes (413 above).
        workers: Server processes, each with its own copy of the model and its own queue.
        name: The model's name in the API's paths; the run folder's name when it is one, else ``medseg``.
    """

    run: Path
    host: str = "127.0.0.1"
    port: int = 8000
    model: ModelOptions = field(default_factory=ModelOptions)
    token: str | None = None
    max_batch: int = 16
    max_queue: int = 64
    max_upload: int = 32 * 1024**2
    workers: int = 1
    name: str | None = None

    @cached_property
    def model_name(self) -> str:
        """The model's name in the API's paths."""
        if self.name is not None:
            return self.name
        folder = Path(self.run).resolve().name
        return folder if MODEL_NAME.fullmatch(folder) else "medseg"

    def check(self) -> None:
        """Refuse settings that cannot work, each in one line naming the option.

        Raises:
            UsageError: A model name outside :data:`MODEL_NAME`, a queue shorter than a batch, a token outside :data:`TOKEN`.
        """
        if self.name is not None and not MODEL_NAME.fullmatch(self.name):
            raise UsageError(f"--name {self.name[:70]!r}: use 1 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit")
        if self.max_queue < self.max_batch:
            raise UsageError(f"--max-queue {self.max_queue} is below --max-batch {self.max_batch}; a queue holds at least one batch")
        if self.token is not None and not TOKEN.fullmatch(self.token):
            raise UsageError(
                "--token: use 8 to 512 visible ASCII characters, no spaces "
                "(e.g. `python3 -c 'import secrets; print(secrets.token_urlsafe())'`)"
            )

    @property
    def loopback(self) -> bool:
        """Whether only this machine can reach the server."""
        return self.host in LOOPBACK or self.host.startswith("127.")

    def to_json(self) -> str:
        """The request as JSON (paths as text), for a worker process."""
        return json.dumps(asdict(self), default=str)

    @classmethod
    def from_json(cls, text: str) -> ServeRequest:
        """The request a parent process wrote with :meth:`to_json`."""
        values = json.loads(text)
        options = values.pop("model")
        onnx = options.pop("onnx")
        model = ModelOptions(**options, onnx=None if onnx is None else Path(onnx))
        return cls(**{**values, "run": Path(values["run"]), "model": model})
