"""Folds in parallel, as nnU-Net's users train them (issue 33): ``train --plan-only`` writes the run folder, each fold is
then trained by its own process (``--resume --fold K``: a scheduler's array job, one GPU each), and ``tune`` works once
every fold is done. Two processes at once give the files one process gives; a fold trained or being trained is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_OVERRIDES, set_args
from medseg import runs
from medseg.cli import main
from medseg.data.datasets import sample_data_path

# tune_after as --preset kaggle has it: one process trains every fold and tunes, a process of one fold does not
SETTINGS = [
    "--preset",
    "cpu",
    *set_args(*TINY_OVERRIDES, "trainer.max_epochs=2", "trainer.early_stopping_patience=50", "trainer.tune_after=true"),
]
DETERMINISTIC = ("epoch", "train_loss", "val_loss", "val_score", "lr")  # metrics.csv's columns that are not timings


def medseg(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "medseg.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finished(process: subprocess.Popen) -> str:
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 0, output[-2000:]
    return output


@pytest.fixture(scope="module")
def planned(tmp_path_factory) -> Path:
    """A 2-fold run planned by ``--plan-only``: its folder written, no fold trained."""
    run = tmp_path_factory.mktemp("planned") / "run"
    output = finished(medseg("train", str(sample_data_path()), "--out", str(run), "--folds", "2", "--plan-only", *SETTINGS))
    assert "still to train: fold(s) 0, 1 of 2" in output and "--resume --fold K" in output and f"medseg tune {run}" in output
    return run


def planned_copy(planned: Path, tmp_path: Path) -> Path:
    shutil.copytree(planned, tmp_path / "run")
    return tmp_path / "run"


def test_plan_only_writes_the_plan_and_trains_nothing(planned):
    assert {path.name for path in planned.iterdir()} >= {"run.json", "config.yaml", "split.json", "frames.json"}
    assert not list(planned.glob("fold_*/checkpoints")) and runs.RunPlan.read(planned / runs.RUN_FILE).folds == [0, 1]


def test_two_processes_train_the_two_folds_at_once_as_one_process_trains_both(planned, tmp_path):
    run = planned_copy(planned, tmp_path)
    processes = [medseg("train", str(sample_data_path()), "--out", str(run), "--resume", "--fold", str(k), "--no-report") for k in (0, 1)]
    outputs = [finished(process) for process in processes]
    assert all("still to train: fold(s)" in output or "every fold of the run is trained: medseg tune" in output for output in outputs)
    assert not (run / runs.POSTPROCESS_FILE).exists()  # neither process of one fold tuned
    whole = tmp_path / "whole"
    finished(medseg("train", str(sample_data_path()), "--out", str(whole), "--folds", "2", "--no-report", *SETTINGS))
    assert (whole / runs.POSTPROCESS_FILE).is_file()  # the one process that trained every fold tuned at its end
    for folder in (run, whole):
        finished(medseg("tune", str(folder), "--no-report", "--quiet", "--force"))
    assert tree(run) == tree(whole)
    for fold in (0, 1):
        parallel, sequential = (runs.read_metrics(folder / f"fold_{fold}" / runs.METRICS_FILE) for folder in (run, whole))
        assert [[row[c] for c in DETERMINISTIC] for row in parallel] == [[row[c] for c in DETERMINISTIC] for row in sequential]
        assert (run / f"fold_{fold}" / runs.DONE_FILE).read_bytes() == (whole / f"fold_{fold}" / runs.DONE_FILE).read_bytes()
    assert (run / runs.POSTPROCESS_FILE).read_bytes() == (whole / runs.POSTPROCESS_FILE).read_bytes()
    assert not list(run.glob(f"fold_*/{runs.LOCK_FILE}"))  # each process let go of its fold


def tree(folder: Path) -> list[str]:
    """The files of a run folder, by path (TensorBoard's logs aside: their names hold the time and host)."""
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file() and "tensorboard" not in path.parts)


def hold_lock(fold: Path, pid: int, host: str | None = None) -> None:
    fold.mkdir(parents=True, exist_ok=True)
    lock = runs.TrainingLock(host=host or socket.gethostname(), pid=pid, started="2026-12-06T05:00:00+00:00")
    (fold / runs.LOCK_FILE).write_text(lock.model_dump_json())


def gone_pid() -> int:
    """The id of a process that has ended."""
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(ended.stdout)


def resume_fold(run: Path, fold: int) -> list[str]:
    return ["train", str(sample_data_path()), "--out", str(run), "--resume", "--fold", str(fold), "--quiet", "--no-report"]


@pytest.mark.parametrize("host", [None, "another-machine"])
def test_a_fold_being_trained_is_refused_in_one_line(planned, tmp_path, capsys, host):
    run = planned_copy(planned, tmp_path)
    hold_lock(run / "fold_1", os.getpid(), host)  # a living process on this machine, or any process on another one
    assert main(resume_fold(run, 1)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"fold 1 is being trained by process {os.getpid()}" in err and "delete" in err, err
    assert not (run / "fold_1" / "checkpoints").exists()


def test_the_lock_of_a_killed_process_is_taken_over(planned, tmp_path):
    run = planned_copy(planned, tmp_path)
    hold_lock(run / "fold_0", gone_pid())
    assert main(resume_fold(run, 0)) == 0
    assert (run / "fold_0" / runs.DONE_FILE).is_file() and not (run / "fold_0" / runs.LOCK_FILE).exists()


def test_tune_says_which_folds_are_missing_and_a_trained_fold_is_skipped(planned, tmp_path, capsys):
    run = planned_copy(planned, tmp_path)
    assert main(resume_fold(run, 0)) == 0
    capsys.readouterr()
    for command in (["tune", str(run), "--no-report"], ["predict", str(run), str(tmp_path), "--out", str(tmp_path / "s.csv")]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "fold(s) 1 of 2 not trained yet" in err and "--resume --fold K" in err, err
    before = (run / "fold_0" / runs.METRICS_FILE).read_bytes()
    again = [arg for arg in resume_fold(run, 0) if arg != "--quiet"]
    assert main(again) == 0  # an array job submitted again: the trained task ends well, so afterok holds
    assert f"fold 0: already trained ({run / 'fold_0' / runs.DONE_FILE}), skipped" in capsys.readouterr().err
    assert (run / "fold_0" / runs.METRICS_FILE).read_bytes() == before


def test_a_fold_outside_the_plan_and_plan_only_with_resume_are_refused(planned, tmp_path, capsys):
    run = planned_copy(planned, tmp_path)
    assert main(resume_fold(run, 5)) == 2
    assert "fold 5 is not in the run's plan (folds 0, 1)" in capsys.readouterr().err
    assert main(["train", str(sample_data_path()), "--out", str(run), "--resume", "--plan-only"]) == 2
    assert "--plan-only writes a new run folder" in capsys.readouterr().err


def test_force_does_not_replace_a_run_being_trained(planned, tmp_path, capsys):
    run = planned_copy(planned, tmp_path)
    hold_lock(run / "fold_0", os.getpid())
    assert main(["train", str(sample_data_path()), "--out", str(run), "--folds", "2", "--force", *SETTINGS]) == 2
    assert "a process is training it now" in capsys.readouterr().err
    assert json.loads((run / "fold_0" / runs.LOCK_FILE).read_text())["pid"] == os.getpid()


def test_a_lock_that_cannot_be_read_counts_as_held(planned, tmp_path, capsys):
    run = planned_copy(planned, tmp_path)
    (run / "fold_0").mkdir(exist_ok=True)
    (run / "fold_0" / runs.LOCK_FILE).write_text("")  # as another process's lock would look if it were not written whole
    assert main(resume_fold(run, 0)) == 2
    assert "fold 0 is being trained by another process (its lock cannot be read)" in capsys.readouterr().err


def test_a_gone_process_lock_is_taken_over_by_one_process_only(planned, tmp_path):
    run = planned_copy(planned, tmp_path)
    hold_lock(run / "fold_0", gone_pid())
    stale = runs.TrainingLock.model_validate_json((run / "fold_0" / runs.LOCK_FILE).read_text())
    fold = runs.fold_dirs(run, [0], True)[0]
    assert runs._take_over(fold.lock_file, stale) and not fold.lock_file.exists()
    assert not runs._take_over(fold.lock_file, stale)  # the second one finds nothing to take
    hold_lock(run / "fold_0", os.getpid())  # a new lock in place of the stale one: put back, not taken
    assert not runs._take_over(fold.lock_file, stale) and fold.lock_file.is_file()
    assert [path.name for path in (run / "fold_0").iterdir()] == [runs.LOCK_FILE]


def test_a_link_in_place_of_the_lock_is_neither_followed_nor_deleted(planned, tmp_path, capsys):
    run = planned_copy(planned, tmp_path)
    mine = tmp_path / "my-notes.json"  # a user's file that even reads as a gone process's lock
    mine.write_text(runs.TrainingLock(host=socket.gethostname(), pid=gone_pid(), started="2026-12-06T05:00:00+00:00").model_dump_json())
    (run / "fold_0").mkdir(exist_ok=True)
    (run / "fold_0" / runs.LOCK_FILE).symlink_to(mine)
    before = mine.read_bytes()
    assert main(resume_fold(run, 0)) == 2
    assert "its lock cannot be read" in capsys.readouterr().err
    assert (run / "fold_0" / runs.LOCK_FILE).is_symlink() and mine.read_bytes() == before
    assert [path.name for path in (run / "fold_0").iterdir()] == [runs.LOCK_FILE]
