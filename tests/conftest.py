"""Shared fixtures: the real data folder and small, editable copies of it."""

from __future__ import annotations

import csv
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

# The suite runs on pytest-xdist's workers (pyproject.toml's addopts): each worker, and the processes its tests start,
# gets its share of the cores for PyTorch's threads, set before anything imports torch, so the workers do not oversubscribe.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

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


# The shared runs below are trained once per test session and only read: a test that changes a run (tunes it,
# predicts into it, breaks a file) works on a copy (``shutil.copytree`` into its ``tmp_path``, or ``run_copy``).
# A test whose point is training itself (resume, determinism, a full disk, NaN) trains its own run.


def train_tiny(data: Path, run: Path, *extra: str, epochs: int = 2) -> Path:
    """Train ``run`` on ``data`` through the command line with the cpu preset and :data:`TINY_OVERRIDES`.

    Args:
        data: The data folder.
        run: The run folder to write (it must not exist yet).
        *extra: More command-line arguments (``--folds 2``, ``--classes ...``), before the ``--set`` overrides.
        epochs: ``trainer.max_epochs``.

    Returns:
        ``run``.
    """
    from medseg.cli import main

    args = ["train", str(data), "--out", str(run), "--preset", "cpu", "--quiet", "--no-report", *extra]
    assert main(args + set_args(*TINY_OVERRIDES, f"trainer.max_epochs={epochs}")) == 0
    return run


@pytest.fixture(scope="session")
def tiny_uns_run(tmp_path_factory, shared_data: Path) -> Path:
    """A run folder trained for 2 tiny epochs (64x96, resnet18) on uns-mini through the command line.

    One fold (fold 0 of the 5-fold subject-grouped split validates), ``last.ckpt`` kept, not tuned.

    Returns:
        The run folder; read it only (copy it, or use ``run_copy``, to change it).
    """
    return train_tiny(shared_data / "uns-mini", tmp_path_factory.mktemp("runs") / "uns")


@pytest.fixture
def run_copy(tiny_uns_run, tmp_path) -> Path:
    """A private copy of the tiny uns-mini run (without last.ckpt), free to tune, predict into and break.

    Returns:
        ``tmp_path / "run"``.
    """
    target = tmp_path / "run"
    shutil.copytree(tiny_uns_run, target, ignore=shutil.ignore_patterns("last.ckpt"))
    return target


@pytest.fixture(scope="session")
def tiny_sample_run(tmp_path_factory) -> Path:
    """A one-fold run trained through the command line for 2 tiny epochs of one batch on the bundled sample.

    The sample has 38 frames of 5 subjects; the cpu preset's model (resnet18 U-Net with a presence head),
    :data:`TINY_OVERRIDES` and ``trainer.limit_train_batches=1``; ``last.ckpt`` and ``done.json`` kept, not tuned.

    Returns:
        The run folder; read it only (``shutil.copytree`` it to change it).
    """
    from medseg.data.datasets import sample_data_path

    return train_tiny(sample_data_path(), tmp_path_factory.mktemp("sample") / "run", *set_args("trainer.limit_train_batches=1"))


TWO_FOLD_IDS = tuple(f"{subject}_{index}" for subject in ("1", "2", "3", "4", "5", "6") for index in (1, 2))


@pytest.fixture(scope="session")
def two_fold_run(tmp_path_factory, shared_data: Path) -> Path:
    """A 2-fold run of one tiny epoch on 12 uns-mini frames of 6 subjects, in a data folder of its own.

    The data folder (Kaggle layout, frames and mask files only) is ``run.parent / "data"``; every fold has its
    ``best.ckpt``, ``last.ckpt`` and ``done.json``; not tuned.

    Returns:
        The run folder; read it and its data only (copy them to change them).
    """
    source = shared_data / "uns-mini" / "train"
    data = tmp_path_factory.mktemp("two-fold") / "data"
    (data / "train").mkdir(parents=True)
    for sample_id in TWO_FOLD_IDS:
        for suffix in ("", "_mask"):
            shutil.copyfile(source / f"{sample_id}{suffix}.tif", data / "train" / f"{sample_id}{suffix}.tif")
    return train_tiny(data, data.parent / "run", "--folds", "2", epochs=1)


def constant_loss(value: float) -> Callable:
    """A stand-in for :func:`medseg.learn.losses.create_loss` whose loss is ``value`` (NaN or inf), with a gradient.

    Patch it over ``medseg.learn.module.create_loss`` to make training meet a loss that is not finite.
    """

    def create(config):
        def loss(outputs, masks):
            logits = outputs[0] if isinstance(outputs, tuple) else outputs
            return logits.float().mean() * 0.0 + value

        return loss

    return create
