"""``bench/structures.py`` runs end to end on a tiny budget: a two-structure model against two one-structure models."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import TINY_OVERRIDES

BENCH = Path(__file__).resolve().parents[1] / "bench" / "structures.py"
FRAMES = ("0000", "0001", "0002", "0003", "0012", "0025")


def test_structures_bench_compares_the_joint_model_with_one_model_per_structure(tmp_path, shared_data):
    data = tmp_path / "usgra"
    for folder in ("images", "masks"):
        (data / folder).mkdir(parents=True)
        for name in FRAMES:
            shutil.copyfile(shared_data / "usgra-seg" / folder / f"{name}.png", data / folder / f"{name}.png")
    budget = [item for override in (*TINY_OVERRIDES, "trainer.max_epochs=1") for item in ("--set", override)]
    command = [sys.executable, str(BENCH), "--out", str(tmp_path / "out"), "--data", str(data), "--folds", "2", *budget]
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "joint - separate, cross-fitted" in done.stdout and "ratio" in done.stdout
    arms = json.loads((tmp_path / "out" / "structures.json").read_text())["arms"]
    assert set(arms) == {"joint", "nerve", "vessel"} and set(arms["joint"]["structures"]) == {"nerve", "vessel"}
    for arm in arms.values():
        for scores in arm["structures"].values():
            assert 0.0 <= scores["cross_fitted"] <= 1.0 and 0.0 <= scores["tuned_on_all"] <= 1.0


def test_structures_bench_names_a_missing_data_folder_in_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, str(BENCH), "--out", str(tmp_path / "out"), "--data", str(tmp_path / "nowhere")],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 1 and done.stderr.strip() == f"error: {tmp_path / 'nowhere'}: folder does not exist; check the path"
