"""What a run costs, told before and while it runs: the CPU warning, ``train --dry-run``, the whole-run line
of ``train`` and the ETA lines of ``predict``, as plain lines (no carriage-return bars) off a terminal.

The runs are tiny (15 frames of 5 subjects, 64x96): the counting is what is checked, not the speed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from conftest import TINY_OVERRIDES, read_rows, set_args, write_rows
from medseg import devices, progress, runs
from medseg.cli import main
from medseg.config import load_config
from medseg.data import splits
from medseg.learn import estimate, train
from medseg.learn.estimate import FoldFrames, StepTimes, TrainingPlan, cpu_warning, may_stop_early
from medseg.learn.run_progress import UPPER_BOUND, RunProgress, run_line

TRAIN_IDS = [f"{subject}_{n}" for subject in range(1, 6) for n in range(1, 4)]
TEST_IDS = ["1", "2", "3", "4", "5"]
TINY = [*set_args(*TINY_OVERRIDES, "trainer.max_epochs=2"), "--preset", "cpu"]
RUN_LINE = re.compile(r"^run: (\d+)/(\d+) folds done; fold (\d+) epoch (\d+)/(\d+), best score (\S+); ETA (.+)$")


def copy_frames(source: Path, root: Path) -> Path:
    """A Kaggle-layout copy of :data:`TRAIN_IDS` and :data:`TEST_IDS` of uns-mini."""
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    for sample_id in TRAIN_IDS:
        for suffix in (".tif", "_mask.tif"):
            shutil.copyfile(source / "train" / f"{sample_id}{suffix}", root / "train" / f"{sample_id}{suffix}")
    for sample_id in TEST_IDS:
        shutil.copyfile(source / "test" / f"{sample_id}.tif", root / "test" / f"{sample_id}.tif")
    header, *rows = read_rows(source / "train_masks.csv")
    write_rows(root / "train_masks.csv", [header] + [row for row in rows if f"{row[0]}_{row[1]}" in set(TRAIN_IDS)])
    header, *rows = read_rows(source / "sample_submission.csv")
    write_rows(root / "sample_submission.csv", [header] + [row for row in rows if row[0] in TEST_IDS])
    return root


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, shared_data) -> Path:
    return copy_frames(shared_data / "uns-mini", tmp_path_factory.mktemp("data") / "small")


@pytest.fixture(scope="module")
def process_run(small_data, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A 2-fold, 2-epoch run trained by a real process whose output is not a terminal, with that process's result."""
    run = tmp_path_factory.mktemp("runs") / "run"
    command = [sys.executable, "-m", "medseg.cli", "train", str(small_data), "--out", str(run), "--folds", "2", "--no-report", *TINY]
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return run, result


def tree(folder: Path) -> list[tuple[str, int, int]]:
    """Every path under ``folder`` with its size and modification time."""
    return sorted((str(path.relative_to(folder)), path.stat().st_size, path.stat().st_mtime_ns) for path in folder.rglob("*"))


@pytest.fixture
def fake_timing(monkeypatch):
    """No CUDA, and timed steps of 2 s (validation batches of 1 s) without training anything."""
    monkeypatch.setattr(estimate, "uses_cuda", lambda config: False)
    monkeypatch.setattr(train, "time_steps", lambda config, train_samples, val_samples, steps: StepTimes(2.0, 1.0, steps))


@pytest.mark.parametrize("preset", ["kaggle", "default"])
def test_a_gpu_sized_preset_without_cuda_warns_once_with_the_estimate_and_the_alternative(
    preset, small_data, tmp_path, capsys, fake_timing
):
    assert main(["train", str(small_data), "--out", str(tmp_path / "run"), "--preset", preset, "--dry-run", "--quiet"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, warnings
    folds = 5 if preset == "kaggle" else 1
    assert f"448x608 input, {folds} fold(s) x up to 100 epochs" in warnings[0] and "no CUDA device" in warnings[0]
    assert "estimate: up to " in warnings[0]  # early stopping may end it sooner
    assert "--preset cpu (" in warnings[0] and "--preset cpu --folds 5" in warnings[0]
    assert not (tmp_path / "run").exists()


def test_the_cpu_preset_does_not_warn(small_data, tmp_path, capsys, fake_timing):
    assert main(["train", str(small_data), "--out", str(tmp_path / "run"), "--preset", "cpu", "--folds", "5", "--dry-run"]) == 0
    captured = capsys.readouterr()
    preset = load_config("cpu").input
    assert "warning" not in captured.err and f"{preset.height}x{preset.width}" in captured.out


def test_the_warning_before_a_real_run_points_to_the_first_epoch_and_dry_run(monkeypatch):
    monkeypatch.setattr(estimate, "uses_cuda", lambda config: False)
    line = cpu_warning(load_config("kaggle"), folds=5)
    assert "ETA follows its first epoch" in line and "--dry-run" in line
    assert cpu_warning(load_config("cpu"), folds=5) is None
    assert cpu_warning(load_config("cpu", overrides=["input.height=448", "input.width=512"]), folds=1) is not None  # > 200k pixels
    assert "trainer.accelerator=cpu" in cpu_warning(load_config("default", overrides=["trainer.accelerator=cpu"]), folds=1)


def test_a_gpu_sized_sweep_without_cuda_warns_before_its_first_trial(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(estimate, "uses_cuda", lambda config: False)
    line = cpu_warning(load_config("default"), folds=5, trials=20)
    assert "GPU-sized sweep (448x608 input, 20 trial(s) x 5 fold(s) x up to 100 epochs)" in line and "first trial" in line
    broken = tmp_path / "broken"  # the warning comes before the data are read: a folder whose frame is unreadable
    (broken / "images").mkdir(parents=True)
    (broken / "masks").mkdir()
    (broken / "images" / "a.png").write_bytes(b"not a png")
    (broken / "masks" / "a.png").write_bytes(b"not a png")
    assert main(["sweep", str(broken), "--out", str(tmp_path / "study"), "--trials", "3", "--folds", "2"]) != 0
    err = capsys.readouterr().err
    assert "warning:" in err and "3 trial(s) x 2 fold(s)" in err and "Traceback" not in err


def test_dry_run_writes_nothing_and_plans_what_the_run_then_trains(process_run, small_data, tmp_path, monkeypatch, capsys):
    run, trained = process_run
    monkeypatch.chdir(tmp_path)
    before, data_before = tree(tmp_path), tree(small_data)
    assert main(["train", str(small_data), "--out", "planned", "--folds", "2", "--dry-run", *TINY]) == 0
    captured = capsys.readouterr()
    assert tree(tmp_path) == before and tree(small_data) == data_before and not (tmp_path / "planned").exists()
    split = splits.load_split(run / runs.SPLIT_FILE)
    for fold in range(2):
        train_ids, val_ids = split.train_val(fold)
        line = f"fold {fold}: {len(train_ids)} training and {len(val_ids)} validation frames"
        assert f"  {line}\n" in captured.out and f"{line} -> " in trained.stderr
    config = load_config("cpu", overrides=[*TINY_OVERRIDES, "trainer.max_epochs=2"])
    assert "folds: 2 of a 2-fold subject-grouped split" in captured.out and "input: 64x96, batch 8: 1 training steps" in captured.out
    assert "epochs: 2 a fold (all of them" in captured.out
    assert f"device: cpu (trainer.accelerator=cpu); precision {devices.precision_reason(config)}; augmentation cpu" in captured.out
    assert re.search(
        r"estimate: [\d.]+ s a training step, [\d.]+ s a validation batch \(timed on 2 step\(s\)\): .+ for 2 fold\(s\) x 2 epochs",
        captured.out,
    )
    assert "timing 2 training step(s) of fold 0" in captured.err and "warning" not in captured.err


def test_dry_run_mistakes_are_one_line(small_data, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    for extra, words in (
        (["--out", str(tmp_path / "taken")], "folder exists"),
        (["--out", str(tmp_path / "new"), "--resume"], "--dry-run"),
    ):
        args = ["train", str(small_data), *extra, "--dry-run"]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith("error:") and words in err, err
    assert not (tmp_path / "new").exists() and (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_the_whole_run_line_counts_folds_and_epochs_in_plain_lines(process_run):
    run, result = process_run
    assert "\r" not in result.stdout and "\r" not in result.stderr  # no bars in output that is not a terminal
    matches = [RUN_LINE.match(line) for line in result.stderr.splitlines() if line.startswith("run: ")]
    assert all(matches), result.stderr
    counted = [tuple(int(group) for group in match.groups()[:5]) for match in matches]
    assert counted == [(0, 2, 0, 1, 2), (1, 2, 0, 2, 2), (1, 2, 1, 1, 2), (2, 2, 1, 2, 2)]
    assert matches[-1].group(7) == "0 s" and all(re.fullmatch(r"\d[\d.]* (s|min|h)", match.group(7)) for match in matches)
    assert UPPER_BOUND not in result.stderr  # the cpu preset trains every epoch: the ETA is no upper bound
    for fold, match in ((0, matches[1]), (1, matches[3])):  # the fold's last line has the score its summary gives
        assert f"  fold {fold}: best validation loss" in result.stdout
        assert f"score {match.group(6)} (2 epochs)" in result.stdout.split(f"  fold {fold}: ")[1].splitlines()[0]
    assert [row["n_folds"] for row in [runs.read_json(run / runs.RUN_FILE)]] == [2]


def test_quiet_training_says_nothing(small_data, tmp_path, capsys):
    args = ["train", str(small_data), "--out", str(tmp_path / "run"), "--fold", "0", "--quiet", "--no-report"]
    assert main(args + set_args(*TINY_OVERRIDES, "trainer.max_epochs=1", "split.n_folds=2") + ["--preset", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "run: " not in err and "fold 0" not in err and "timing" not in err, err


def test_predict_tells_frames_models_passes_and_eta_in_plain_lines(process_run, small_data, tmp_path, capsys):
    run, _ = process_run
    args = ["predict", str(run), str(small_data / "test"), "--allow-degenerate"]
    assert main([*args, "--out", str(tmp_path / "a.csv"), "--batch-size", "2"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    head = re.escape("predicting 5 frames with 2 fold model(s) x 2 TTA pass(es) (hflip), torch on cpu: ETA ")
    first = re.search(rf"^{head}.+ \(the first batch of 2 took .+\)$", err, re.MULTILINE)
    assert first, err
    assert re.findall(r"^predicted (\d+)/5 frames, ETA .+$", err, re.MULTILINE) == ["4"]
    assert main([*args, "--out", str(tmp_path / "b.csv"), "--vflip"]) == 0  # one batch: the line comes before it, without an ETA
    assert "predicting 5 frames with 2 fold model(s) x 3 TTA pass(es) (hvflip), torch on cpu\n" in capsys.readouterr().err


def test_an_epoch_stopped_early_finishes_its_fold_and_the_eta_is_an_upper_bound(monkeypatch):
    lines = []
    tracker = RunProgress(folds=2, max_epochs=5, may_stop_early=True, on_line=lines.append)
    trainer = types.SimpleNamespace(is_global_zero=True, callbacks=[], current_epoch=0, num_training_batches=3)
    clock = iter([0.0, 10.0, 10.0, 30.0])
    monkeypatch.setattr("medseg.learn.run_progress.time.perf_counter", lambda: next(clock))
    tracker.begin_fold(3, position=0)
    tracker.on_train_epoch_start(trainer, None)
    tracker.on_train_epoch_end(trainer, None)
    trainer.current_epoch = 1
    tracker.on_train_epoch_start(trainer, None)  # epoch 1 took 10 s; 4 epochs of this fold and 5 of the next left
    tracker.on_train_epoch_end(trainer, None)
    tracker.on_train_end(trainer, None)  # early stopping ended the fold after epoch 2 (20 s): 5 epochs left
    assert lines == [
        run_line(0, 2, 3, 1, 5, float("nan"), f"1.5 min ({UPPER_BOUND})"),
        run_line(1, 2, 3, 2, 5, float("nan"), f"75 s ({UPPER_BOUND})"),
    ]
    assert lines[0] == f"run: 0/2 folds done; fold 3 epoch 1/5, best score -; ETA 1.5 min ({UPPER_BOUND})"


def test_the_estimate_multiplies_steps_epochs_and_folds():
    config = load_config("default", overrides=["trainer.batch_size=32"])
    plan = TrainingPlan(5, [FoldFrames(0, 100, 25), FoldFrames(1, 96, 29)], config, StepTimes(2.0, 1.0, 2))
    assert plan.batches(plan.folds[0]) == (3, 1) and plan.batches(plan.folds[1]) == (3, 1)
    assert plan.epoch_seconds(plan.folds[0]) == 7.0 and plan.run_seconds == 2 * 7.0 * 100
    assert plan.estimate_line().endswith("23.3 min for 2 fold(s) x 100 epochs (an upper bound: early stopping may end it sooner)")
    patient = load_config("cpu", overrides=["trainer.max_epochs=25", "trainer.early_stopping_patience=25"])
    assert may_stop_early(config.trainer) and not may_stop_early(patient.trainer)
    assert TrainingPlan(5, plan.folds, config).run_seconds is None
    small = load_config("default", overrides=["trainer.batch_size=32", "trainer.limit_train_batches=2", "trainer.limit_val_batches=0.5"])
    assert TrainingPlan(5, [FoldFrames(0, 20, 70)], small).batches(FoldFrames(0, 20, 70)) == (1, 1)


def test_durations_read_as_people_say_them():
    assert [progress.format_duration(s) for s in (0.4, 45, 186, 18 * 3600, 3 * 86400)] == ["0 s", "45 s", "3.1 min", "18.0 h", "3.0 days"]
