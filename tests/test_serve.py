"""``medseg serve``: the same masks as ``medseg predict``, the v2 protocol, batching, bad input, the token, draining.

The API tests serve a tuned copy of the tiny uns-mini run from uvicorn on a thread of this process; the tests of
the command line (SIGTERM, workers, the warning of a wide bind) start ``python -m medseg serve`` itself.
"""

from __future__ import annotations

import asyncio
import base64
import io as stdio
import json
import os
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from conftest import TINY_OVERRIDES, read_rows, set_args
from medseg.cli import main
from medseg.data import rle
from medseg.data.io import FrameBytes
from medseg.infer.outputs import PredictRequest, predict_folder
from medseg.runs import open_run
from medseg.serve.app import create_app
from medseg.serve.batcher import Batcher, Closed, QueueFull
from medseg.serve.model import ModelOptions, ServedModel
from medseg.serve.settings import ServeRequest
from serve_client import ServerProcess, ThreadServer, multipart, post_frames, post_json, request, wait_ready
from test_medical_files import SIIM_ID, sixteen_bit_copy, write_dicom
from test_structures import make_class_index

UNS_FRAMES = ("1", "2", "3", "5", "8", "13")
MAX_UPLOAD = 3 * 1024**2


@pytest.fixture(scope="module")
def tuned_run(tiny_uns_run, tmp_path_factory) -> Path:
    """A copy of the tiny uns-mini run, tuned (so that serving must apply a tuned post-processing, as predict does)."""
    run = tmp_path_factory.mktemp("served") / "run"
    shutil.copytree(tiny_uns_run, run, ignore=shutil.ignore_patterns("last.ckpt"))
    assert main(["tune", str(run), "--quiet", "--no-report"]) == 0
    return run


@pytest.fixture(scope="module")
def frames_folder(shared_data, tmp_path_factory) -> Path:
    """Frames in the formats a server takes: uns-mini TIFFs, 16-bit PNGs (usgra-seg frames), a real SIIM DICOM and a JPEG."""
    folder = tmp_path_factory.mktemp("frames") / "test"
    folder.mkdir()
    for name in UNS_FRAMES:
        shutil.copyfile(shared_data / "uns-mini" / "test" / f"{name}.tif", folder / f"{name}.tif")
    deep = sixteen_bit_copy(shared_data, tmp_path_factory.mktemp("deep"), names=("0000", "0012"))
    for path in sorted((deep / "images").iterdir()):
        shutil.copyfile(path, folder / f"deep{path.name}")
    shutil.copyfile(shared_data / "siim-sample" / "images" / f"{SIIM_ID}.dcm", folder / "radiograph.dcm")
    frame = cv2.imread(str(shared_data / "uns-mini" / "test" / "21.tif"), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(folder / "scan.jpg"), frame)
    return folder


@pytest.fixture(scope="module")
def served(tuned_run):
    """The tuned run served on a thread: ``(port, model)``; uploads above 3 MB are refused."""
    model = ServedModel(open_run(tuned_run), ModelOptions())
    app = create_app(ServeRequest(tuned_run, max_upload=MAX_UPLOAD, max_queue=32), model)
    with ThreadServer(app) as server:
        wait_ready(server.port)
        _BATCHERS[server.port] = app.state.service.batcher
        yield server.port, model


_BATCHERS: dict[int, Batcher] = {}


@pytest.fixture
def served_batcher() -> dict[int, Batcher]:
    """The batcher of each app :func:`served` serves, by port."""
    return _BATCHERS


def predicted(run: Path, folder: Path, out: Path, engine: str = "torch") -> tuple[dict[str, str], Path]:
    """``medseg predict``'s RLE by frame id, and its masks folder."""
    request = PredictRequest(run, folder, out=out / "submission.csv", masks_dir=out / "masks", engine=engine, allow_degenerate=True)
    predict_folder(request, on_message=lambda _: None)
    return {row[0]: row[1] for row in read_rows(out / "submission.csv")[1:]}, out / "masks"


def frame_id(path: Path) -> str:
    return path.stem


def test_the_served_masks_and_rle_are_predicts(served, tuned_run, frames_folder, tmp_path):
    port, model = served
    expected, masks = predicted(tuned_run, frames_folder, tmp_path)
    files = sorted(frames_folder.iterdir())
    reply = post_frames(port, [(path.name, path.read_bytes()) for path in files], "?masks=true")
    assert reply.status == 200, reply.body
    answer = reply.json
    assert [frame["name"] for frame in answer["frames"]] == [path.name for path in files]
    assert answer["run_id"] == model.run_id
    nonempty = 0
    for path, frame in zip(files, answer["frames"], strict=True):
        (structure,) = frame["structures"]
        assert structure["rle"] == expected[frame_id(path)], path.name
        mask = cv2.imdecode(np.frombuffer(base64.b64decode(structure["mask_png"]), np.uint8), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(mask, cv2.imread(str(masks / f"{frame_id(path)}.png"), cv2.IMREAD_UNCHANGED)), path.name
        assert structure["area"] == int(np.count_nonzero(mask)) and structure["present"] == bool(structure["area"])
        assert (frame["height"], frame["width"]) == mask.shape
        assert 0 <= structure["presence_probability"] <= 1
        nonempty += structure["present"]
    assert nonempty, "every served mask is empty: the comparison would not show a difference in the masks"


def test_metadata_tells_structures_size_tuning_and_rle(served, tuned_run):
    port, _ = served
    reply = request(port, "GET", f"/v2/models/{tuned_run.name}")
    assert reply.status == 200
    meta = reply.json
    assert meta["name"] == tuned_run.name and {item["name"] for item in meta["outputs"]} == {"mask", "presence", "area", "rle"}
    parameters = meta["parameters"]
    tuning = json.loads((tuned_run / "postprocess.json").read_text())
    assert parameters["tuned"] and parameters["postprocess"]["threshold"] == tuning["threshold"]
    assert parameters["input"]["height"] == 64 and parameters["input"]["width"] == 96
    assert parameters["rle"]["dialect"] == "kaggle" and parameters["structures"] == ["foreground"]
    assert request(port, "GET", "/v2").json["name"] == "medseg"
    assert request(port, "GET", "/v2/health/live").json == {"live": True}
    assert request(port, "GET", f"/v2/models/{tuned_run.name}/ready").status == 200


def test_v2_infer_of_the_pixels_gives_the_files_answer(served, tuned_run, frames_folder):
    port, _ = served
    tiff = frames_folder / "1.tif"
    deep = next(frames_folder.glob("deep*.png"))
    by_file = post_frames(port, [(tiff.name, tiff.read_bytes()), (deep.name, deep.read_bytes())]).json["frames"]
    for path, datatype, answer in ((tiff, "UINT8", by_file[0]), (deep, "UINT16", by_file[1])):
        pixels = np.asarray(Image.open(path))
        payload = {
            "id": "r-1",
            "inputs": [{"name": "image", "shape": [1, *pixels.shape], "datatype": datatype, "data": pixels.ravel().tolist()}],
        }
        reply = post_json(port, f"/v2/models/{tuned_run.name}/infer", payload)
        assert reply.status == 200, reply.body
        outputs = {output["name"]: output for output in reply.json["outputs"]}
        assert reply.json["id"] == "r-1" and reply.json["model_name"] == tuned_run.name
        assert outputs["rle"]["data"] == [answer["structures"][0]["rle"]] and outputs["rle"]["shape"] == [1, 1]
        assert outputs["area"]["data"] == [answer["structures"][0]["area"]]
        mask = np.array(outputs["mask"]["data"], np.uint8).reshape(outputs["mask"]["shape"])
        assert mask.shape == (1, 1, *pixels.shape) and np.array_equal(
            rle.decode(answer["structures"][0]["rle"], pixels.shape), mask[0, 0] == 1
        )
        assert outputs["presence"]["data"] == pytest.approx([answer["structures"][0]["presence_probability"]], abs=1e-6)
    only = post_json(port, f"/v2/models/{tuned_run.name}/infer", {**payload, "outputs": [{"name": "area"}]})
    assert [output["name"] for output in only.json["outputs"]] == ["area"]


def test_concurrent_requests_share_batches(served, frames_folder, served_batcher):
    port, _model = served
    data = (frames_folder / "1.tif").read_bytes()
    app_batcher = served_batcher[port]
    before = app_batcher.batches
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda _: post_frames(port, [("1.tif", data)]), range(16)))
    assert {reply.status for reply in replies} == {200}
    assert len({reply.json["frames"][0]["structures"][0]["rle"] for reply in replies}) == 1
    assert app_batcher.batches - before < 16, "16 concurrent one-frame requests were predicted one batch each"


def tiff_truncated(frames_folder: Path) -> bytes:
    return (frames_folder / "1.tif").read_bytes()[:5000]


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` gray pixels, with one row of data (a bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b"")


def dicom_without_pixels(tmp_path: Path) -> bytes:
    return write_dicom(tmp_path / "report.dcm", None).read_bytes()


@pytest.mark.parametrize(
    ("what", "upload", "status", "says"),
    [
        ("not an image", lambda folder, tmp: ("notes.txt", b"hello, not a frame"), 415, "not a TIFF, PNG, JPEG, BMP or DICOM"),
        ("an empty file", lambda folder, tmp: ("empty.tif", b""), 422, "empty.tif: file is empty"),
        ("a truncated TIFF", lambda folder, tmp: ("cut.tif", tiff_truncated(folder)), 422, "truncated"),
        ("a DICOM without pixels", lambda folder, tmp: ("report.dcm", dicom_without_pixels(tmp)), 422, "DICOM file holds no"),
        ("above the pixel limit", lambda folder, tmp: ("bomb.png", png_declaring(200_000, 100_000)), 422, "more than the limit"),
        ("a JPEG named .tif", lambda folder, tmp: ("x.tif", _jpeg()), 422, "file is a JPEG image named .tif"),
        ("an upload above --max-upload", lambda folder, tmp: ("big.tif", b"\0" * (MAX_UPLOAD + 1)), 413, "above the server's limit"),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_each_bad_frame_is_one_json_line_and_the_server_goes_on(served, frames_folder, tmp_path, what, upload, status, says):
    port, _ = served
    reply = post_frames(port, [upload(frames_folder, tmp_path)])
    assert reply.status == status, (what, reply.body)
    assert set(reply.json) == {"error"} and says in reply.json["error"] and "\n" not in reply.json["error"], reply.json
    good = post_frames(port, [("1.tif", (frames_folder / "1.tif").read_bytes())])
    assert good.status == 200


def _jpeg() -> bytes:
    buffer = stdio.BytesIO()
    Image.fromarray(np.full((20, 30), 128, np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_bad_requests_are_json_lines(served, tuned_run):
    port, _ = served
    infer = f"/v2/models/{tuned_run.name}/infer"
    cases = [
        (request(port, "POST", "/v1/predict", b"x=1", {"Content-Type": "application/x-www-form-urlencoded"}), 415, "multipart/form-data"),
        (request(port, "POST", "/v1/predict", *_form([("1.tif", b"")], {"comment": "hi"})), 400, "is not a file"),
        (request(port, "POST", "/v1/predict", *_form([])), 400, "holds no file"),
        (request(port, "GET", "/v2/models/other"), 404, "no model named 'other'"),
        (post_json(port, "/v2/models/other/infer", {}), 404, "no model named"),
        (request(port, "GET", "/etc/passwd"), 404, "no such route"),
        (request(port, "DELETE", "/v1/predict"), 405, "Method Not Allowed"),
        (request(port, "POST", infer, b"{}", {"Content-Type": "text/plain"}), 415, "application/json"),
        (request(port, "POST", infer, b"{nope", {"Content-Type": "application/json"}), 400, "not JSON"),
        (
            post_json(port, infer, {"inputs": [{"name": "image", "shape": [2, 2], "datatype": "INT64", "data": [1, 2, 3, 4]}]}),
            400,
            "datatype",
        ),
        (
            post_json(port, infer, {"inputs": [{"name": "image", "shape": [2, 2], "datatype": "UINT8", "data": [1, 2, 3]}]}),
            400,
            "holds 3 values",
        ),
        (
            post_json(port, infer, {"inputs": [{"name": "image", "shape": [1, 2], "datatype": "UINT8", "data": [1, 300]}]}),
            400,
            "whole numbers",
        ),
        (post_json(port, infer, {"inputs": [{"name": "image", "shape": [1, 2], "datatype": "FP32", "data": [1, "NaN"]}]}), 400, "numbers"),
        (
            post_json(port, infer, {"inputs": [{"name": "image", "shape": [1, 2], "datatype": "FP32", "data": [1, float("nan")]}]}),
            422,
            "NaN",
        ),
        (post_json(port, infer, {"inputs": [{"name": "image", "shape": [99999, 99999], "datatype": "UINT8", "data": []}]}), 422, "limit"),
        (
            post_json(port, infer, {"inputs": [{"name": "image", "shape": [40, 2, 2], "datatype": "UINT8", "data": [0] * 160}]}),
            413,
            "frames",
        ),
        (post_json(port, infer, {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "UINT8", "data": [0]}]}), 400, '"image"'),
        (post_json(port, infer, {"inputs": [_tiny_tensor()], "outputs": [{"name": "logits"}]}), 400, "not one of the model's"),
        (post_json(port, infer, {"inputs": [{**_tiny_tensor(), "parameters": "x"}]}), 400, "parameters must be an object"),
        (request(port, "POST", "/v1/predict", *_cut_form()), 400, "ends before its closing boundary"),
        (_other_origin(port), 403, "another site"),
    ]
    for reply, status, says in cases:
        assert reply.status == status and says in reply.json["error"], (status, says, reply.status, reply.body)
    assert request(port, "GET", "/v2/health/ready").status == 200


def _cut_form() -> tuple[bytes, dict[str, str]]:
    """A multipart body cut before its closing boundary (a client that died mid-upload)."""
    body, headers = _form([("1.tif", b"II*\x00" + b"\x00" * 200)])
    return body[: body.rindex(b"--", 0, len(body) - 4)], headers


def _other_origin(port: int):
    """A post a page of another site makes the browser send (a server without a token refuses it)."""
    body, headers = _form([("1.tif", b"x")])
    return request(port, "POST", "/v1/predict", body, {**headers, "Origin": "https://elsewhere.example"})


def _tiny_tensor() -> dict:
    return {"name": "image", "shape": [1, 4, 4], "datatype": "UINT8", "data": [0] * 16}


def _form(files: list[tuple[str, bytes]], fields: dict[str, str] | None = None) -> tuple[bytes, dict[str, str]]:
    """A multipart body and its headers."""
    body, content_type = multipart(files, fields=fields)
    return body, {"Content-Type": content_type}


def test_a_hostile_file_name_is_only_shown(served, frames_folder):
    port, _ = served
    reply = post_frames(port, [("../../etc/passwd\x1b[31m", (frames_folder / "1.tif").read_bytes())])
    assert reply.status == 200 and reply.json["frames"][0]["name"] == "passwd[31m"


def test_the_token_guards_every_route_but_the_live_probe(tuned_run, frames_folder):
    model = ServedModel(open_run(tuned_run), ModelOptions(tta="none"))
    token = "s3cret-token"
    with ThreadServer(create_app(ServeRequest(tuned_run, token=token), model)) as server:
        port, good = server.port, {"Authorization": f"Bearer {token}"}
        wait_ready(port, good)
        assert request(port, "GET", "/v2/health/live").status == 200
        frame = [("1.tif", (frames_folder / "1.tif").read_bytes())]
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": token}):
            for reply in (request(port, "GET", "/v2/health/ready", headers=headers), post_frames(port, frame, headers=headers)):
                assert (
                    reply.status == 401 and reply.headers["www-authenticate"] == "Bearer" and "Authorization: Bearer" in reply.json["error"]
                )
            assert request(port, "GET", f"/v2/models/{tuned_run.name}", headers=headers).status == 401
            assert post_json(port, f"/v2/models/{tuned_run.name}/infer", {"inputs": [_tiny_tensor()]}, headers).status == 401
        assert post_frames(port, frame, headers=good).status == 200
        assert request(port, "GET", f"/v2/models/{tuned_run.name}", headers=good).status == 200
        assert post_json(port, f"/v2/models/{tuned_run.name}/infer", {"inputs": [_tiny_tensor()]}, good).status == 200


class _SlowModel:
    """A stand-in for :class:`ServedModel` whose warm-up and predictions wait for events."""

    def __init__(self, model: ServedModel) -> None:
        self.model = model
        self.warmed = threading.Event()
        self.go = threading.Event()
        self.started = threading.Event()

    def __getattr__(self, name):
        return getattr(self.model, name)

    def warm_up(self) -> None:
        self.warmed.wait(60)

    def predict(self, frames):
        self.started.set()
        self.go.wait(60)
        return self.model.predict(frames)


def test_not_ready_while_warming_up_and_503_when_the_queue_is_full(tuned_run, frames_folder):
    slow = _SlowModel(ServedModel(open_run(tuned_run), ModelOptions(tta="none")))
    frame = [("1.tif", (frames_folder / "1.tif").read_bytes())]
    with ThreadServer(create_app(ServeRequest(tuned_run, max_batch=1, max_queue=2), slow)) as server:
        port = server.port
        ready = request(port, "GET", "/v2/health/ready")
        assert ready.status == 503 and ready.headers["retry-after"] == "1" and "warming up" in ready.json["error"]
        assert post_frames(port, frame).status == 503
        slow.warmed.set()
        wait_ready(port)
        with ThreadPoolExecutor(4) as pool:
            first = pool.submit(post_frames, port, frame)
            assert slow.started.wait(30)  # one frame is being predicted; two more fill the queue
            queued = [pool.submit(post_frames, port, frame) for _ in range(2)]
            deadline = time.monotonic() + 30
            while model_queue(server) < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            refused = post_frames(port, frame)
            too_many = post_frames(port, frame * 3)
            slow.go.set()
            assert refused.status == 503 and refused.headers["retry-after"] == "1" and "busy" in refused.json["error"]
            assert too_many.status == 413 and "more than the server's 2" in too_many.json["error"]
            assert [future.result().status for future in [first, *queued]] == [200, 200, 200]


def model_queue(server: ThreadServer) -> int:
    return server.server.config.app.state.service.batcher.queued


_WRITES: list[str] = []
_WATCHING = threading.Event()


def _record_writes(event: str, arguments: tuple) -> None:
    """An audit hook: every file opened for writing while :data:`_WATCHING` is set (temporary files included)."""
    if event == "open" and _WATCHING.is_set():
        path, mode, flags = arguments
        writing = (mode is not None and any(letter in str(mode) for letter in "wax+")) or (
            isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        )
        if writing:
            _WRITES.append(str(path))


def test_a_request_never_writes_to_disk(tuned_run, frames_folder, tmp_path):
    model = ServedModel(open_run(tuned_run), ModelOptions(tta="none"))
    noise = np.random.default_rng(0).integers(0, 65535, (800, 800), dtype=np.uint16)
    big = [("noise.png", cv2.imencode(".png", noise)[1].tobytes()), ("1.tif", (frames_folder / "1.tif").read_bytes())]
    assert len(big[0][1]) > 1024**2  # a part Starlette's form parsing would spool to a temporary file
    sys.addaudithook(_record_writes)
    _WATCHING.set()
    with tempfile.TemporaryFile():  # the hook sees what a spooled part would become: an unnamed temporary file
        _WATCHING.clear()
    assert _WRITES, "the audit hook missed a temporary file"
    _WRITES.clear()
    with ThreadServer(create_app(ServeRequest(tuned_run, max_upload=64 * 1024**2), model)) as server:
        wait_ready(server.port)
        _WATCHING.set()
        try:
            assert post_frames(server.port, big, "?masks=true&preview=true").status == 200
            assert post_json(server.port, "/v2/models/run/infer", {"inputs": [_tiny_tensor()]}).status == 200
        finally:
            _WATCHING.clear()
    assert not [path for path in _WRITES if "__pycache__" not in path], _WRITES


def test_the_onnx_engine_answers_as_predict_with_it(tuned_run, frames_folder, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tuned_run, run)
    one = tmp_path / "one"
    one.mkdir()
    shutil.copyfile(frames_folder / "2.tif", one / "2.tif")
    expected, _ = predicted(run, one, tmp_path, engine="onnx")  # exports RUN/model.onnx on first use
    model = ServedModel(open_run(run), ModelOptions(engine="onnx"))
    with ThreadServer(create_app(ServeRequest(run), model)) as server:
        wait_ready(server.port)
        reply = post_frames(server.port, [("2.tif", (one / "2.tif").read_bytes())])
        meta = request(server.port, "GET", "/v2/models/run").json
    assert reply.json["frames"][0]["structures"][0]["rle"] == expected["2"]
    assert meta["platform"] == "onnxruntime_onnx" and meta["parameters"]["engine"] == "onnx"


def test_sigterm_finishes_the_requests_in_flight(tuned_run, frames_folder, tmp_path):
    data = [(path.name, path.read_bytes()) for path in sorted(frames_folder.glob("*.tif"))] * 6  # 36 frames a request
    with ServerProcess(tuned_run, "--quiet", "--max-batch", "4", "--max-queue", "200", "--tta", "--vflip", cwd=tmp_path) as server:
        wait_ready(server.port)
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(post_frames, server.port, data) for _ in range(4)]
            time.sleep(1.5)
            in_flight = sum(not future.done() for future in futures)
            server.process.send_signal(signal.SIGTERM)
            assert refuses_connections(server.port, within=10), "the server still took connections 10 s after SIGTERM"
            replies = [future.result(timeout=300) for future in futures]
        code = server.stop()
    assert in_flight, "every request was answered before SIGTERM: nothing was in flight to finish"
    assert [reply.status for reply in replies] == [200] * 4, [reply.body[:200] for reply in replies]
    assert all(len(reply.json["frames"]) == 36 for reply in replies)
    assert code == 0, server.stderr


def refuses_connections(port: int, within: float) -> bool:
    """Whether the port refuses new connections within ``within`` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        except ConnectionRefusedError:
            return True
        time.sleep(0.1)
    return False


def test_several_worker_processes_serve_and_stop(tuned_run, frames_folder, tmp_path):
    with ServerProcess(tuned_run, "--quiet", "--workers", "2", "--tta", cwd=tmp_path) as server:
        wait_ready(server.port)
        replies = [post_frames(server.port, [("1.tif", (frames_folder / "1.tif").read_bytes())]) for _ in range(3)]
        code = server.stop()
    assert [reply.status for reply in replies] == [200] * 3
    assert code == 0, server.stderr


def test_a_wide_bind_without_a_token_warns(tuned_run, monkeypatch, capsys):
    served = []
    monkeypatch.setattr("medseg.serve.server._serve_here", lambda request, model, sock, level: served.append(request) or sock.close())
    assert main(["serve", str(tuned_run), "--host", "0.0.0.0", "--port", "0"]) == 0
    err = capsys.readouterr().err
    assert "warning: listening on 0.0.0.0 without --token" in " ".join(err.split()) and served[0].host == "0.0.0.0"
    assert main(["serve", str(tuned_run), "--host", "0.0.0.0", "--port", "0", "--token", "t0ken-t0ken"]) == 0
    assert "without --token" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("arguments", "says"),
    [
        (["--port", "{busy}"], "cannot listen on 127.0.0.1:{busy}"),
        (["--name", "../x"], "--name '../x': use 1 to 64 letters"),
        (["--max-batch", "8", "--max-queue", "4"], "--max-queue 4 is below --max-batch 8"),
        (["--engine", "tensorrt"], "--engine 'tensorrt'; use torch or onnx"),
        (["--onnx", "missing.onnx", "--engine", "onnx"], "missing.onnx: not found"),
        (["--token", " "], "--token: use 8 to 512 visible ASCII characters"),
        (["--token", "short"], "--token: use 8 to 512 visible ASCII characters"),
    ],
)
def test_serve_mistakes_are_one_line(tuned_run, capsys, arguments, says):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        code = main(["serve", str(tuned_run), *[argument.replace("{busy}", port) for argument in arguments]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and says.replace("{busy}", port) in err, err


def test_not_a_run_and_a_missing_extra_are_one_line(tmp_path, tuned_run, capsys, monkeypatch):
    assert main(["serve", str(tmp_path)]) == 2
    assert "not a medseg run folder" in capsys.readouterr().err
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name == "uvicorn" else real(name, *rest))
    assert main(["serve", str(tuned_run)]) == 2
    assert "pip install 'medseg[serve]'" in capsys.readouterr().err


def batch_runner(batches: list[list], fail_on=None):
    def predict(frames):
        batches.append(list(frames))
        if fail_on is not None and fail_on in frames:
            raise RuntimeError("out of memory")
        return [f"answer {frame}" for frame in frames]

    return predict


def test_the_batcher_joins_requests_keeps_their_order_and_splits_big_ones():
    batches: list[list] = []
    batcher = Batcher(batch_runner(batches), max_batch=4, max_queue=20, max_wait=0.2)
    batcher.start()

    async def clients():
        return await asyncio.gather(batcher.predict([1, 2]), batcher.predict([3]), batcher.predict([4, 5, 6, 7, 8, 9]))

    answers = asyncio.run(clients())
    batcher.close()
    assert answers == [["answer 1", "answer 2"], ["answer 3"], [f"answer {n}" for n in (4, 5, 6, 7, 8, 9)]]
    assert batches == [[1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_the_batcher_refuses_past_its_queue_hands_errors_on_and_drains_when_closed():
    batches: list[list] = []
    gate = threading.Event()
    runner = batch_runner(batches, fail_on="bad")

    def gated(frames):
        gate.wait(30)
        return runner(frames)

    batcher = Batcher(gated, max_batch=2, max_queue=3, max_wait=0.0)
    batcher.start()

    async def clients():
        first = asyncio.ensure_future(batcher.predict(["a"]))
        await asyncio.sleep(0.2)  # "a" is being predicted; the queue is empty again
        waiting = [asyncio.ensure_future(batcher.predict(["bad"])), asyncio.ensure_future(batcher.predict(["c", "d"]))]
        await asyncio.sleep(0.1)
        with pytest.raises(QueueFull):
            await batcher.predict(["e"])
        gate.set()
        results = await asyncio.gather(first, *waiting, return_exceptions=True)
        closing = threading.Thread(target=batcher.close)
        closing.start()
        closing.join(10)
        with pytest.raises(Closed):
            await batcher.predict(["f"])
        return results

    first, failed, last = asyncio.run(clients())
    assert first == ["answer a"] and isinstance(failed, RuntimeError) and last == ["answer c", "answer d"]


def test_a_frames_answer_does_not_depend_on_the_frames_batched_with_it(served, frames_folder):
    _, model = served
    eight = np.asarray(Image.open(frames_folder / "1.tif"))
    deep = model.read(FrameBytes("deep.png", next(frames_folder.glob("deep*.png")).read_bytes()))
    assert eight.dtype == np.uint8 and deep.dtype == np.float32
    (alone,) = model.predict([eight])
    beside, _ = model.predict([eight, deep])
    # the same input to the network; the kernels' sums may differ in the last digits with the batch's size (about 6e-8):
    # resized as float beside a deep frame, the 8-bit frame differed by 4e-4 in presence
    assert np.array_equal(alone.masks, beside.masks)
    assert np.abs(alone.presence - beside.presence).max() < 1e-6


def test_a_failed_batch_fails_only_the_request_that_broke_it():
    def predict(frames):
        if "bad" in frames:
            raise RuntimeError("CUDA out of memory")
        return [f"answer {frame}" for frame in frames]

    batcher = Batcher(predict, max_batch=8, max_queue=8, max_wait=0.2)
    batcher.start()

    async def clients():
        return await asyncio.gather(batcher.predict(["a"]), batcher.predict(["bad"]), batcher.predict(["c"]), return_exceptions=True)

    first, failed, last = asyncio.run(clients())
    batcher.close()
    assert first == ["answer a"] and last == ["answer c"] and "out of memory" in str(failed)


def test_the_pixels_in_flight_are_bounded(tuned_run, frames_folder, monkeypatch):
    monkeypatch.setattr("medseg.serve.app.MAX_PIXELS_IN_FLIGHT", 600_000)
    slow = _SlowModel(ServedModel(open_run(tuned_run), ModelOptions(tta="none", max_pixels=300_000)))
    slow.warmed.set()
    frame = [("1.tif", (frames_folder / "1.tif").read_bytes())]  # 580 x 420 = 243,600 pixels
    with ThreadServer(create_app(ServeRequest(tuned_run), slow)) as server:
        wait_ready(server.port)
        too_big = post_frames(server.port, frame * 3)
        assert too_big.status == 413 and "more than the server holds at once (600,000)" in too_big.json["error"]
        with ThreadPoolExecutor(2) as pool:
            held = pool.submit(post_frames, server.port, frame * 2)  # 487,200 pixels held until answered
            assert slow.started.wait(30)
            refused = post_frames(server.port, frame)
            slow.go.set()
            assert held.result().status == 200
        assert refused.status == 503 and "pixels" in refused.json["error"] and refused.headers["retry-after"] == "1"
        assert post_frames(server.port, frame).status == 200


@pytest.fixture(scope="module")
def two_structure_run(tmp_path_factory, shared_data) -> tuple[Path, Path]:
    """A tiny one-fold run of two structures (nerve, vessel) from usgra-seg's class-index masks, and its frames."""
    data = make_class_index(tmp_path_factory.mktemp("two") / "class-index", shared_data)
    run = data.parent / "run"
    args = ["train", str(data), "--classes", "nerve=1,vessel=2", "--out", str(run), "--preset", "cpu", "--quiet", "--no-report"]
    assert main([*args, *set_args(*TINY_OVERRIDES, "trainer.max_epochs=1")]) == 0
    return run, data / "images"


def test_a_run_of_two_structures_answers_each_as_predicts_long_table(two_structure_run, tmp_path):
    run, images = two_structure_run
    predict_folder(PredictRequest(run, images, out=tmp_path / "long.csv", allow_degenerate=True), on_message=lambda _: None)
    expected = {(row[0], row[1]): row[2] for row in read_rows(tmp_path / "long.csv")[1:]}
    model = ServedModel(open_run(run), ModelOptions())
    with ThreadServer(create_app(ServeRequest(run), model)) as server:
        wait_ready(server.port)
        files = sorted(images.iterdir())
        reply = post_frames(server.port, [(path.name, path.read_bytes()) for path in files])
        meta = request(server.port, "GET", "/v2/models/run").json["parameters"]
    assert meta["structures"] == ["nerve", "vessel"] and len(set(meta["colours"])) == 2
    for path, frame in zip(files, reply.json["frames"], strict=True):
        assert [structure["structure"] for structure in frame["structures"]] == ["nerve", "vessel"]
        for structure in frame["structures"]:
            assert structure["rle"] == expected[(path.stem, structure["label"])], (path.name, structure["structure"])
