"""Held-out predictions kept in the run folder: each frame predicted once per run, read back by ``tune``, ``evaluate``
and ``report`` (the first of them to need a group's predictions makes and keeps them).

```
RUN/held_out/
  fold_K.TTA.npz     fold K's validation frames, each predicted by fold K's model (TTA: none, hflip or hvflip)
  left_out.TTA.npz   the frames the run left out of training, predicted by the ensemble of every fold
```
A file is a zip (``numpy.load`` reads it) of one ``ID.npy`` per frame, the frame's probabilities at its own size, one
plane per structure, quantised to ``uint8`` (:func:`quantise`), and ``kept.json`` (:class:`KeptPredictions`): what
they were made from (the checkpoints' and ``config.yaml``'s digests, the TTA, each frame's content digest) and each
frame's presence probabilities, exact.

Why 8 bits at the frame's size: read back, the probabilities need no resizing, and a frame of Kaggle's size (580x420)
took 53 KB deflated on average on uns-mini instead of 952 KB as float32 (BENCHMARKS.md, "Stages after training"). The
quantisation ``q = #{k in 1..240 : p >= k/240}`` (compared in float64), read back as ``q / 240``, keeps every threshold
that is a multiple of 1/240 exact: each one of ``tune``'s grid (steps of 0.05) and the default 0.5 splits the read-back
probabilities where it split the original ones, so tuned and evaluated scores are the ones the unquantised
probabilities give. A threshold off that grid (one written by hand) is applied within 1/240.

Kept predictions are used only while they describe the run as it is: the same best checkpoints (a retrained or
resumed fold whose best checkpoint changed has its own fold's predictions made again, and ``left_out``'s, which every
fold predicts; nothing else), the same ``config.yaml``, the same TTA, the same frames by exact content and the same
prediction method (:data:`METHOD`). Anything else, or a file that does not read back in full, is predicted again and
replaced: the files are a record of the run's own computation, never trusted over it. They are a cache: where the run
folder cannot be written (a shared, read-only run) the predictions are made and used without being kept.
"""

from __future__ import annotations

import hashlib
import io as bytes_io
import json
import math
import os
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from pydantic import Field

from medseg.config import MAX_STRUCTURES
from medseg.errors import MedsegError
from medseg.files import MAX_TEXT_BYTES, atomic_write, first_line
from medseg.infer.predict import Prediction, check_tta
from medseg.runs import FoldDir, Run, RunFile

LEVELS = 240  # quantisation steps: 1/240 divides 0.05 (tune's grid) and 0.5 (the default threshold)
# How a model's outputs become the kept probabilities (TTA averaging, resizing back, quantisation): raise it with any
# change to that code, so that files made the old way are predicted again instead of read.
METHOD = 1
META = "kept.json"
_THRESHOLDS = np.arange(1, LEVELS + 1, dtype=np.float64) / LEVELS
_NPY_HEADER = 4096  # at most this many bytes of .npy header before a member's values
_CHUNK = 1 << 20
# What a damaged, truncated, encrypted or foreign zip raises on reading: the file is only a cache, predicted again
_UNREADABLE = (OSError, zipfile.BadZipFile, zlib.error, ValueError, KeyError, EOFError, NotImplementedError, RuntimeError, MedsegError)


class KeptPredictions(RunFile):
    """``kept.json`` of a kept group: what its predictions were made from, and each frame's presence.

    Attributes:
        group: ``fold_K`` or ``left_out``.
        checkpoints: The SHA-256 of each predicting fold's best checkpoint, by fold number.
        config: The SHA-256 of the run's ``config.yaml`` (input size, model) when they were made.
        tta: The test-time augmentation.
        levels: Quantisation steps of the probabilities (:data:`LEVELS`).
        method: The prediction method they were made with (:data:`METHOD`).
        structures: Probability planes per frame.
        frames: Each frame's exact content digest (:func:`exact_digest`), by id, in prediction order.
        presence: Each frame's presence probability per structure, in [0, 1], or ``None`` for every frame without a
            presence head.
    """

    group: str
    checkpoints: dict[str, str]
    config: str
    tta: str
    levels: int = LEVELS
    method: int
    structures: int = Field(ge=1, le=MAX_STRUCTURES)
    frames: dict[str, str]
    presence: dict[str, list[float | None]] = Field(default_factory=dict)

    def describes(self, other: KeptPredictions) -> bool:
        """Whether this file was made from what ``other`` (the run as it is now) would make it from."""
        keys = ("group", "checkpoints", "config", "tta", "levels", "method", "structures")
        return all(getattr(self, key) == getattr(other, key) for key in keys) and list(self.frames.items()) == list(other.frames.items())


def quantise(probs: np.ndarray) -> np.ndarray:
    """Probabilities as ``uint8`` steps: how many of the thresholds ``k / LEVELS`` (k = 1..LEVELS) each is at or above.

    Shape:
        probs: any. Returns: like ``probs``.
    """
    return np.searchsorted(_THRESHOLDS, np.asarray(probs, dtype=np.float64), side="right").astype(np.uint8)


def dequantise(steps: np.ndarray) -> np.ndarray:
    """The probabilities of quantised steps, ``float64``: ``steps / LEVELS``."""
    return steps.astype(np.float64) / LEVELS


def quantised(prediction: Prediction, frame: str) -> Prediction:
    """A prediction as it reads back from a kept file.

    Raises:
        MedsegError: If a probability is not finite; the message names ``frame``.
    """
    return Prediction(dequantise(_steps(prediction, frame)), prediction.presence)


def kept_predictions(
    run: Run,
    group: str,
    folds: Sequence[FoldDir],
    ids: list[str],
    frames: Sequence[np.ndarray],
    tta: str,
    predict: Callable[[], Iterator[Prediction]],
    on_message: Callable[[str], None],
) -> Iterator[Prediction]:
    """The predictions of one group of frames, read from the run's kept file when it still describes them, else made
    by ``predict`` and kept.

    Args:
        run: The run.
        group: ``fold_K`` or ``left_out``.
        folds: The folds whose models predict the group.
        ids: The frames' ids.
        frames: The frames, in the order of ``ids``.
        tta: Test-time augmentation.
        predict: Makes the predictions of ``frames``, in order (called only when the kept file does not serve).
        on_message: Receives one line: whether the group is read or predicted.

    Yields:
        One prediction per frame, as it reads back from the file (:func:`quantised`).
    """
    check_tta(tta)
    path = run.kept_file(group, tta)
    wanted = KeptPredictions(
        group=group,
        checkpoints={str(fold.fold): file_digest(fold.best) for fold in folds},
        config=file_digest(run.config_file),
        tta=tta,
        method=METHOD,
        structures=run.structures,
        frames={sample_id: exact_digest(frame) for sample_id, frame in zip(ids, frames, strict=True)},
    )
    kept, reason = read_kept(path, wanted, [frame.shape for frame in frames])
    who = f"fold {group.removeprefix('fold_')}" if group.startswith("fold_") else f"{len(folds)} fold model(s)"
    if kept is not None:
        on_message(f"{len(ids)} frames of {who}: predictions kept in {path.parent.name}/{path.name}")
        yield from (Prediction(dequantise(steps), presence) for steps, presence in kept)
        return
    on_message(f"predicting {len(ids)} frames with {who}{f' ({reason})' if reason else ''}")
    unwritable = _unwritable(path)
    if unwritable is None:
        yield from _keep(path, wanted, predict())
        return
    on_message(f"not keeping them: {unwritable}")
    for sample_id, prediction in zip(ids, predict(), strict=True):
        yield quantised(prediction, f"{sample_id} ({who})")


def _unwritable(path: Path) -> str | None:
    """Why the kept file cannot be written, or ``None`` when its folder can be."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return first_line(error)
    return None if os.access(path.parent, os.W_OK) else f"{path.parent} is not writable"


def _steps(prediction: Prediction, frame: str) -> np.ndarray:
    """A prediction's quantised probabilities, refused when not finite (a model that diverged or a damaged checkpoint)."""
    if not np.isfinite(prediction.probs).all():
        raise MedsegError(
            f"the probabilities predicted for {frame} are not finite (NaN or infinite): the model diverged or its "
            "checkpoint is damaged; train the run again (--force)"
        )
    return quantise(prediction.probs)


Steps = tuple[np.ndarray, np.ndarray]  # a frame's quantised probabilities (C, H, W) and presence (C,)


def read_kept(path: Path, wanted: KeptPredictions, shapes: list[tuple[int, ...]]) -> tuple[list[Steps] | None, str | None]:
    """A kept file's predictions when it was made from ``wanted``'s checkpoints, configuration, TTA and frames.

    Every member is checked before one is used: its size and ``.npy`` header (``uint8``, the frame's shape with
    ``wanted.structures`` planes), and its steps (at most :data:`LEVELS`).

    Args:
        path: The kept file.
        wanted: What it must have been made from (its ``presence`` is not compared).
        shapes: Each frame's (H, W), in the order of ``wanted.frames``.

    Returns:
        Each frame's quantised probabilities (kept as steps: a quarter of the float32 size) and presence, and ``None``;
        or ``None`` and why the file does not serve (``None`` when there is no file).
    """
    if not path.is_file() and not path.is_symlink():
        return None, None
    try:
        with zipfile.ZipFile(_regular(path)) as archive:
            meta = _meta(archive)
            if not meta.describes(wanted):
                return None, f"{path.name} was made from other checkpoints, settings or frames"
            return [_member(archive, sample_id, meta, (meta.structures, *shape)) for sample_id, shape in zip(meta.frames, shapes)], None
    except _UNREADABLE as error:
        return None, f"{path.name} does not read back: {first_line(error, 120)}"


def _regular(path: Path) -> Path:
    """``path`` when it is a regular file and no link (a run folder someone hands you may hold anything)."""
    if path.is_symlink() or not path.is_file():
        raise ValueError("not a regular file")
    return path


def _meta(archive: zipfile.ZipFile) -> KeptPredictions:
    info = archive.getinfo(META)
    if info.file_size > MAX_TEXT_BYTES:
        raise ValueError(f"{META} of {info.file_size} bytes")
    try:
        meta = KeptPredictions.model_validate(json.loads(archive.read(info)))
    except (ValueError, RecursionError) as error:  # json's and pydantic's errors (ValueErrors): not a file medseg wrote
        raise ValueError(f"{META}: {first_line(error)}") from None
    _check_presence(meta)
    return meta


def _check_presence(meta: KeptPredictions) -> None:
    """Every frame has its presence: ``structures`` values each in [0, 1], or ``None`` for every frame (no head)."""
    if meta.presence.keys() != meta.frames.keys():
        raise ValueError(f"{META}: the presence values are not those of its frames")
    heads = {tuple(value is not None for value in values) for values in meta.presence.values()}
    if any(len(values) != meta.structures for values in meta.presence.values()) or len(heads) > 1:
        raise ValueError(f"{META}: presence values of another shape than {meta.structures} structure(s) for every frame")
    if any(value is not None and not 0.0 <= value <= 1.0 for values in meta.presence.values() for value in values):
        raise ValueError(f"{META}: a presence value outside [0, 1]")


def _member(archive: zipfile.ZipFile, sample_id: str, meta: KeptPredictions, shape: tuple[int, ...]) -> Steps:
    """One frame's prediction, checked: a ``uint8`` array of ``shape`` with steps up to :data:`LEVELS`."""
    info = archive.getinfo(f"{sample_id}.npy")
    if info.file_size > math.prod(shape) + _NPY_HEADER:
        raise ValueError(f"{info.filename} is larger than a frame of {shape}")
    steps = np.lib.format.read_array(bytes_io.BytesIO(archive.read(info)), allow_pickle=False)
    if steps.dtype != np.uint8 or steps.shape != shape or (steps.size and int(steps.max()) > LEVELS):
        raise ValueError(f"{info.filename} is not {shape} steps of 0 to {LEVELS}")
    return steps, np.array([math.nan if value is None else value for value in meta.presence[sample_id]], dtype=np.float64)


def _keep(path: Path, wanted: KeptPredictions, predictions: Iterator[Prediction]) -> Iterator[Prediction]:
    """Yield each prediction quantised, writing it to ``path``.

    The file appears only once every frame is in it, and before the last prediction is yielded, so that a consumer
    that takes exactly one prediction per frame (and never asks for more) still has the file kept.
    """
    presence: dict[str, list[float | None]] = {}
    last = None
    with atomic_write(path, "wb") as stream, zipfile.ZipFile(stream, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for sample_id, prediction in zip(wanted.frames, predictions, strict=True):
            steps = _steps(prediction, f"{sample_id} ({wanted.group})")
            with archive.open(f"{sample_id}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, steps, allow_pickle=False)
            presence[sample_id] = [None if math.isnan(value) else float(value) for value in prediction.presence]
            if last is not None:
                yield last
            last = Prediction(dequantise(steps), prediction.presence)
        meta = wanted.model_copy(update={"presence": presence})
        archive.writestr(META, json.dumps(meta.model_dump(mode="json")))
    if last is not None:
        yield last


def exact_digest(frame: np.ndarray) -> str:
    """A digest of a frame's exact values, type and shape: what the model was given, to the last bit.

    Stricter than :func:`~medseg.data.samples.frame_digest` (which rounds deeper frames to 8 bits to recognise a copy
    of the training data): a 16-bit frame changed below 1/255, or re-encoded at 8 bits, is a new frame here.
    """
    digest = hashlib.sha256(f"{frame.dtype.str}{frame.shape}".encode())
    digest.update(np.ascontiguousarray(frame).tobytes())
    return digest.hexdigest()[:32]


def file_digest(path: Path) -> str:
    """The SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def run_identity(run: Run) -> str:
    """What tells one trained model from another (a served one, a teacher): a digest of the run's configuration, best
    checkpoints and tuning."""
    files = [run.config_file, *(fold.best for fold in run.folds)]
    if run.postprocess_file.is_file():
        files.append(run.postprocess_file)
    digest = hashlib.sha256("\n".join(file_digest(path) for path in files).encode())
    return digest.hexdigest()[:16]
