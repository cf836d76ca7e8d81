"""Pseudo-labelled frames in training: which teacher's labels each fold may learn from, without leaking its validation.

A teacher run predicted frames without labels (:mod:`medseg.infer.pseudo`); its confident masks join the training
frames of a student run. Only the labelled frames are validated, tuned and scored, so what must stay out is any
path from a validation frame's label into the model validated on it. The teacher's models learnt from labels: the
student's fold K may use the masks of a teacher model that never trained on a frame of fold K's validation, and
those only. Which frames a teacher model trained on is known from the teacher run itself (the digests of its frames
in ``frames.json`` and its folds in ``split.json``), so the rule holds whatever data the teacher learnt from:

- a teacher that never saw a student's labelled frame (its frames' digests meet none of the student's): the ensemble
  of all its fold models, for every fold;
- else, for the student's fold K, the teacher's fold model whose training frames hold none of fold K's validation
  frames (the same data split the same way: the teacher's fold K); none such: the fold is refused, in one line.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.data.samples import Sample
from medseg.errors import UsageError
from medseg.files import atomic_write

ENSEMBLE = -1
"""The key of the fold ensemble's masks in :attr:`PseudoLabels.masks` (a teacher fold's key is its number)."""
EXAMPLES = 8
"""Pseudo-labelled frames a run keeps, with their masks, for its report's gallery (``RUN/pseudo_examples.npz``)."""
PREFIX = "pseudo:"
"""What a pseudo-labelled frame's id starts with among the training ids (it never meets a labelled frame's)."""


@dataclass(frozen=True)
class PseudoLabels:
    """A teacher's confident masks for frames without labels, by the teacher model that made them.

    Attributes:
        ids: The frames' ids (their file names without the suffix).
        frames: The gray frames, as the readers give them.
        masks: By teacher fold (:data:`ENSEMBLE` for the mean of all), each frame's mask where that model was
            confident, ``None`` where it was not. Shape of a mask: (H, W) for one structure, (C, H, W) for several.
        teacher_frames: The digests (:func:`~medseg.data.samples.frame_digest`) of every frame the teacher trained
            or validated on.
        teacher_validation: By teacher fold, the digests of that fold's validation frames (the frames its model did
            not train on).
    """

    ids: list[str]
    frames: list[np.ndarray]
    masks: Mapping[int, Sequence[np.ndarray | None]]
    teacher_frames: frozenset[str]
    teacher_validation: Mapping[int, frozenset[str]]

    def source(self, held_out: set[str], labelled: set[str], fold: int) -> int:
        """The teacher model whose masks the student's ``fold`` may learn from (:data:`ENSEMBLE` or a teacher fold).

        Args:
            held_out: The digests (:func:`~medseg.data.samples.frame_digest`) of the fold's validation frames.
            labelled: The digests of every labelled frame of the student.
            fold: The student's fold, for the message.

        Raises:
            UsageError: If every teacher model trained on one of the fold's validation frames.
        """
        if not self.teacher_frames & labelled:
            return ENSEMBLE
        for teacher_fold, left_out in sorted(self.teacher_validation.items()):
            if not held_out & (self.teacher_frames - left_out):
                return teacher_fold
        raise UsageError(
            f"fold {fold}: every model of the teacher trained on some of this fold's validation frames, so its pseudo-labels "
            "would carry their labels; train the teacher on the same data with the same folds (--folds N, split.seed) as the student"
        )

    def samples(self, source: int) -> dict[str, Sample]:
        """The pseudo-labelled training frames of one teacher model: the confident ones, by their prefixed id."""
        return {
            f"{PREFIX}{sample_id}": (frame, mask.view(np.uint8))
            for sample_id, frame, mask in zip(self.ids, self.frames, self.masks[source], strict=True)
            if mask is not None
        }

    def kept(self, source: int) -> int:
        """How many frames one teacher model labelled with confidence."""
        return sum(mask is not None for mask in self.masks[source])


def save_examples(path: Path, labels: PseudoLabels, source: int) -> None:
    """Keep up to :data:`EXAMPLES` of one teacher model's pseudo-labelled frames with their masks, spread over the frames."""
    kept = [index for index, mask in enumerate(labels.masks[source]) if mask is not None]
    chosen = [kept[int(position)] for position in np.linspace(0, len(kept) - 1, min(EXAMPLES, len(kept))).round()]
    arrays = {"ids": np.array([labels.ids[index] for index in chosen], dtype=str)}
    for number, index in enumerate(chosen):
        arrays[f"frame_{number}"] = labels.frames[index]
        arrays[f"mask_{number}"] = labels.masks[source][index]
    with atomic_write(path, "wb") as stream:
        np.savez_compressed(stream, **arrays)


def read_examples(path: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """The examples a run kept: (id, frame, mask) each; none when the file is missing or damaged (a gallery is optional)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            ids = [str(sample_id) for sample_id in archive["ids"]]
            return [(sample_id, archive[f"frame_{number}"], archive[f"mask_{number}"].astype(bool)) for number, sample_id in enumerate(ids)]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return []
