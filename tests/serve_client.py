"""A small HTTP client for the tests of ``medseg serve``, on the standard library only, and servers to test.

:class:`ThreadServer` runs an app in this process (its model can be a stand-in), :class:`ServerProcess` runs
``python -m medseg serve`` as a user would; both listen on a free loopback port.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from http.client import HTTPConnection
from pathlib import Path
from typing import Self

READY_TIMEOUT_S = 120


@dataclass
class Reply:
    """An HTTP answer: status, headers (lower-case names) and the JSON body (``None`` if it is not JSON)."""

    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self):
        try:
            return json.loads(self.body)
        except ValueError:
            return None


def multipart(files: list[tuple[str, bytes]], field: str = "frames", fields: dict[str, str] | None = None) -> tuple[bytes, str]:
    """A ``multipart/form-data`` body of files (name, bytes) and plain fields, and its Content-Type."""
    boundary = uuid.uuid4().hex
    chunks = []
    for name, value in (fields or {}).items():
        chunks.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, data in files:
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
        chunks.append(head.encode() + b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


def request(
    port: int, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None, timeout: float = 120
) -> Reply:
    """One request on a new connection to ``127.0.0.1:port``.

    A server may answer (413) and close before the body is sent whole: the answer is read all the same.
    """
    connection = HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        try:
            connection.request(method, path, body=body, headers=headers or {})
        except (BrokenPipeError, ConnectionResetError):
            pass
        response = connection.getresponse()
        return Reply(response.status, {key.lower(): value for key, value in response.getheaders()}, response.read())
    finally:
        connection.close()


def post_frames(port: int, files: list[tuple[str, bytes]], query: str = "", headers: dict[str, str] | None = None) -> Reply:
    """``POST /v1/predict`` with the files as multipart parts."""
    body, content_type = multipart(files)
    return request(port, "POST", f"/v1/predict{query}", body, {"Content-Type": content_type, **(headers or {})})


def post_json(port: int, path: str, payload, headers: dict[str, str] | None = None) -> Reply:
    """A JSON ``POST``."""
    return request(port, "POST", path, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})


def wait_ready(port: int, headers: dict[str, str] | None = None, timeout: float = READY_TIMEOUT_S) -> None:
    """Wait until ``/v2/health/ready`` answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if request(port, "GET", "/v2/health/ready", headers=headers, timeout=5).status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"the server on port {port} was not ready within {timeout} s")


class ThreadServer:
    """An app served by uvicorn on a thread of this process, on a free loopback port (a context manager)."""

    def __init__(self, app) -> None:
        import uvicorn

        from medseg.serve.server import bind

        self.sock = bind("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=30))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *_) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
        self.sock.close()


class ServerProcess:
    """``python -m medseg serve RUN --port 0 ...`` as a user starts it; the port is read from its serving line.

    Args:
        run: The run folder.
        *options: More command-line options.
        cwd: The working folder.
        env: More environment variables.
    """

    def __init__(self, run: Path, *options: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
        command = [sys.executable, "-m", "medseg", "serve", str(run), "--port", "0", *options]
        self.process = subprocess.Popen(
            command, cwd=cwd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.lines: list[str] = []
        self.port = self._port()
        self._reader = threading.Thread(target=self._read_rest, daemon=True)
        self._reader.start()

    def _port(self) -> int:
        for line in self.process.stderr:
            self.lines.append(line)
            if line.startswith("serving ") and " on http://" in line:
                return int(line.split(" on http://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
        self.process.wait(timeout=30)
        raise AssertionError(f"medseg serve exited {self.process.returncode} before serving:\n{''.join(self.lines)}")

    def _read_rest(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def stop(self, timeout: float = 120) -> int:
        """SIGTERM, then the exit code once the server has drained and stopped."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
