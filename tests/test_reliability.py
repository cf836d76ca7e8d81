"""Killed runs, full disks, overwrites and determinism: nothing a user has is lost."""

from __future__ import annotations

import csv
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY_OVERRIDES, set_args
from medseg.cli import main
from medseg.data.datasets import sample_data_path
from medseg.infer import submission

KILL_POINTS = 5
EPOCHS = 3


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "medseg.cli", *args]


def train_command(run: Path, epochs: int = EPOCHS) -> list[str]:
    command = cli("train", str(sample_data_path()), "--out", str(run), "--preset", "cpu", "--quiet", "--no-report")
    return command + set_args(*TINY_OVERRIDES, f"trainer.max_epochs={epochs}", "trainer.early_stopping_patience=50")


def resume_command(run: Path) -> list[str]:
    return cli("train", str(sample_data_path()), "--out", str(run), "--resume", "--quiet", "--no-report")


def metric_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def assert_checkpoints_readable(run: Path) -> None:
    for checkpoint in (run / "checkpoints").glob("*.ckpt"):
        loaded = torch.load(checkpoint, map_location="cpu", weights_only=False)
        assert "state_dict" in loaded and "epoch" in loaded, checkpoint


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> list[dict[str, str]]:
    run = tmp_path_factory.mktemp("whole") / "run"
    subprocess.run(train_command(run), check=True, capture_output=True, timeout=600)
    return metric_rows(run / "metrics.csv")


def test_sigkill_at_random_points_then_resume(tmp_path, uninterrupted):
    seed = int(os.environ.get("MEDSEG_KILL_SEED", time.time_ns() % 100_000))
    rng = random.Random(seed)
    print(f"kill seed {seed} (set MEDSEG_KILL_SEED to replay)")
    for point in range(KILL_POINTS):
        run = tmp_path / f"run{point}"
        process = subprocess.Popen(train_command(run), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        delay = rng.uniform(4.0, 16.0)
        try:
            process.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait()
        if not (run / "run.json").is_file():
            continue  # killed before the run folder was written: nothing to resume, nothing lost
        if not (run / "config.yaml").is_file():  # killed while its folder was being written: nothing trained yet
            refused = subprocess.run(resume_command(run), capture_output=True, text=True, check=False, timeout=600)
            assert refused.returncode == 2 and "start the run again with --force" in refused.stderr, refused.stderr
            continue
        assert_checkpoints_readable(run)
        resumed = subprocess.run(resume_command(run), capture_output=True, text=True, check=False, timeout=600)
        assert resumed.returncode == 0, f"kill after {delay:.1f}s (seed {seed}): {resumed.stderr[-1500:]}"
        rows = metric_rows(run / "metrics.csv")
        assert [row["epoch"] for row in rows] == [str(e) for e in range(1, EPOCHS + 1)], f"seed {seed}, point {point}"
        assert not list((run / "checkpoints").glob(".*.tmp"))
        assert_checkpoints_readable(run)


def test_same_seed_same_metrics(tmp_path, uninterrupted):
    run = tmp_path / "again"
    subprocess.run(train_command(run), check=True, capture_output=True, timeout=600)
    again = metric_rows(run / "metrics.csv")
    columns = ("epoch", "train_loss", "val_loss", "val_score", "lr")
    assert [[row[c] for c in columns] for row in again] == [[row[c] for c in columns] for row in uninterrupted]


def test_killed_prediction_leaves_no_partial_submission(tiny_uns_run, tmp_path, shared_data):
    out = tmp_path / "submission.csv"
    command = cli("predict", str(tiny_uns_run), str(shared_data / "uns-mini" / "test"), "--out", str(out), "--quiet", "--allow-degenerate")
    for delay in (3.0, 6.0, 9.0):
        process = subprocess.Popen(command + ["--force"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            process.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait()
        if out.exists():  # a finished write is whole
            report = submission.validate_file(out, sample=shared_data / "uns-mini" / "sample_submission.csv", sizes=(420, 580))
            assert report.rows == 53 and not report.problems
        assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def can_mount_tmpfs(folder: Path) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    folder.mkdir(parents=True, exist_ok=True)
    mount = ["mount", "-t", "tmpfs", "-o", "size=300m", "tmpfs", str(folder)]
    return subprocess.run(mount, capture_output=True, check=False).returncode == 0


def test_full_disk_stops_with_a_message_and_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch):
    """A 300 MB filesystem holds the first epoch's best.ckpt (~57 MB, weights) and last.ckpt (~170 MB) but not a second last.ckpt."""
    disk = tmp_path / "small-disk"
    mounted = can_mount_tmpfs(disk)
    if not mounted:
        from medseg import files
        from medseg.learn import callbacks

        original = files.atomic_write
        writes = {"count": 0}

        def failing(path, mode="w"):
            if str(path).endswith(".ckpt"):
                writes["count"] += 1
                if writes["count"] > 2:
                    raise OSError(28, "No space left on device", str(path))
            return original(path, mode)

        monkeypatch.setattr(callbacks, "atomic_write", failing)  # the checkpoint writer's
    try:
        run = disk / "run"
        args = ["train", str(sample_data_path()), "--out", str(run), "--preset", "cpu", "--quiet", "--no-report"]
        code = main(args + set_args(*TINY_OVERRIDES, "trainer.max_epochs=3", "trainer.early_stopping_patience=50"))
        err = capsys.readouterr().err
        assert code == 1 and "disk full" in err and "Traceback" not in err
        assert_checkpoints_readable(run)
        assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["epoch"] == 0
        assert not list((run / "checkpoints").glob(".*.tmp"))
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=False)


def test_two_runs_at_once_do_not_interfere(tmp_path):
    runs = [tmp_path / "a", tmp_path / "b"]
    processes = [
        subprocess.Popen(train_command(run, epochs=1), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for run in runs
    ]
    for process in processes:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-1500:]
    for run in runs:
        assert len(metric_rows(run / "metrics.csv")) == 1
        assert_checkpoints_readable(run)
