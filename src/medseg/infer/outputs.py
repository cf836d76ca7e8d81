"""``medseg predict``: masks of a folder of frames as a checked submission, PNG masks or probabilities.

The frames are listed (every non-image file is reported, none is skipped silently), predicted by the
run's ensemble (:mod:`medseg.infer.predict`), post-processed with the run's tuned settings, checked by the
submission validator before anything is written, and written atomically: a killed prediction leaves no
partial file.
A masks folder is written whole beside its place and moved in at the end, with a marker
(:data:`MASKS_MARKER`) that lists what it holds: a rerun with ``--force`` leaves exactly the new masks, and
replaces only a folder medseg wrote.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from medseg import progress
from medseg.data import io, long_rle, rle
from medseg.data.datasets import KAGGLE_SAMPLE_CSV, Record, image_records
from medseg.data.samples import frame_digest
from medseg.devices import device_for
from medseg.errors import MedsegError, UsageError
from medseg.files import Output, OutputExistsError, atomic_write, check_outputs, inside, printable
from medseg.infer import submission
from medseg.infer.export import ExportRequest, OnnxEnsemble, export_onnx
from medseg.infer.predict import TTA_PASSES, load_fold_model, postprocess_record, predict_frames, read_postprocess, untuned_note
from medseg.progress import Item, format_duration
from medseg.runs import Run, RunFile, delete_ours, foreign_entries, open_run

MASKS_MARKER = ".medseg-masks.json"


class MasksFolder(RunFile):
    """The marker of a ``predict --masks-dir`` folder: what medseg wrote there, so that ``--force`` replaces only that.

    Attributes:
        run: The run folder that predicted the masks.
        files: Every file written, relative to the folder.
    """

    run: str
    files: list[str]


@dataclass(frozen=True)
class PredictRequest:
    """What to predict and where to write it.

    Attributes:
        run: The run folder.
        images: Folder of frames (e.g. Kaggle ``test/``), or a Kaggle data folder (its ``test/`` is used).
        out: Submission CSV to write (``img,pixels``; in the run's RLE dialect), or ``None``.
        masks_dir: Folder for one PNG mask (0/255) per frame, or ``None``. With several structures: one
            class-index PNG per frame (the training masks' values) when the run learnt from class-index masks
            (the structures exclude each other), else ``masks_dir/<structure>/`` with a 0/255 PNG each.
        sample: Sample submission whose ids and order the CSV follows; found beside the frames when ``None``.
        tta: ``none``, ``hflip`` or ``hvflip``.
        save_probs: Also keep the probability maps as float16 (``<out>.probs.npz`` or ``masks_dir/probs.npz``).
        force: Replace existing outputs.
        allow_degenerate: Write a submission the validator finds degenerate, with a warning.
        batch_size: Frames per forward pass.
        engine: ``torch`` (the checkpoints; CUDA when there is one) or ``onnx`` (ONNX Runtime on the CPU).
        onnx: The exported model for the onnx engine; ``RUN/model.onnx`` (exported on first use) when ``None``.
        max_pixels: The most pixels a frame may declare in its header; the run's ``data.max_pixels`` when ``None``.
    """

    run: Path
    images: Path
    out: Path | None = None
    masks_dir: Path | None = None
    sample: Path | None = None
    tta: str = "hflip"
    save_probs: bool = False
    force: bool = False
    allow_degenerate: bool = False
    batch_size: int = 16
    engine: str = "torch"
    onnx: Path | None = None
    max_pixels: int | None = None


def predict_folder(request: PredictRequest, on_message: Callable[[str], None] = print) -> dict:
    """Predict a folder of frames and write the requested outputs.

    Returns:
        A summary: frames, empty masks, outputs written, the post-processing used.

    Raises:
        UsageError: On missing outputs, outputs that exist without ``force``, or a sample that does not
            match the frames.
        SubmissionError: If the submission fails validation (nothing is written).
    """
    if request.out is None and request.masks_dir is None:
        raise UsageError("say where the masks go: --out FILE.csv (a submission) and/or --masks-dir DIR (PNG masks)")
    run = open_run(request.run)
    folder, sample_path = _locate(request)
    _check_outputs(request, run, folder, sample_path)  # after the inputs: a typo in them is told before an existing output is
    max_pixels = request.max_pixels or run.config.data.max_pixels
    records = frame_records(folder, max_pixels, on_message)
    sample_pairs, header = submission.read_sample_pairs(sample_path) if sample_path and run.classes else (None, ("id", "class", "rle"))
    sample_ids = list(dict.fromkeys(i for i, _ in sample_pairs)) if sample_pairs else _sample_ids(sample_path, run)
    if sample_ids is not None:
        on_message(f"rows follow {sample_path} ({len(sample_pairs or sample_ids)} rows)")
        records = _in_sample_order(records, sample_ids, sample_path)
    posts = read_postprocess(run)
    if (note := untuned_note(run, posts)) is not None:
        on_message(note)
    frames = [io.read_image(record.image_path, run.config.data.intensity_window, max_pixels=max_pixels) for record in records]
    if (note := transductive_note(run, frames)) is not None:
        on_message(note)
    models = load_engine(run, request.engine, request.onnx, on_message)
    passes = TTA_PASSES.get(request.tta, 0)  # an unknown mode is told by predict_frames
    where = f"{request.engine} on {device_for(run.config).type}" if request.engine == "torch" else "onnx on cpu"
    describe = f"{len(frames)} frames with {len(run.folds)} fold model(s) x {passes} TTA pass(es) ({request.tta}), {where}"
    masks, probs, index_masks = [], [], []
    values = list(run.plan.class_values.values()) if request.masks_dir is not None else []
    predictions = predict_frames(models, frames, run.config, request.tta, request.batch_size)
    for prediction in paced(predictions, len(frames), request.batch_size, describe, on_message):
        masks.append(prediction.mask(posts))
        if values:
            index_masks.append(class_index_mask(masks[-1], prediction.probs, values))
        if request.save_probs:
            probs.append(prediction.probs.astype(np.float16) if run.classes else prediction.probs[0].astype(np.float16))
    ids = [record.id for record in records]
    sample = (sample_pairs, header) if run.classes else sample_ids
    written = _write_outputs(request, run, ids, masks, index_masks, probs, sample, on_message)
    used = postprocess_record(run, posts)
    return {"frames": len(ids), "empty": sum(not m.any() for m in masks), "written": written, "postprocess": used}


def transductive_note(run: Run, frames: list[np.ndarray]) -> str | None:
    """The line that says some frames to predict are frames the run trained on as pseudo-labels (the transductive
    setting Kaggle solutions used), or ``None``."""
    if run.plan.pseudo is None:
        return None
    seen = set(run.plan.pseudo.digests)
    shared = sum(frame_digest(frame) in seen for frame in frames)
    if not shared:
        return None
    return (
        f"{shared} of these {len(frames)} frames were pseudo-labelled by {run.plan.pseudo.teacher} for this run's training "
        "(the transductive setting): the run learnt from its teacher's masks of them"
    )


def paced(items: Iterable[Item], total: int, batch: int, describe: str, on_message: Callable[[str], None]) -> Iterator[Item]:
    """Yield the predictions of ``total`` frames, telling what is predicted and when it will be done.

    One line before a single batch; otherwise one line after the first batch, with the ETA it gives, and,
    when no bars are shown (:func:`medseg.progress.active`: output that is not a terminal), a line at every
    tenth of the frames.

    Args:
        items: One prediction per frame, computed a batch at a time.
        total: Frames.
        batch: Frames per forward pass.
        describe: What is predicted (frames, fold models, TTA passes, engine and device).
        on_message: Receives the lines.
    """
    if total <= batch:
        on_message(f"predicting {describe}")
        yield from items
        return
    start = time.perf_counter()
    every = max(batch, math.ceil(total / 10))
    for done, item in enumerate(items, start=1):
        yield item
        elapsed = time.perf_counter() - start
        eta = format_duration(elapsed / done * (total - done))
        if done == batch:
            on_message(f"predicting {describe}: ETA {eta} (the first batch of {batch} took {format_duration(elapsed)})")
        elif done % every == 0 and done < total and not progress.active():
            on_message(f"predicted {done}/{total} frames, ETA {eta}")


def _sample_ids(sample_path: Path | None, run: Run) -> list[str] | None:
    return submission.read_sample_ids(sample_path) if sample_path and not run.classes else None


def load_engine(
    run: Run, engine: str, onnx: Path | None, on_message: Callable[[str], None], threads: int | None = None
) -> list | OnnxEnsemble:
    """The fold models as torch modules, or the exported ensemble in ONNX Runtime.

    Args:
        run: The run.
        engine: ``torch`` (the checkpoints; CUDA when there is one) or ``onnx`` (ONNX Runtime on the CPU).
        onnx: The exported model for the onnx engine; ``RUN/model.onnx``, exported on first use, when ``None``.
        on_message: Told when the model is exported.
        threads: ONNX Runtime's intra-op threads; ``None`` lets it choose (every core).

    Raises:
        UsageError: On an unknown engine, or a named ONNX file that is missing or not a model.
    """
    if engine == "torch":
        device = device_for(run.config)
        return [load_fold_model(run, fold, device) for fold in run.folds]
    if engine != "onnx":
        raise UsageError(f"--engine {engine!r}; use torch or onnx")
    path = Path(onnx) if onnx else run.onnx_file
    if not path.is_file():
        if onnx:
            raise UsageError(f"{path}: not found; export it with `medseg export {run.path} --onnx {path}`")
        on_message(f"exporting {path} for ONNX Runtime (first use of --engine onnx)")
        export_onnx(ExportRequest(run.path, path))
    return OnnxEnsemble(path, threads)


def _check_outputs(request: PredictRequest, run: Run, folder: Path, sample: Path | None) -> None:
    """Check every output before anything is predicted (:func:`medseg.files.check_outputs`); a masks folder that
    ``--force`` would replace must be one medseg wrote, holding nothing else."""
    outputs = [Output("--out", Path(request.out))] if request.out is not None else []
    if request.masks_dir is not None:
        outputs.append(Output("--masks-dir", Path(request.masks_dir), folder=True))
    if request.save_probs and request.out is not None:
        outputs.append(Output("--save-probs", probs_path(request)))
    inputs = [*run.inputs, run.path, folder, *(path for path in (sample, request.onnx) if path is not None)]
    check_outputs(outputs, request.force, inputs)
    if request.masks_dir is not None:
        check_masks_folder(Path(request.masks_dir))


def probs_path(request: PredictRequest) -> Path:
    """Where ``--save-probs`` keeps the probabilities: beside the submission, else in the masks folder."""
    return Path(f"{request.out}.probs.npz") if request.out is not None else Path(request.masks_dir) / "probs.npz"


def check_masks_folder(folder: Path) -> None:
    """Refuse to replace a non-empty folder that is not a masks folder medseg wrote, or that holds other files.

    Raises:
        UsageError: Naming the folder and what is in it.
    """
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    tree = _written_tree(folder)
    if tree is None:
        raise UsageError(
            f"--masks-dir {folder}: not a masks folder medseg wrote (no readable {MASKS_MARKER}), so --force will not "
            "replace it; choose another --masks-dir"
        )
    foreign = foreign_entries(folder, tree)
    if foreign:
        shown = ", ".join(str(path.relative_to(folder)) for path in foreign[:3])
        raise UsageError(
            f"--masks-dir {folder}: holds {len(foreign)} file(s) medseg did not write ({shown}), so --force will not replace it; "
            "move them out or choose another --masks-dir"
        )


def _written_tree(folder: Path) -> dict | None:
    """What medseg wrote in a masks folder, by its marker (:func:`medseg.runs.foreign_entries`'s tree), or ``None``
    where the marker is missing or does not read back."""
    try:
        written = MasksFolder.read(folder / MASKS_MARKER)
    except MedsegError:
        return None
    return {re.escape(MASKS_MARKER): None, **_tree_of(written.files)}


def _delete_written(folder: Path) -> None:
    """Delete the files a masks folder's marker lists, the marker, and the folder once empty; nothing else.

    A folder without a readable marker, or one where a file appeared that the marker does not list, keeps
    what it holds.
    """
    tree = _written_tree(folder)
    if tree is None or folder.is_symlink():
        return
    delete_ours(folder, tree)
    with contextlib.suppress(OSError):
        folder.rmdir()


def _tree_of(files: list[str]) -> dict:
    """The tree of name patterns (:func:`medseg.runs.foreign_entries`) of a list of relative file paths."""
    tree: dict = {}
    for name in files:
        *folders, leaf = Path(name).parts
        node = tree
        for part in folders:
            node = node.setdefault(re.escape(part), {})
        node[re.escape(leaf)] = None
    return tree


def _locate(request: PredictRequest) -> tuple[Path, Path | None]:
    images = Path(request.images)
    if not images.is_dir():
        raise UsageError(f"{images}: not a folder of images")
    folder = images / "test" if (images / "test").is_dir() and (images / KAGGLE_SAMPLE_CSV).is_file() else images
    sample = request.sample
    if sample is None:
        beside = [candidate / KAGGLE_SAMPLE_CSV for candidate in (folder, folder.parent)]
        sample = next((candidate for candidate in beside if candidate.is_file()), None)
    elif not Path(sample).is_file():
        raise UsageError(f"{sample}: sample submission not found")
    return folder, sample


def frame_records(folder: Path, max_pixels: int, on_message: Callable[[str], None]) -> list[Record]:
    """The frames to predict; a file that is no image is told and not predicted, a frame that cannot be named
    (its id twice, or an id that cannot become a file or CSV name) stops the command before anything is predicted."""
    if not Path(folder).is_dir():
        raise UsageError(f"{folder}: no such folder of frames; give the folder that holds them")
    records, problems = image_records(folder, max_pixels=max_pixels)
    refused = [p for p in problems if p.kind in ("duplicate_id", "unsafe_name")]
    if refused:
        raise UsageError(f"{printable(refused[0].path)}: {refused[0].message}")
    for problem in problems:
        on_message(f"not predicted: {printable(problem.path)} ({problem.message})")
    if not records:
        raise UsageError(f"{folder}: no images to predict")
    return records


def _in_sample_order(records: list[Record], sample_ids: list[str], sample_path: Path) -> list[Record]:
    by_id = {record.id: record for record in records}
    missing = [i for i in sample_ids if i not in by_id]
    if missing:
        raise UsageError(
            f"{sample_path}: {len(missing)} id(s) have no frame ({', '.join(missing[:5])}); predict the folder that holds them"
        )
    unlisted = [record.id for record in records if record.id not in set(sample_ids)]
    if unlisted:
        raise UsageError(
            f"{sample_path}: {len(unlisted)} frame(s) are not in the sample ({', '.join(unlisted[:5])}); pass the right --sample"
        )
    return [by_id[i] for i in dict.fromkeys(sample_ids)]


def _write_outputs(
    request: PredictRequest,
    run: Run,
    ids: list[str],
    masks: list[np.ndarray],
    index_masks: list[np.ndarray],
    probs: list[np.ndarray],
    sample,
    on_message,
) -> list[str]:
    written = []
    if request.out is not None and run.classes:
        _write_long_submission(request, run, ids, masks, *sample, on_message)
        written.append(str(request.out))
    elif request.out is not None:
        sample_ids = sample
        dialect = run.config.data.dialect
        rles = [rle.encode(mask[0], dialect=dialect) for mask in masks]
        sizes = {i: mask.shape[1:] for i, mask in zip(ids, masks)}
        had_masks = None if run.plan.train_non_empty is None else run.plan.train_non_empty > 0
        report = submission.validate(
            ids, rles, sample_ids=sample_ids, sizes=sizes, train_had_masks=had_masks, dialect=dialect, path=request.out
        )
        submission.check_or_raise(report, request.allow_degenerate, warn=lambda line: on_message(f"warning: {line}"))
        submission.write_submission(request.out, ids, rles, submission.submission_header(dialect), exclusive=not request.force)
        written.append(str(request.out))
    probs_in_masks = request.save_probs and request.out is None
    if request.masks_dir is not None:
        files = _mask_files(run, ids, masks, index_masks)
        _write_masks_folder(Path(request.masks_dir), run, ids, files, probs if probs_in_masks else [])
        written.append(str(request.masks_dir))
    if request.save_probs and not probs_in_masks:
        target = probs_path(request)
        with atomic_write(target, "wb", exclusive=not request.force) as stream:
            _save_probs(stream, ids, probs)
        written.append(str(target))
    return written


def _write_long_submission(
    request: PredictRequest,
    run: Run,
    ids: list[str],
    masks: list[np.ndarray],
    sample_pairs: list[tuple[str, str]] | None,
    header: tuple[str, str, str],
    on_message: Callable[[str], None],
) -> None:
    """One row per frame and structure, in the sample's order (else frame by frame, structures in channel order),
    each structure named by its label in the training data (its class column), checked, then written."""
    label_of = {name: run.plan.class_labels.get(name, name) for name in run.classes}
    channel_of = {label_of[name]: index for index, name in enumerate(run.classes)}
    by_id = dict(zip(ids, masks, strict=True))
    pairs = sample_pairs or [(sample_id, label_of[name]) for sample_id in ids for name in run.classes]
    unknown = sorted({label for _, label in pairs if label not in channel_of})
    if unknown:
        raise UsageError(
            f"{request.sample or 'the sample'}: class(es) {', '.join(unknown)} are not structures of {run.path} ({', '.join(channel_of)})"
        )
    dialect = run.config.data.dialect
    rows = [(sample_id, label, rle.encode(by_id[sample_id][channel_of[label]], dialect=dialect)) for sample_id, label in pairs]
    had_masks = {label_of[name]: count > 0 for name, count in run.plan.class_non_empty.items()}
    sizes = {sample_id: mask.shape[1:] for sample_id, mask in by_id.items()}
    columns = map(list, zip(*rows, strict=True))
    report = submission.validate_long(*columns, sample_pairs, sizes, had_masks or None, dialect=dialect, path=request.out)
    submission.check_or_raise(report, request.allow_degenerate, warn=lambda line: on_message(f"warning: {line}"))
    long_rle.write_long_table(request.out, rows, header, exclusive=not request.force)


def class_index_mask(masks: np.ndarray, probs: np.ndarray, values: list[int]) -> np.ndarray:
    """One class-index mask of exclusive structures: each pixel the value of the structure predicted there.

    Where the post-processed masks of several structures cover one pixel, the structure of the highest
    probability takes it; a pixel no structure covers is 0.

    Args:
        masks: The post-processed mask of each structure.
        probs: Each structure's probability map.
        values: Each structure's mask value, in channel order.

    Shape:
        masks, probs: (C, H, W). Returns: (H, W), ``uint8`` (``uint16`` for values above 255).
    """
    dtype = np.uint8 if max(values) <= 255 else np.uint16
    winner = np.argmax(np.where(masks, probs, -1.0), axis=0)
    return np.where(masks.any(axis=0), np.asarray(values, dtype=dtype)[winner], 0).astype(dtype)


def _mask_files(run: Run, ids: list[str], masks: list[np.ndarray], index_masks: list[np.ndarray]) -> dict[tuple[str, ...], bytes]:
    """Every PNG of a masks folder by its relative path: a class-index mask per frame, a 0/255 mask per frame and
    structure (``<structure>/<id>.png``), or a 0/255 mask per frame."""
    if index_masks:
        return {(f"{sample_id}.png",): mask_png(mask, scale=1) for sample_id, mask in zip(ids, index_masks, strict=True)}
    if run.classes:
        return {
            (name, f"{sample_id}.png"): mask_png(mask[index])
            for index, name in enumerate(run.classes)
            for sample_id, mask in zip(ids, masks, strict=True)
        }
    return {(f"{sample_id}.png",): mask_png(mask[0]) for sample_id, mask in zip(ids, masks, strict=True)}


def mask_png(mask: np.ndarray, scale: int = 255) -> bytes:
    """A binary mask as a 0/255 PNG (``scale``), a class-index mask as its values (``scale`` 1)."""
    _, encoded = cv2.imencode(".png", mask.astype(np.uint16 if mask.dtype == np.uint16 else np.uint8) * scale)
    return encoded.tobytes()


def _save_probs(stream, ids: list[str], probs: list[np.ndarray]) -> None:
    np.savez_compressed(stream, ids=np.array(ids), **{f"p{index}": prob for index, prob in enumerate(probs)})


def _write_masks_folder(folder: Path, run: Run, ids: list[str], files: dict[tuple[str, ...], bytes], probs: list[np.ndarray]) -> None:
    """Write a masks folder whole in a hidden folder beside ``folder``, then move it into place.

    The marker that lists every file is written first, so that whatever a killed write leaves is known to be
    medseg's: the next write deletes it (:func:`_remove_stale`), file by file from that list. An earlier masks
    folder (checked by :func:`check_masks_folder`) is replaced whole, so no stale mask of it survives.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(folder)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.medseg-partial-{os.getpid()}-", dir=folder.parent))
    names = ["/".join(parts) for parts in files] + (["probs.npz"] if probs else [])
    try:
        MasksFolder(run=str(run.path.resolve()), files=names).write(staging / MASKS_MARKER)
        for parts, content in files.items():
            path = inside(staging, *parts)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        if probs:
            with open(staging / "probs.npz", "wb") as stream:
                _save_probs(stream, ids, probs)
        _move_into_place(staging, folder)
    finally:
        if staging.is_dir():
            _delete_written(staging)


def _move_into_place(staging: Path, folder: Path) -> None:
    """Rename ``staging`` to ``folder``; an existing ``folder`` is moved aside first, checked again and deleted after
    (only the files its marker lists), or moved back when ``staging`` cannot take its place."""
    old = None
    if folder.exists() and any(folder.iterdir()):
        check_masks_folder(folder)  # again: a file may have appeared in it while the frames were predicted
        old = folder.parent / f".{folder.name}.medseg-old-{os.getpid()}-{staging.name.rsplit('-', 1)[-1]}"
        folder.rename(old)
    try:
        staging.rename(folder)
    except OSError as error:
        if old is not None:
            old.rename(folder)
        raise OutputExistsError(
            f"--masks-dir {folder}: appeared while medseg was writing it (another process?); nothing was replaced"
        ) from error
    if old is not None:
        _delete_written(old)


def _remove_stale(folder: Path) -> None:
    """Remove what a killed masks write left beside ``folder``: hidden folders of processes that no longer run,
    holding a marker of their own (file by file, :func:`_delete_written`)."""
    for pattern in (f".{folder.name}.medseg-partial-*", f".{folder.name}.medseg-old-*"):
        for leftover in folder.parent.glob(pattern):
            pid = leftover.name.removeprefix(f".{folder.name}.medseg-").split("-")[1]
            if pid.isdigit() and not _running(int(pid)) and leftover.is_dir():
                _delete_written(leftover)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
