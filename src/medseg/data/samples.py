"""Decoded samples: every labelled frame and its mask read and checked once, kept in memory as ``uint8``."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from medseg import progress
from medseg.config import DataOptions
from medseg.data.datasets import Record, read_sample
from medseg.errors import DataError, FileError

Sample = tuple[np.ndarray, np.ndarray]


def load_samples(records: list[Record], options: DataOptions, workers: int | None = None) -> dict[str, Sample]:
    """Decode and check every labelled frame once, in threads.

    Args:
        records: Labelled records.
        options: How masks are read.
        workers: Reading threads; defaults to the CPU count.

    Returns:
        Frame (``uint8``) and mask (``uint8`` 0/1) by record id.

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
    return {record.id: result for record, result in zip(records, results)}
