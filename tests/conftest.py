"""Shared fixtures: the real data folder and small, editable copies of it."""

from __future__ import annotations

import csv
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
UNS_MINI = SHARED_DATA / "uns-mini"


def read_rows(path: Path) -> list[list[str]]:
    """All rows of a CSV file (header included), as text."""
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def write_rows(path: Path, rows: Iterable[Iterable[str]]) -> None:
    """Write rows (header included) as a UTF-8 CSV file."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle, lineterminator="\n").writerows(rows)


def uns_mini_rle(sample_id: str) -> str:
    """The ``pixels`` cell of ``uns-mini/train_masks.csv`` for a ``{subject}_{n}`` id."""
    subject, n = sample_id.split("_")
    for row in read_rows(UNS_MINI / "train_masks.csv")[1:]:
        if row[0] == subject and row[1] == n:
            return row[2]
    raise KeyError(sample_id)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only real data folder (``../shared/data`` from the project root)."""
    assert SHARED_DATA.is_dir(), f"real data not found at {SHARED_DATA}"
    return SHARED_DATA


@pytest.fixture
def small_kaggle_copy(tmp_path: Path, shared_data: Path) -> Callable[..., Path]:
    """Factory: a Kaggle-layout copy of a few uns-mini frames, masks, CSV rows and test frames.

    ``make(train_ids=("1_1", "1_2", "1_3"), test_ids=("1", "2"), name="kaggle")`` returns the new
    folder, which the test may then break as it likes.
    """
    source = shared_data / "uns-mini"

    def make(
        train_ids: Iterable[str] = ("1_1", "1_2", "1_3"),
        test_ids: Iterable[str] = ("1", "2"),
        name: str = "kaggle",
    ) -> Path:
        train_ids, test_ids = list(train_ids), list(test_ids)
        root = tmp_path / name
        (root / "train").mkdir(parents=True)
        (root / "test").mkdir()
        for sample_id in train_ids:
            shutil.copyfile(source / "train" / f"{sample_id}.tif", root / "train" / f"{sample_id}.tif")
            shutil.copyfile(source / "train" / f"{sample_id}_mask.tif", root / "train" / f"{sample_id}_mask.tif")
        for sample_id in test_ids:
            shutil.copyfile(source / "test" / f"{sample_id}.tif", root / "test" / f"{sample_id}.tif")
        header, *rows = read_rows(source / "train_masks.csv")
        wanted = set(train_ids)
        write_rows(root / "train_masks.csv", [header] + [row for row in rows if f"{row[0]}_{row[1]}" in wanted])
        header, *rows = read_rows(source / "sample_submission.csv")
        by_id = {row[0]: row for row in rows}
        write_rows(root / "sample_submission.csv", [header] + [by_id[sample_id] for sample_id in test_ids])
        return root

    return make


TINY_OVERRIDES = ("input.height=64", "input.width=96", "trainer.batch_size=8", "model.encoder_weights=none", "trainer.accelerator=cpu")


def set_args(*overrides: str) -> list[str]:
    """``--set`` arguments for the command line."""
    return [item for override in overrides for item in ("--set", override)]


@pytest.fixture(scope="session")
def tiny_uns_run(tmp_path_factory, shared_data: Path) -> Path:
    """A run folder trained for 2 tiny epochs (64x96, resnet18) on uns-mini through the command line."""
    from medseg.cli import main

    run = tmp_path_factory.mktemp("runs") / "uns"
    args = ["train", str(shared_data / "uns-mini"), "--out", str(run), "--preset", "cpu", "--quiet", "--no-report"]
    assert main(args + set_args(*TINY_OVERRIDES, "trainer.max_epochs=2")) == 0
    return run


@pytest.fixture
def run_copy(tiny_uns_run, tmp_path) -> Path:
    """A private copy of the tiny uns-mini run (without last.ckpt), free to tune, predict into and break."""
    target = tmp_path / "run"
    shutil.copytree(tiny_uns_run, target, ignore=shutil.ignore_patterns("last.ckpt"))
    return target
