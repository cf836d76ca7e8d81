"""Decoded samples: every labelled frame and its mask read and checked once, kept in memory.

Frames are ``uint8`` when every one is stored with 8 bits, else all ``float32`` in [0, 1] (windowed, see
:mod:`medseg.data.intensity`), so that they batch together.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from medseg import progress
from medseg.config import DataOptions
from medseg.data.datasets import Record, read_sample
from medseg.data.intensity import as_eight_bit, common_type
from medseg.errors import DataError, FileError

Sample = tuple[np.ndarray, np.ndarray]


def load_samples(records: list[Record], options: DataOptions, workers: int | None = None) -> dict[str, Sample]:
    """Decode and check every labelled frame once, in threads.

    Args:
        records: Labelled records.
        options: How masks are read.
        workers: Reading threads; defaults to the CPU count.

    Returns:
        Frame (``uint8``, or ``float32`` in [0, 1] when any frame is deeper) and mask (``uint8`` 0/1) by record id.

    Raises:
        DataError: If any sample cannot be used; says how many and shows the first.
    """

    def read(record: Record) -> Sample | FileError:
        try:
            image, mask = read_sample(record, options)
        except FileError as error:
            return error
        return image, mask.view(np.uint8)

    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        results = list(progress.track(pool.map(read, records), len(records), "reading frames"))
    failures = [result for result in results if isinstance(result, FileError)]
    if failures:
        raise DataError(f"{len(failures)} sample(s) cannot be used, first: {failures[0]}; `medseg inspect DATA` lists them all")
    frames = common_type([image for image, _ in results])
    return {record.id: (frame, mask) for record, frame, (_, mask) in zip(records, frames, results, strict=True)}


def frame_digest(frame: np.ndarray) -> str:
    """A digest of a frame's content: the same for the same pixels under another name, path or file format.

    Frames deeper than 8 bits are digested at 8 bits (their [0, 1] values times 255, rounded), so that a frame
    read alone and the same frame batched with others (:func:`~medseg.data.intensity.common_type`) agree.

    Shape:
        frame: (H, W).
    """
    values = as_eight_bit(frame)
    digest = hashlib.sha256(f"{values.shape}".encode())
    digest.update(np.ascontiguousarray(values).tobytes())
    return digest.hexdigest()[:32]
