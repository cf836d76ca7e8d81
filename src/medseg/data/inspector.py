"""The dataset inspector: counts, sizes and every problem of a data set, each tied to its file.

Every frame and mask is decoded once, in parallel threads (the TIFF, PNG and JPEG decoders release
the GIL). Near-duplicate frames are found by correlating small normalised thumbnails within each
subject (one matrix product per subject); a pair whose masks contradict (one empty and one not, or a
Dice below 0.5) is a problem, because one of the two labels is wrong and a model cannot learn both;
:mod:`medseg.data.exclusions` says which frame of such a pair to leave out of training.

A frame is read as training and prediction read it (:func:`medseg.data.io.read_image`, with the data
options' window and pixel limit), so what they would refuse is listed here, each with its file: a frame
whose header declares more pixels than ``data.max_pixels``, NaN or infinite pixels, a malformed DICOM
window or header.
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
from medseg.config import DataOptions
from medseg.data import io
from medseg.data.datasets import Dataset, Problem, Record, is_multi_structure, mask_of, size_text, structure_masks, structure_names
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
        class_areas: With several structures, each one's mask area (``area`` is their union's).
        class_thumbs: With several structures, each one's mask thumbnail (``None`` where it is empty).
        overlaps: With several structures, the pixels each pair (``"a & b"``) shares.
    """

    record: Record
    size: tuple[int, int] | None = None
    area: int | None = None
    thumb: np.ndarray | None = None
    mask_thumb: np.ndarray | None = None
    problems: list[Problem] = field(default_factory=list)
    class_areas: dict[str, int] | None = None
    class_thumbs: dict[str, np.ndarray | None] | None = None
    overlaps: dict[str, int] | None = None


@dataclass
class Inspection:
    """The result of inspecting a data set.

    Attributes:
        summary: Counts and sizes, JSON-serialisable.
        problems: Every problem found, each with its file.
        contradictions: The near-duplicate pairs whose masks contradict (also among ``problems``), for
            :func:`medseg.data.exclusions.leave_out`.
    """

    summary: dict[str, Any]
    problems: list[Problem]
    contradictions: list[Contradiction] = field(default_factory=list)

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
        problems = _examine_unlabelled(record, dataset.options)
        tick()
        return problems

    with ThreadPoolExecutor(max_workers=workers) as pool:
        train_facts = list(pool.map(train_job, dataset.train))
        test_problems = [problem for found in pool.map(test_job, dataset.test) for problem in found]
    problems = list(dataset.problems)
    problems += [problem for facts in train_facts for problem in facts.problems]
    problems += test_problems
    contradictions = find_contradictions(train_facts)
    problems += [contradiction_problem(item) for item in contradictions]
    return Inspection(summarize(dataset, train_facts), problems, contradictions)


def examine_labelled(record: Record, options: DataOptions) -> FrameFacts:
    """Decode a labelled frame and its mask sources and check them against each other."""
    facts = FrameFacts(record)
    try:
        image = io.read_image(record.image_path, options.intensity_window, max_pixels=options.max_pixels)
        facts.size = image.shape
        facts.thumb = image_thumbnail(image)
        if not record.has_mask:
            return facts  # the loader reported the missing mask
        if is_multi_structure(record, options):
            return structure_facts(facts, structure_names(record, options), structure_masks(record, options, image.shape))
        mask = mask_of(record, options, image.shape)
    except FileError as error:
        facts.problems.append(Problem(error.kind, error.path, error.reason))
        return facts
    facts.area = int(np.count_nonzero(mask))
    facts.mask_thumb = mask_thumbnail(mask) if facts.area else None
    return facts


def structure_facts(facts: FrameFacts, names: list[str], masks: np.ndarray) -> FrameFacts:
    """Fill in the facts of a frame with several structures: each one's area and thumbnail, and their overlaps.

    Shape:
        masks: (C, H, W) bool, in the order of ``names``.
    """
    facts.class_areas = {name: int(np.count_nonzero(mask)) for name, mask in zip(names, masks, strict=True)}
    facts.class_thumbs = {name: mask_thumbnail(mask) if facts.class_areas[name] else None for name, mask in zip(names, masks, strict=True)}
    facts.overlaps = {
        f"{names[i]} & {names[j]}": int(np.count_nonzero(masks[i] & masks[j])) for i in range(len(names)) for j in range(i + 1, len(names))
    }
    union = masks.any(axis=0)
    facts.area = int(np.count_nonzero(union))
    facts.mask_thumb = mask_thumbnail(union) if facts.area else None
    return facts


def mask_thumbnail(mask: np.ndarray) -> np.ndarray:
    """Area fractions of a boolean mask on a fixed grid, for comparing the masks of near-duplicates."""
    return cv2.resize(mask.view(np.uint8), MASK_THUMB_SHAPE[::-1], interpolation=cv2.INTER_AREA).astype(np.float32)


def _examine_unlabelled(record: Record, options: DataOptions) -> list[Problem]:
    try:
        io.read_image(record.image_path, options.intensity_window, max_pixels=options.max_pixels)
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


@dataclass(frozen=True)
class Contradiction:
    """Two near-duplicate frames of one subject whose masks (of one structure) contradict each other.

    Attributes:
        first: The earlier frame of the pair.
        second: The later frame.
        similarity: Correlation of their thumbnails (1 is identical up to brightness and contrast).
        areas: The mask area of each frame, in pixels (of the structure, with several).
        dice: Dice of the two masks when both have one; ``None`` when one of them is empty.
        structure: The structure whose masks contradict, with several per frame; ``None`` for one.
    """

    first: Record
    second: Record
    similarity: float
    areas: tuple[int, int]
    dice: float | None = None
    structure: str | None = None

    @property
    def reason(self) -> str:
        """How the masks contradict, in words (prefixed by the structure with several)."""
        prefix = f"class {self.structure}: " if self.structure is not None else ""
        if self.dice is not None:
            return f"{prefix}their masks overlap with Dice {self.dice:.2f}"
        empty, full = (self.first, self.second) if self.areas[0] == 0 else (self.second, self.first)
        return f"{prefix}{full.id} has a mask of {max(self.areas)} px and {empty.id} none"


def contradicting_duplicates(facts: list[FrameFacts], threshold: float = NEAR_DUPLICATE_SIMILARITY) -> list[Problem]:
    """Near-duplicate frames of one subject whose masks contradict each other, as problems (one per pair and structure).

    Frames without a subject are compared with each other as if they were one subject.
    """
    return [contradiction_problem(item) for item in find_contradictions(facts, threshold)]


def contradiction_problem(item: Contradiction) -> Problem:
    """The problem the inspector lists for a contradiction, tied to the pair's first frame."""
    return Problem(
        "contradicting_duplicates",
        item.first.image_path,
        f"near-duplicate of {item.second.image_path.name} (similarity {item.similarity:.3f}) but {item.reason}; "
        "check both labels or drop one",
    )


def find_contradictions(facts: list[FrameFacts], threshold: float = NEAR_DUPLICATE_SIMILARITY) -> list[Contradiction]:
    """Every pair of near-duplicate frames of one subject whose masks contradict, per structure with several.

    Frames without a subject are compared with each other as if they were one subject.
    """
    by_subject: dict[str | None, list[FrameFacts]] = {}
    for item in facts:
        if item.thumb is not None and item.area is not None:
            by_subject.setdefault(item.record.subject, []).append(item)
    found = []
    for group in by_subject.values():
        thumbs = np.stack([item.thumb for item in group])
        for i, j, similarity in near_duplicate_pairs(thumbs, threshold):
            found += _contradictions(group[i], group[j], similarity)
    return found


def _contradictions(a: FrameFacts, b: FrameFacts, similarity: float) -> list[Contradiction]:
    """How the masks of two near-duplicate frames contradict each other: per structure when there are several."""
    if a.class_areas is None or b.class_areas is None:
        contradicts, dice = _contradiction(a.area, a.mask_thumb, b.area, b.mask_thumb)
        return [Contradiction(a.record, b.record, similarity, (a.area, b.area), dice)] if contradicts else []
    found = []
    for name in a.class_areas:
        areas = (a.class_areas[name], b.class_areas[name])
        contradicts, dice = _contradiction(areas[0], a.class_thumbs[name], areas[1], b.class_thumbs[name])
        if contradicts:
            found.append(Contradiction(a.record, b.record, similarity, areas, dice, name))
    return found


def _contradiction(area_a: int, thumb_a, area_b: int, thumb_b) -> tuple[bool, float | None]:
    """Whether two masks contradict (one empty and one not, or a Dice below 0.5), and their Dice when both have one."""
    if (area_a == 0) != (area_b == 0):
        return True, None
    if not area_a:
        return False, None
    dice = soft_dice(thumb_a, thumb_b)
    return dice < CONTRADICTING_DICE, dice


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
        "mask_area": _area_stats(areas),
        "test_images": len(dataset.test),
        "sample_submission": str(dataset.sample_submission) if dataset.sample_submission else None,
        "sample_submission_rows": len(dataset.sample_ids) if dataset.sample_submission else None,
        **(_structures_summary(dataset.classes, facts) if dataset.classes else {}),
    }


def _structures_summary(classes: tuple[str, ...], facts: list[FrameFacts]) -> dict[str, Any]:
    """Per structure: frames with and without it and its areas; per pair: frames where the two overlap."""
    read = [item for item in facts if item.class_areas is not None]
    per_class = {}
    for name in classes:
        areas = np.array([item.class_areas[name] for item in read if item.class_areas[name]], dtype=np.int64)
        per_class[name] = {"with": int(areas.size), "without": len(read) - int(areas.size), "mask_area": _area_stats(areas)}
    pairs = [f"{a} & {b}" for index, a in enumerate(classes) for b in classes[index + 1 :]]
    overlaps = {pair: sum(1 for item in read if item.overlaps[pair]) for pair in pairs}
    return {"classes": per_class, "overlapping_frames": overlaps}


def _area_stats(areas: np.ndarray) -> dict[str, float] | None:
    if not areas.size:
        return None
    return {"min": int(areas.min()), "median": float(np.median(areas)), "max": int(areas.max())}
