"""Inspector speed on a Kaggle-size data set: 5,635 frames of 580x420 with their masks and RLE rows.

Builds a Kaggle-layout folder of copies of the real uns-mini frames and masks (47 subjects of about 120
frames; within a subject every frame repeats after 100, so that the near-duplicate search has pairs to
check), then times ``load_dataset`` + ``inspect_dataset`` with 1 thread and with every core, in one run.

Usage: ``.venv/bin/python bench/inspect_speed.py [--frames N] [--keep DIR]``.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import tempfile
import time
from pathlib import Path

from medseg.data.datasets import load_dataset
from medseg.data.inspector import inspect_dataset

UNS_MINI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "uns-mini"
SUBJECTS = 47
REPEAT = 100


def build(root: Path, frames: int) -> None:
    """Write a Kaggle-layout folder of ``frames`` copies of uns-mini frames into ``root``."""
    with open(UNS_MINI / "train_masks.csv", newline="") as handle:
        sources = [(f"{row['subject']}_{row['img']}", row["pixels"]) for row in csv.DictReader(handle)]
    (root / "train").mkdir(parents=True)
    per_subject = -(-frames // SUBJECTS)
    rows = []
    for index in range(frames):
        subject, n = divmod(index, per_subject)
        source_id, pixels = sources[(subject * 37 + n % REPEAT) % len(sources)]
        target = f"{subject + 1}_{n + 1}"
        _place(UNS_MINI / "train" / f"{source_id}.tif", root / "train" / f"{target}.tif")
        _place(UNS_MINI / "train" / f"{source_id}_mask.tif", root / "train" / f"{target}_mask.tif")
        rows.append((str(subject + 1), str(n + 1), pixels))
    with open(root / "train_masks.csv", "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(("subject", "img", "pixels"))
        writer.writerows(rows)


def _place(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def time_inspection(root: Path, workers: int) -> tuple[float, int, int]:
    """Seconds to load and inspect ``root``, the number of frames and of problems."""
    start = time.perf_counter()
    inspection = inspect_dataset(load_dataset(root), workers=workers)
    return time.perf_counter() - start, inspection.summary["train_images"], len(inspection.problems)


def main() -> None:
    """Build the folder, time the inspector, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=5635)
    parser.add_argument("--keep", type=Path, help="build the folder here and keep it")
    args = parser.parse_args()
    temporary = None if args.keep else tempfile.TemporaryDirectory(prefix="medseg-inspect-bench-")
    root = args.keep or Path(temporary.name) / "kaggle"
    if not (root / "train").is_dir():
        build(root, args.frames)
    cores = os.cpu_count() or 1
    print(f"{args.frames} frames of 580x420 (LZW TIFF) + masks + RLE rows; {cores} cores")
    print(f"{'threads':>7} {'seconds':>8} {'frames/s':>9} {'problems':>9}")
    results = {}
    for workers in sorted({1, cores}):
        seconds, frames, problems = time_inspection(root, workers)
        results[workers] = seconds
        print(f"{workers:>7} {seconds:>8.1f} {frames / seconds:>9.0f} {problems:>9}")
    if cores > 1:
        print(f"speed-up with {cores} threads: {results[1] / results[cores]:.2f}x")
    if temporary:
        temporary.cleanup()


if __name__ == "__main__":
    main()
