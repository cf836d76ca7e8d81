"""``bench/sweep_cpu.py``: the sweep that re-chooses the cpu preset, on real Kaggle frames and uns-mini together."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest

from conftest import TINY_OVERRIDES, set_args
from medseg.config import load_config
from medseg.data.datasets import load_dataset, mask_of

BENCH = Path(__file__).resolve().parents[1] / "bench" / "sweep_cpu.py"
sys.path.insert(0, str(BENCH.parent))
import sweep_cpu  # noqa: E402

NERVE_FRAMES = ("1_1", "1_2", "2_8", "2_12")


@pytest.fixture
def data_root(tmp_path, shared_data, small_kaggle_copy) -> Path:
    """uns-mini's first three frames (subject 1) and four real kaggle-uns-nerve256 frames of subjects 1 and 2."""
    root = tmp_path / "root"
    root.mkdir()
    small_kaggle_copy(train_ids=("1_1", "1_2", "1_3"), name="kaggle").rename(root / "uns-mini")
    nerve = root / "kaggle-uns-nerve256"
    for folder, suffix in (("images", ".jpg"), ("masks", "_mask.jpg")):
        (nerve / folder).mkdir(parents=True)
        for name in NERVE_FRAMES:
            source = shared_data / "kaggle-uns-nerve256" / folder / f"{name}{suffix}"
            (nerve / folder / source.name).symlink_to(source)
    return root


def test_the_combined_data_keeps_both_sets_ids_subjects_and_masks_apart(data_root, tmp_path):
    data = sweep_cpu.combined_data(data_root, 1, tmp_path / "data")
    options = load_config(values={"data.mask_threshold": 127, "data.subject_pattern": sweep_cpu.SUBJECT_PATTERN}).data
    combined = load_dataset(data, options)
    assert sorted(record.id for record in combined.train) == ["mini-1_1", "mini-1_2", "mini-1_3", "n256-1_1", "n256-1_2"]
    assert {record.subject for record in combined.train} == {"mini-1", "n256-1"}, "subject 1 of each set is a different person"
    nerve = load_dataset(data_root / "kaggle-uns-nerve256", load_config(values=sweep_cpu.NERVE256_VALUES).data)
    original = next(record for record in nerve.train if record.id == "1_2")
    linked = next(record for record in combined.train if record.id == "n256-1_2")
    assert np.array_equal(mask_of(linked, options), mask_of(original, nerve.options))
    with pytest.raises(Exception, match="fewer than 3"):
        sweep_cpu.combined_data(data_root, 3, tmp_path / "other")


def test_the_preset_is_enqueued_once_as_the_studys_first_trial(tmp_path):
    space = tmp_path / "space.yaml"
    preset = load_config("cpu")
    epochs = preset.trainer.max_epochs
    lr_range = "optim.lr: {low: 1.0e-4, high: 1.0e-2, log: true}"
    space.write_text(f"{lr_range}\ntrainer.max_epochs: {{low: {epochs + 5}, high: {epochs + 15}}}\n")
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    for _ in range(2):  # running the bench again must not queue a second baseline
        sweep_cpu.enqueue_preset(storage, space)
    (waiting,) = optuna.load_study(storage=storage, study_name=sweep_cpu.STUDY_NAME).trials
    assert waiting.state == optuna.trial.TrialState.WAITING and "medseg_note" in waiting.user_attrs
    fixed = waiting.system_attrs["fixed_params"]
    assert fixed == {"optim.lr": preset.optim.lr}, "the preset's epochs are outside the space: the trial draws them"


def test_the_bench_runs_the_preset_first_and_prints_it_beside_the_best(data_root, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: {low: 1.0e-4, high: 1.0e-2, log: true}\nmodel.encoder: {choices: [resnet18, resnet34]}\n")
    out = tmp_path / "sweep"
    budget = set_args(*TINY_OVERRIDES, "trainer.max_epochs=1", "trainer.limit_train_batches=1")
    command = [sys.executable, str(BENCH), "--out", str(out), "--data-root", str(data_root), "--subjects", "2", "--folds", "2"]
    done = subprocess.run(
        [*command, "--space", str(space), "--trials", "1", *budget], capture_output=True, text=True, check=False, timeout=600
    )
    assert done.returncode == 0, done.stdout[-1500:] + done.stderr[-1500:]
    assert "1 trials, 1 completed" in done.stdout and "cpu preset (trial 0):" in done.stdout and "best (trial 0):" in done.stdout
    (first,) = optuna.load_study(storage=f"sqlite:///{out / 'study.db'}", study_name=sweep_cpu.STUDY_NAME).trials
    assert first.params == {"optim.lr": load_config("cpu").optim.lr, "model.encoder": "resnet18"}
    assert (out / "study" / "best.yaml").is_file()
