"""The server under load: ``medseg serve`` answering 1, 4 and 16 concurrent clients, beside ``medseg predict`` on the same frames.

What is measured, on this machine, over loopback only:

- ``medseg predict``: :func:`medseg.infer.outputs.predict_folder` called in this process on the chosen test frames with
  the same run (TTA hflip, batch 16, ``--out`` a CSV). Its time includes everything the command does: opening the run,
  reading and decoding the frames, loading the fold models, the ensemble with TTA, the post-processing, the RLE, the
  submission's validation and writing the CSV. One call first warms the process up (PyTorch's lazy set-up), then
  ``--predict-repeats`` calls are timed and the fastest taken (the least disturbed by other work; it also makes the
  target harder to meet). Two rates: the whole call, and the steady state, which leaves out the time spent loading the
  models (a timing wrapper around ``load_engine`` for the timed calls).
- ``medseg serve RUN --port 0 --quiet`` as a subprocess (``--max-batch``/``--max-queue`` passed through), and for each
  client count one arm: that many threads, each with one persistent ``http.client`` connection, posting one frame per
  request (multipart ``frames``, bodies built once per frame) to ``/v1/predict`` in a loop over the frames, each
  client starting at a different frame. After ``--warmup`` seconds the arm is measured for ``--seconds`` (or until
  ``--max-requests`` answers). Frames/s counts the frames answered 200 within the window; a request's latency runs
  from its first attempt to its 200, waits after a 503 included (a 503 is counted and retried after its
  ``Retry-After``, never dropped); errors (any non-200 or a broken connection, 503s also counted apart) are counted
  over the whole arm, warm-up included. The server's and the clients' CPU use is read over each arm.
- Correctness: every RLE the server returns, in every arm, is compared with the RLE ``predict`` wrote to its CSV for
  the same frame id (the file's stem); the bench fails if any differ, or if the server does not exit 0 on SIGTERM.

Without ``--run`` a run is trained into a temporary folder with the cpu preset (1 epoch of 2 batches, no pretrained
weights): inference costs the same whatever the training, as it depends only on the preset's model and input size
(and on the frames' size, 580x420 here). A barely trained model predicts large, ragged masks, so its RLEs are longer
than a good model's: the answers' JSON and RLE cost is, if anything, overstated. Such a run is not tuned (both sides
use the default threshold), and its submission may be degenerate: ``predict`` validates it but writes it with a
warning (``allow_degenerate``) instead of refusing it.

Server and clients share this machine's cores (2 here): the clients' CPU is taken from the server, and the table
shows how much. The clients wait for each answer before the next request, so latency is about clients / frames/s.

    python bench/serve_load.py            # 3 arms of 3 + 20 s after training a run: about 2 minutes on 2 idle cores
    python bench/serve_load.py --quick    # 8 frames, arms of 1 + 3 s: a check that the bench works
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
CLIENT_COUNTS = (1, 4, 16)
TARGET_RATIO = 0.8
TARGET_P99_S = 2.0
BOUNDARY = "medseg-bench-serve-load-boundary"
SERVING_LINE = re.compile(r"serving .* on http://127\.0\.0\.1:(\d+)/")
TRAIN_SETTINGS = ("trainer.max_epochs=1", "trainer.limit_train_batches=2", "model.encoder_weights=none")
REQUEST_TIMEOUT_S = 120.0
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 90.0


@dataclass(frozen=True)
class Upload:
    """One test frame as a client posts it: its id (the file's stem), file name and multipart body, built once."""

    id: str
    name: str
    body: bytes


@dataclass
class Tally:
    """What one client saw in one arm."""

    latencies: list[float] = field(default_factory=list)
    answered: int = 0
    refused: int = 0
    errors: int = 0
    first_error: str | None = None
    matched: int = 0
    mismatched: list[str] = field(default_factory=list)


class Clock:
    """An arm's timing: a warm-up, then a measured window that ends after ``seconds`` or once ``cap`` answers are counted.

    Args:
        warmup: Seconds before the window opens.
        seconds: The window's length.
        cap: The most answers counted in the window.
    """

    def __init__(self, warmup: float, seconds: float, cap: int) -> None:
        self.begin = time.monotonic()
        self.start = self.begin + warmup
        self.stop = self.start + seconds
        self.cap = cap
        self.counted = 0
        self._lock = threading.Lock()

    def over(self) -> bool:
        """Whether the clients should send no new request."""
        return time.monotonic() >= self.stop

    def count(self, ended: float) -> bool:
        """Count an answer ended at ``ended`` if it falls in the window (closing the window at the cap)."""
        with self._lock:
            if not self.start <= ended < self.stop:
                return False
            self.counted += 1
            if self.counted >= self.cap:
                self.stop = ended
            return True

    @property
    def window(self) -> float:
        """The measured window's length in seconds."""
        return self.stop - self.start


def parse_args() -> argparse.Namespace:
    """The bench's options, with ``--quick``'s smaller defaults filled in."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=SHARED / "uns-mini", help="Data folder; its test/*.tif are posted (default uns-mini).")
    parser.add_argument("--run", type=Path, default=None, help="A trained run (default: train a cpu-preset one in a temporary folder).")
    parser.add_argument("--quick", action="store_true", help="Check that the bench works: 8 frames, arms of 1 + 3 s.")
    parser.add_argument("--frames", type=int, default=None, help="How many test frames (default: all; 8 with --quick).")
    parser.add_argument("--seconds", type=float, default=None, help="Measured seconds per arm (default 20; 3 with --quick).")
    parser.add_argument("--warmup", type=float, default=None, help="Seconds of load before an arm is measured (default 3; 1 with --quick).")
    parser.add_argument("--max-requests", type=int, default=5000, help="The most answers counted per arm (ends the window early).")
    parser.add_argument("--predict-repeats", type=int, default=None, help="Timed predict calls, fastest taken (default 3; 2 with --quick).")
    parser.add_argument("--max-batch", type=int, default=16, help="The server's --max-batch.")
    parser.add_argument("--max-queue", type=int, default=64, help="The server's --max-queue.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the figures here.")
    args = parser.parse_args()
    quick = args.quick
    args.frames = args.frames or (8 if quick else None)
    args.seconds = args.seconds or (3.0 if quick else 20.0)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if quick else 3.0)
    args.predict_repeats = args.predict_repeats or (2 if quick else 3)
    return args


def trained_run(data: Path, folder: Path) -> Path:
    """A cpu-preset run trained through the CLI for a moment: enough to serve (inference costs the same whatever the training)."""
    run = folder / "run"
    settings = [item for setting in TRAIN_SETTINGS for item in ("--set", setting)]
    command = [sys.executable, "-m", "medseg", "train", str(data), "--out", str(run), "--preset", "cpu", "--quiet", "--no-report"]
    command += settings
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"training the run failed ({done.returncode}):\n{done.stdout[-3000:]}")
    return run


def describe_run(run: Path) -> dict:
    """What sets the run's inference cost: input size, architecture, encoder, folds, structures."""
    from medseg.runs import open_run

    opened = open_run(run)
    config = opened.config
    if opened.classes:
        raise SystemExit(f"{run}: a run of several structures; this bench compares one structure's RLE with predict's CSV")
    return {
        "path": str(run),
        "input": f"{config.input.height}x{config.input.width}",
        "model": f"{config.model.arch} {config.model.encoder}",
        "folds": len(opened.folds),
        "presence_head": config.model.presence_head,
    }


def chosen_frames(data: Path, count: int | None, folder: Path) -> list[Path]:
    """The first ``count`` test frames (all when ``None``), copied into ``folder`` for ``predict``; the copies."""
    found = sorted((data / "test").glob("*.tif"), key=lambda path: (len(path.stem), path.stem))
    if not found:
        raise SystemExit(f"{data / 'test'}: no *.tif frames")
    folder.mkdir(parents=True)
    return [Path(shutil.copy2(path, folder / path.name)) for path in found[:count]]


@contextlib.contextmanager
def timed_model_loading() -> Iterator[list[float]]:
    """Wrap ``predict_folder``'s ``load_engine`` to add up the seconds it takes; restored on leaving."""
    from medseg.infer import outputs

    original = outputs.load_engine
    spent: list[float] = []

    def load_engine(*args, **kwargs):
        began = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - began)

    outputs.load_engine = load_engine
    try:
        yield spent
    finally:
        outputs.load_engine = original


def predict_reference(run: Path, frames: Path, folder: Path, repeats: int) -> dict:
    """``medseg predict`` on the frames in this process: one warm-up call, then ``repeats`` timed calls (the fastest).

    Returns:
        Frames, whole-call and steady-state (without model loading) frames/s, seconds, model-loading seconds, the cores
        it kept busy, and the CSV of the last call.
    """
    from medseg.infer.outputs import PredictRequest, predict_folder

    def call(out: Path) -> dict:
        request = PredictRequest(run, frames, out=out, tta="hflip", batch_size=16, allow_degenerate=True)
        return predict_folder(request, on_message=lambda _: None)

    call(folder / "warm-up.csv")
    timings = []
    for index in range(repeats):
        out = folder / f"predict-{index}.csv"
        with timed_model_loading() as loading:
            began, cpu = time.perf_counter(), time.process_time()
            count = call(out)["frames"]
            seconds, cpu = time.perf_counter() - began, time.process_time() - cpu
        timings.append({"seconds": seconds, "loading_seconds": sum(loading), "cores_busy": cpu / seconds, "csv": out})
    best = min(timings, key=lambda timing: timing["seconds"])
    steady = best["seconds"] - best["loading_seconds"]
    return {**best, "frames": count, "whole_fps": count / best["seconds"], "steady_fps": count / steady}


def csv_rles(path: Path) -> dict[str, str]:
    """The RLE of each frame id in a submission (``img,pixels``)."""
    with open(path, newline="") as stream:
        return {row[0]: row[1] for row in list(csv.reader(stream))[1:]}


def upload_of(path: Path) -> Upload:
    """A frame's multipart body (one ``frames`` file part), built once."""
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="frames"; filename="{path.name}"\r\nContent-Type: image/tiff\r\n\r\n'
    ).encode()
    return Upload(path.stem, path.name, head + path.read_bytes() + f"\r\n--{BOUNDARY}--\r\n".encode())


class Server:
    """``medseg serve RUN --port 0 --quiet`` as a subprocess: started, its port read from stderr, ready, then stopped with SIGTERM.

    Args:
        run: The run to serve.
        max_batch: The server's ``--max-batch``.
        max_queue: The server's ``--max-queue``.
    """

    def __init__(self, run: Path, max_batch: int, max_queue: int) -> None:
        command = [sys.executable, "-m", "medseg", "serve", str(run), "--port", "0", "--quiet"]
        command += ["--max-batch", str(max_batch), "--max-queue", str(max_queue)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._port_found = threading.Event()
        self.port: int | None = None
        threading.Thread(target=self._read_stderr, name="server-stderr", daemon=True).start()

    def _read_stderr(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))
            if self.port is None and (match := SERVING_LINE.search(line)):
                self.port = int(match.group(1))
                self._port_found.set()
        self._port_found.set()

    def wait_ready(self) -> None:
        """Wait for the serving line and for ``/v2/health/ready`` to answer 200.

        Raises:
            SystemExit: If the server exits or is not ready within :data:`START_TIMEOUT_S`.
        """
        deadline = time.monotonic() + START_TIMEOUT_S
        self._port_found.wait(START_TIMEOUT_S)
        while time.monotonic() < deadline:
            if self.process.poll() is not None or self.port is None:
                break
            if self._ready_status() == 200:
                return
            time.sleep(0.2)
        self.process.kill()
        raise SystemExit("the server did not become ready:\n" + "\n".join(self.lines[-30:]))

    def _ready_status(self) -> int | None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            connection.request("GET", "/v2/health/ready")
            response = connection.getresponse()
            response.read()
            return response.status
        except OSError:
            return None
        finally:
            connection.close()

    def cpu_seconds(self) -> float:
        """The server process's user and system CPU seconds so far (Linux ``/proc``; NaN elsewhere)."""
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> int:
        """Send SIGTERM and wait for the exit; its exit code (killed after :data:`STOP_TIMEOUT_S`: -9)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def post_frame(connection: http.client.HTTPConnection, upload: Upload) -> tuple[int, http.client.HTTPMessage, bytes]:
    """Post one frame on a persistent connection; its status, headers and body."""
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}", "Content-Length": str(len(upload.body))}
    connection.request("POST", "/v1/predict", body=upload.body, headers=headers)
    response = connection.getresponse()
    return response.status, response.headers, response.read()


def retry_after(headers: http.client.HTTPMessage) -> float:
    """Seconds a 503 asks to wait (1 when it says nothing readable)."""
    try:
        return max(0.0, float(headers.get("Retry-After", "1")))
    except ValueError:
        return 1.0


def check_answer(payload: bytes, upload: Upload, expected: dict[str, str], tally: Tally) -> None:
    """Compare the RLE the server gave a frame with the one ``predict`` wrote for its id."""
    try:
        answer = json.loads(payload)["frames"][0]
        name, rle = answer["name"], answer["structures"][0]["rle"]
    except (ValueError, KeyError, IndexError, TypeError):
        name, rle = None, None  # an answer of another shape: counted as differing
    if name == upload.name and rle == expected[upload.id]:
        tally.matched += 1
    else:
        tally.mismatched.append(upload.id)


def note_error(tally: Tally, message: str) -> None:
    """Count an error, keeping the first one's message."""
    tally.errors += 1
    tally.first_error = tally.first_error or message


def serve_one_frame(connection, upload: Upload, clock: Clock, tally: Tally) -> tuple[int, bytes] | None:
    """Post a frame until it is answered with something else than 503 (waiting ``Retry-After`` after each 503).

    Returns:
        The final status and body, or ``None`` when the arm ended while waiting or the connection broke.
    """
    while True:
        try:
            status, headers, payload = post_frame(connection, upload)
        except (OSError, http.client.HTTPException) as error:
            connection.close()
            note_error(tally, f"{type(error).__name__}: {error}")
            time.sleep(0.1)  # a broken connection: not a hot loop of errors while the arm lasts
            return None
        if status != 503:
            return status, payload
        tally.refused += 1
        note_error(tally, f"503: {payload[:200].decode('utf-8', 'replace')}")
        time.sleep(retry_after(headers))
        if clock.over():
            return None


def run_client(port: int, uploads: list[Upload], first: int, expected: dict[str, str], clock: Clock, tally: Tally) -> None:
    """One client: a persistent connection posting the frames one per request, from ``first`` on, until the arm ends."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
    position = first
    try:
        while not clock.over():
            upload = uploads[position % len(uploads)]
            position += 1
            began = time.monotonic()
            outcome = serve_one_frame(connection, upload, clock, tally)
            ended = time.monotonic()
            if outcome is None:
                continue
            status, payload = outcome
            if status != 200:
                note_error(tally, f"{status}: {payload[:200].decode('utf-8', 'replace')}")
                continue
            check_answer(payload, upload, expected, tally)
            if clock.count(ended):
                tally.answered += 1
                tally.latencies.append(ended - began)
    finally:
        connection.close()


def run_arm(server: Server, uploads: list[Upload], expected: dict[str, str], clients: int, args: argparse.Namespace) -> dict:
    """``clients`` concurrent clients for one warm-up and one measured window: frames/s, latencies, errors, CPU."""
    tallies = [Tally() for _ in range(clients)]
    server_cpu, client_cpu, began = server.cpu_seconds(), time.process_time(), time.perf_counter()
    clock = Clock(args.warmup, args.seconds, args.max_requests)
    threads = [
        threading.Thread(target=run_client, args=(server.port, uploads, index * len(uploads) // clients, expected, clock, tally))
        for index, tally in enumerate(tallies)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    latencies = [latency for tally in tallies for latency in tally.latencies]
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99]) if latencies else (float("nan"),) * 3
    return {
        "clients": clients,
        "fps": sum(tally.answered for tally in tallies) / clock.window,
        "answered": sum(tally.answered for tally in tallies),
        "window_s": clock.window,
        "p50": float(p50),
        "p95": float(p95),
        "p99": float(p99),
        "errors": sum(tally.errors for tally in tallies),
        "refused": sum(tally.refused for tally in tallies),
        "first_error": next((tally.first_error for tally in tallies if tally.first_error), None),
        "matched": sum(tally.matched for tally in tallies),
        "mismatched": sorted({frame for tally in tallies for frame in tally.mismatched}),
        "server_cores": (server.cpu_seconds() - server_cpu) / wall,
        "client_cores": (time.process_time() - client_cpu) / wall,
    }


def print_report(machine: dict, run: dict, predict: dict, arms: list[dict], args: argparse.Namespace) -> bool:
    """The table, the machine and run, the RLE check and the verdict; whether the target is met."""
    steady = predict["steady_fps"]
    print(
        f"\nmachine: {machine['cores']} cores usable ({machine['cpus']} in all), torch.get_num_threads() {machine['threads']} "
        "(the server's default is the same); server and clients share these cores, over loopback"
    )
    print(
        f"run: {run['path']}: {run['model']}, input {run['input']}, {run['folds']} fold model(s), presence head {run['presence_head']}, "
        f"TTA hflip; {predict['frames']} test frames (580x420 8-bit TIFF). Inference costs the same however long the run trained."
    )
    print(
        f"server: --max-batch {args.max_batch} --max-queue {args.max_queue}; arms of {args.warmup:g} s warm-up + {args.seconds:g} s "
        f"measured (at most {args.max_requests} answers); latency per request from its first attempt to its 200\n"
    )
    print("| clients | frames/s | ratio to predict (steady) | p50 s | p95 s | p99 s | errors (503s) | server cores | client cores |")
    print("|---|---|---|---|---|---|---|---|---|")
    for arm in arms:
        print(
            f"| {arm['clients']} | {arm['fps']:.1f} | {arm['fps'] / steady:.2f}x | {arm['p50']:.3f} | {arm['p95']:.3f} | {arm['p99']:.3f} "
            f"| {arm['errors']} ({arm['refused']}) | {arm['server_cores']:.2f} | {arm['client_cores']:.2f} |"
        )
    print(f"| predict | {steady:.1f} steady ({predict['whole_fps']:.1f} whole call) | 1.00x | | | | | {predict['cores_busy']:.2f} | |\n")
    print(
        f"predict: the fastest of {args.predict_repeats} call(s): {predict['seconds']:.2f} s for {predict['frames']} frames, of which "
        f"{predict['loading_seconds']:.2f} s loading the models; the call reads the frames, loads the models, predicts with TTA, "
        "post-processes, encodes the RLE, validates and writes the CSV; steady = without the model loading"
    )
    for arm in arms:
        if arm["first_error"]:
            print(f"{arm['clients']} clients: first error: {arm['first_error']}")
    last = arms[-1]
    met = last["fps"] >= TARGET_RATIO * steady and last["errors"] == 0 and last["p99"] < TARGET_P99_S
    print(
        f"target (16 clients: >= {TARGET_RATIO}x predict's steady frames/s, zero errors, p99 < {TARGET_P99_S:g} s): "
        f"{'met' if met else 'NOT met'} ({last['clients']} clients: {last['fps'] / steady:.2f}x, {last['errors']} errors, "
        f"p99 {last['p99']:.3f} s; {last['fps'] / predict['whole_fps']:.2f}x predict's whole call)"
    )
    return met


def check_rles(arms: list[dict]) -> None:
    """Print how many answers matched predict's CSV; stop the bench if any differed."""
    matched = sum(arm["matched"] for arm in arms)
    mismatched = sorted({frame for arm in arms for frame in arm["mismatched"]})
    print(f"RLE check: {matched} answers equal to predict's CSV for their frame, {len(mismatched)} frame(s) differ")
    if mismatched:
        raise SystemExit(f"the server's RLE differs from predict's for frame(s) {', '.join(mismatched[:10])}")
    if matched == 0:
        raise SystemExit("no answer was checked: the server answered nothing")


def load_arms(run: Path, uploads: list[Upload], expected: dict[str, str], args: argparse.Namespace) -> tuple[list[dict], int, list[str]]:
    """Start the server, run one arm per client count, stop it with SIGTERM; the arms, its exit code and its stderr."""
    server = Server(run, args.max_batch, args.max_queue)
    arms = []
    try:
        server.wait_ready()
        for clients in CLIENT_COUNTS:
            arms.append(run_arm(server, uploads, expected, clients, args))
            print(f"{clients} clients: {arms[-1]['fps']:.1f} frames/s, p99 {arms[-1]['p99']:.3f} s", flush=True)
    finally:
        code = server.stop()
    return arms, code, server.lines


def main() -> None:
    args = parse_args()
    import torch

    began = time.perf_counter()
    machine = {"cores": len(os.sched_getaffinity(0)), "cpus": os.cpu_count(), "threads": torch.get_num_threads()}
    work = Path(tempfile.mkdtemp(prefix="medseg-serve-load-"))
    try:
        run = args.run or trained_run(args.data, work)
        described = describe_run(run)
        frames = chosen_frames(args.data, args.frames, work / "frames")
        predict = predict_reference(run, work / "frames", work, args.predict_repeats)
        print(f"predict: {predict['steady_fps']:.1f} frames/s steady, {predict['whole_fps']:.1f} whole call", flush=True)
        arms, code, lines = load_arms(run, [upload_of(path) for path in frames], csv_rles(predict["csv"]), args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    met = print_report(machine, described, predict, arms, args)
    if len(lines) > 1:
        print("server stderr besides its serving line:", *lines[1:][-20:], sep="\n")
    print(f"server stopped by SIGTERM: exit code {code}; the bench took {time.perf_counter() - began:.0f} s")
    if args.json:
        figures = {"machine": machine, "run": described, "predict": {**predict, "csv": None}, "arms": arms, "target_met": met}
        args.json.write_text(json.dumps(figures, indent=2))
    check_rles(arms)
    if code != 0:
        raise SystemExit(
            f"the server exited {code} on SIGTERM, not 0 (-{signal.SIGTERM.value}: it died of the signal itself, which uvicorn "
            "re-raises after its graceful shutdown)"
        )


if __name__ == "__main__":
    main()
