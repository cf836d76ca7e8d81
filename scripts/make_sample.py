"""Rebuild the bundled sample (src/medseg/sample_data/uns-sample) from ../shared/data/uns-mini/train.

Five subjects become the training set; a sixth subject's frames become a small test set, renamed to
Kaggle test ids ``{n}.tif`` with an all-empty ``sample_submission.csv`` and their true masks in
``test_truth.csv``. ``uns-mini/test`` is never used. Run from the project root:
``.venv/bin/python scripts/make_sample.py``.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

SOURCE = Path("../shared/data/uns-mini")
TARGET = Path("src/medseg/sample_data/uns-sample")
TRAIN_SUBJECTS = ("1", "7", "10", "17", "24")
TEST_SUBJECT = "25"


def main() -> None:
    """Copy the chosen subjects' frames, masks and RLE rows into the package."""
    with open(SOURCE / "train_masks.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    if TARGET.exists():
        shutil.rmtree(TARGET)
    (TARGET / "train").mkdir(parents=True)
    (TARGET / "test").mkdir()
    train_rows = [row for row in rows if row["subject"] in TRAIN_SUBJECTS]
    for row in train_rows:
        stem = f"{row['subject']}_{row['img']}"
        shutil.copyfile(SOURCE / "train" / f"{stem}.tif", TARGET / "train" / f"{stem}.tif")
        shutil.copyfile(SOURCE / "train" / f"{stem}_mask.tif", TARGET / "train" / f"{stem}_mask.tif")
    _write_csv(TARGET / "train_masks.csv", ("subject", "img", "pixels"), [(r["subject"], r["img"], r["pixels"]) for r in train_rows])
    test_rows = [row for row in rows if row["subject"] == TEST_SUBJECT]
    truth = []
    for number, row in enumerate(test_rows, start=1):
        shutil.copyfile(SOURCE / "train" / f"{row['subject']}_{row['img']}.tif", TARGET / "test" / f"{number}.tif")
        truth.append((str(number), row["pixels"]))
    _write_csv(TARGET / "sample_submission.csv", ("img", "pixels"), [(number, "") for number, _ in truth])
    _write_csv(TARGET / "test_truth.csv", ("img", "pixels"), truth)
    shutil.copyfile(SOURCE.parent / "usgra-seg" / "LICENSE", TARGET / "LICENSE")


def _write_csv(path: Path, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


if __name__ == "__main__":
    main()
