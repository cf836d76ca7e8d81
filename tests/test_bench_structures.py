"""``bench/structures.py`` (through ``bench/accuracy.py``) runs end to end on a tiny budget: a two-structure model
against two one-structure models."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import TINY_OVERRIDES

BENCH = Path(__file__).resolve().parents[1] / "bench" / "structures.py"
ACCURACY = BENCH.with_name("accuracy.py")
STRUCTURES = (("joint", "nerve"), ("joint", "vessel"), ("nerve", "nerve"), ("vessel", "vessel"))
FRAMES = ("0000", "0001", "0002", "0003", "0012", "0025")


def test_the_accuracy_bench_compares_the_joint_model_with_one_model_per_structure(tmp_path, shared_data):
    """``bench/accuracy.py --datasets usgra-seg-both`` runs ``bench/structures.py``'s three arms on the same folds."""
    data = tmp_path / "root" / "usgra-seg"
    for folder in ("images", "masks"):
        (data / folder).mkdir(parents=True)
        for name in FRAMES:
            shutil.copyfile(shared_data / "usgra-seg" / folder / f"{name}.png", data / folder / f"{name}.png")
    budget = [item for override in (*TINY_OVERRIDES, "trainer.max_epochs=1") for item in ("--set", override)]
    out = tmp_path / "out"
    command = [sys.executable, str(ACCURACY), "--out", str(out), "--data-root", str(data.parent), "--datasets", "usgra-seg-both"]
    done = subprocess.run([*command, "--folds", "2", *budget], capture_output=True, text=True, check=False, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "joint - separate, cross-fitted" in done.stdout and "ratio" in done.stdout
    rows = {row["arm"]: row for row in json.loads((out / "accuracy.json").read_text())["rows"]}
    expected = {f"{arm} {structure}, {kind}" for arm, structure in STRUCTURES for kind in ("cross-fitted", "tuned on all")}
    assert set(rows) == expected
    assert all(0.0 <= row["score"] <= 1.0 and row["minutes"] > 0 for row in rows.values())
    for arm in ("joint", "nerve", "vessel"):
        assert (out / "usgra-seg-both" / arm / "fold_1" / "checkpoints" / "best.ckpt").is_file()


def test_structures_bench_names_a_missing_data_folder_in_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, str(BENCH), "--out", str(tmp_path / "out"), "--data", str(tmp_path / "nowhere")],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 1 and done.stderr.strip() == f"error: {tmp_path / 'nowhere'}: folder does not exist; check the path"
