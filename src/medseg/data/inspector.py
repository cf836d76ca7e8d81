"""The dataset inspector: counts, sizes and every problem of a data set, each tied to its file.

Every frame and mask is decoded once, in parallel threads (the TIFF, PNG and JPEG decoders release
the GIL). Near-duplicate frames are found by correlating small normalised thumbnails within each
subject (one matrix product per subject); a pair whose masks contradict (one empty and one not, or a
Dice below 0.5) is a problem, because one of the two labels is wrong and a model cannot learn both.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from medseg import progress
from medseg.data import io
from medseg.data.datasets import DataOptions, Dataset, Problem, Record, mask_of, size_text
from medseg.errors import FileError, ImageReadError

THUMB_SHAPE = (24, 32)
MASK_THUMB_SHAPE = (96, 128)
NEAR_DUPLICATE_SIMILARITY = 0.98
CONTRADICTING_DICE = 0.5
_BLOCK = 2048


@dataclass
class FrameFacts:
    """What reading one labelled frame and its mask found.

    Attributes:
        record: The frame's record.
        size: ``(height, width)`` of the decoded frame, ``None`` if unreadable.
        area: Mask area in pixels, ``None`` if the mask is unreadable.
        thumb: Normalised image thumbnail (unit vector), ``None`` if unreadable or flat.
        mask_thumb: Mask area fractions on a fixed grid, ``None`` for an empty or unreadable mask.
        problems: Problems found in this frame.
    """

    record: Record
    size: tuple[int, int] | None = None
    area: int | None = None
    thumb: np.ndarray | None = None
    mask_thumb: np.ndarray | None = None
    problems: list[Problem] = field(default_factory=list)


@dataclass
class Inspection:
    """The result of inspecting a data set.

    Attributes:
        summary: Counts and sizes, JSON-serialisable.
        problems: Every problem found, each with its file.
    """

    summary: dict[str, Any]
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        """Whether no problem was found."""
        return not self.problems


def inspect_dataset(
    dataset: Dataset,
    workers: int | None = None,
    on_frame: Callable[[], None] | None = None,
) -> Inspection:
    """Read every frame and mask of a data set and report its summary and problems.

    Args:
        dataset: The data set, as loaded by :func:`medseg.data.datasets.load_dataset`.
        workers: Reading threads; defaults to the number of CPU cores.
        on_frame: Called once per frame read (for a progress bar).

    Returns:
        The summary and the problems: those found while loading, then per frame, then near-duplicates.
    """
    workers = workers or os.cpu_count() or 1
    tick = on_frame or progress.counter("reading frames", len(dataset.train) + len(dataset.test))

    def train_job(record: Record) -> FrameFacts:
        facts = examine_labelled(record, dataset.options)
        tick()
        return facts

    def test_job(record: Record) -> list[Problem]:
        problems = _examine_unlabelled(record)
        tick()
        return problems

    with ThreadPoolExecutor(max_workers=workers) as pool:
        train_facts = list(pool.map(train_job, dataset.train))
        test_problems = [problem for found in pool.map(test_job, dataset.test) for problem in found]
    problems = list(dataset.problems)
    problems += [problem for facts in train_facts for problem in facts.problems]
    problems += test_problems
    problems += contradicting_duplicates(train_facts)
    return Inspection(summarize(dataset, train_facts), problems)


def examine_labelled(record: Record, options: DataOptions) -> FrameFacts:
    """Decode a labelled frame and its mask sources and check them against each other."""
    facts = FrameFacts(record)
    try:
        image = io.read_image(record.image_path)
        facts.size = image.shape
        facts.thumb = image_thumbnail(image)
        if not record.has_mask:
            return facts  # the loader reported the missing mask
        mask = mask_of(record, options, image.shape)
    except FileError as error:
        facts.problems.append(Problem(error.kind, error.path, error.reason))
        return facts
    facts.area = int(np.count_nonzero(mask))
    if facts.area:
        small = cv2.resize(mask.view(np.uint8), MASK_THUMB_SHAPE[::-1], interpolation=cv2.INTER_AREA)
        facts.mask_thumb = small.astype(np.float32)
    return facts


def _examine_unlabelled(record: Record) -> list[Problem]:
    try:
        io.read_image(record.image_path)
    except ImageReadError as error:
        return [Problem(error.kind, error.path, error.reason)]
    return []


def image_thumbnail(image: np.ndarray) -> np.ndarray | None:
    """A small zero-mean, unit-norm vector of a frame, for near-duplicate search; ``None`` if flat."""
    small = cv2.resize(image, THUMB_SHAPE[::-1], interpolation=cv2.INTER_AREA).astype(np.float32).ravel()
    small -= small.mean()
    norm = float(np.linalg.norm(small))
    return small / norm if norm > 1e-6 else None


def near_duplicate_pairs(thumbs: np.ndarray, threshold: float = NEAR_DUPLICATE_SIMILARITY) -> Iterable[tuple[int, int, float]]:
    """Pairs of rows whose correlation is at least ``threshold``.

    Args:
        thumbs: Unit-norm thumbnails, one per row.
        threshold: Minimum correlation (1 is identical up to brightness and contrast).

    Yields:
        ``(i, j, similarity)`` with ``i < j``.

    Shape:
        thumbs: (N, D).
    """
    for start in range(0, len(thumbs), _BLOCK):
        similarity = thumbs[start : start + _BLOCK] @ thumbs.T
        rows, cols = np.nonzero(similarity >= threshold)
        rows = rows + start
        keep = rows < cols
        for i, j in zip(rows[keep].tolist(), cols[keep].tolist()):
            yield i, j, float(similarity[i - start, j])


def soft_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two masks given as area fractions on the same grid (exact for binary masks)."""
    total = float(a.sum() + b.sum())
    return 2.0 * float(np.minimum(a, b).sum()) / total if total else 1.0


def contradicting_duplicates(facts: list[FrameFacts], threshold: float = NEAR_DUPLICATE_SIMILARITY) -> list[Problem]:
    """Near-duplicate frames of one subject whose masks contradict each other.

    Frames without a subject are compared with each other as if they were one subject.
    """
    by_subject: dict[str | None, list[FrameFacts]] = {}
    for item in facts:
        if item.thumb is not None and item.area is not None:
            by_subject.setdefault(item.record.subject, []).append(item)
    problems = []
    for group in by_subject.values():
        thumbs = np.stack([item.thumb for item in group])
        for i, j, similarity in near_duplicate_pairs(thumbs, threshold):
            reason = _contradiction(group[i], group[j])
            if reason:
                first, second = group[i].record, group[j].record
                problems.append(
                    Problem(
                        "contradicting_duplicates",
                        first.image_path,
                        f"near-duplicate of {second.image_path.name} (similarity {similarity:.3f}) but {reason}; "
                        "check both labels or drop one",
                    )
                )
    return problems


def _contradiction(a: FrameFacts, b: FrameFacts) -> str | None:
    if (a.area == 0) != (b.area == 0):
        empty, full = (a, b) if a.area == 0 else (b, a)
        return f"{full.record.id} has a mask of {full.area} px and {empty.record.id} none"
    if a.area and b.area:
        dice = soft_dice(a.mask_thumb, b.mask_thumb)
        if dice < CONTRADICTING_DICE:
            return f"their masks overlap with Dice {dice:.2f}"
    return None


def summarize(dataset: Dataset, facts: list[FrameFacts]) -> dict[str, Any]:
    """Counts and sizes of a data set, JSON-serialisable."""
    areas = np.array([item.area for item in facts if item.area], dtype=np.int64)
    read_masks = [item for item in facts if item.area is not None]
    empty = sum(1 for item in read_masks if item.area == 0)
    subjects = {item.record.subject for item in facts if item.record.subject is not None}
    sizes = Counter(size_text(item.size) for item in facts if item.size is not None)
    return {
        "root": str(dataset.root),
        "layout": dataset.layout,
        "train_images": len(dataset.train),
        "non_empty": int(areas.size),
        "empty": empty,
        "empty_share": round(empty / len(read_masks), 4) if read_masks else None,
        "subjects": len(subjects) if subjects else None,
        "image_sizes": dict(sizes.most_common()),
        "mask_area": {
            "min": int(areas.min()),
            "median": float(np.median(areas)),
            "max": int(areas.max()),
        }
        if areas.size
        else None,
        "test_images": len(dataset.test),
        "sample_submission": str(dataset.sample_submission) if dataset.sample_submission else None,
        "sample_submission_rows": len(dataset.sample_ids) if dataset.sample_submission else None,
    }
