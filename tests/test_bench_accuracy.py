"""``bench/accuracy.py`` runs end to end on a tiny budget and reports both arms out of fold."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import TINY_OVERRIDES
from medseg.data.datasets import sample_data_path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "accuracy.py"


def test_accuracy_bench_scores_both_arms_on_every_frame_out_of_fold(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "uns-mini").symlink_to(sample_data_path(), target_is_directory=True)
    budget = [item for override in (*TINY_OVERRIDES, "trainer.max_epochs=1", "model.encoder=resnet18") for item in ("--set", override)]
    command = [
        sys.executable,
        str(BENCH),
        "--out",
        str(tmp_path / "out"),
        "--data-root",
        str(root),
        "--datasets",
        "uns-mini",
        "--folds",
        "2",
        *budget,
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "medseg, cross-fitted" in done.stdout and "recipe" in done.stdout
    rows = {row["arm"]: row for row in json.loads((tmp_path / "out" / "accuracy.json").read_text())["rows"]}
    assert set(rows) == {"recipe", "medseg, tuned on all", "medseg, cross-fitted"}
    assert all(row["frames"] == 38 and 0.0 <= row["score"] <= 1.0 for row in rows.values())
    assert rows["medseg, cross-fitted"]["score"] <= rows["medseg, tuned on all"]["score"] + 1e-9
    assert (tmp_path / "out" / "uns-mini" / "medseg" / "fold_1" / "checkpoints" / "best.ckpt").is_file()
    assert (tmp_path / "out" / "uns-mini" / "recipe" / "fold_1" / "checkpoints" / "best.ckpt").is_file()


def test_accuracy_bench_names_a_missing_data_set_folder_in_one_line(tmp_path):
    command = [sys.executable, str(BENCH), "--out", str(tmp_path / "out"), "--data-root", str(tmp_path), "--datasets", "uns-mini"]
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 1
    assert (
        done.stderr.strip()
        == f"error: {tmp_path / 'uns-mini'}: no such data set folder; point --data-root at the folder that holds uns-mini/"
    )


def test_the_real_kaggle_frames_run_on_a_subset_of_their_subjects(tmp_path, shared_data):
    """``--subjects N`` sizes a run on kaggle-uns-nerve256: only the first N subjects' frames, subject-grouped folds."""
    budget = [item for override in (*TINY_OVERRIDES, "trainer.max_epochs=1", "model.encoder=resnet18") for item in ("--set", override)]
    out = tmp_path / "out"
    command = [sys.executable, str(BENCH), "--out", str(out), "--datasets", "kaggle-uns-nerve256", "--arms", "medseg"]
    done = subprocess.run([*command, "--subjects", "3", "--folds", "3", *budget], capture_output=True, text=True, check=False, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    subset = sorted(path.name.split("_")[0] for path in (out / "subsets" / "kaggle-uns-nerve256" / "images").iterdir())
    assert set(subset) == {"1", "2", "3"}  # the first three subjects, in natural order
    rows = {row["arm"]: row for row in json.loads((out / "accuracy.json").read_text())["rows"]}
    assert rows["medseg, cross-fitted"]["frames"] == len(subset)
    assert rows["medseg, cross-fitted"]["all_empty_score"] == 0.0  # every frame has a nerve
