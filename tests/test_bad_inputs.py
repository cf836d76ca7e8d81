"""The bad-input matrix: every broken input a user can hand medseg, met through the command line.

Each row breaks a small Kaggle-layout copy of real uns-mini files (or hands a bad path or config) and
checks what the user sees: a non-zero exit code (2 for usage errors, 1 for data problems), one line
that names the file and says how to fix it, no traceback, and nothing written half (a refused
training leaves no config, split or checkpoint; a refused command leaves no output file).
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from conftest import TINY_OVERRIDES, read_rows, set_args, write_rows
from medseg.cli import main
from medseg.data import io

# Frames of six subjects, so that a clean copy could be split and trained: a refusal is the data's fault.
TRAIN_IDS = ("1_1", "1_2", "2_1", "2_2", "3_1", "4_1", "5_1", "6_1")
BROKEN = "1_2"  # the frame every data row breaks


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run ``medseg ARGS`` in-process; return the exit code, stdout and stderr."""
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def train_args(data: Path, run: Path, *extra: str) -> list[str]:
    """A CPU training that would finish within seconds if it ever started (1 tiny epoch)."""
    base = ["train", str(data), "--out", str(run), "--preset", "cpu", "--quiet", "--no-report"]
    return [*base, *set_args(*TINY_OVERRIDES, "trainer.max_epochs=1"), *extra]  # extra last: its --set wins


def assert_one_line_error(err: str, names: str, fix: str) -> str:
    """stderr is exactly one ``error:`` line naming ``names`` and holding the ``fix`` hint."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    line = lines[0]
    assert line.startswith("error: "), line
    assert names in line, f"{names!r} not named in: {line}"
    assert fix in line, f"fix hint {fix!r} missing from: {line}"
    return line


def assert_nothing_written(run: Path) -> None:
    """A refused training leaves no run files: no folder, or an empty one (no config, split or checkpoint)."""
    if run.exists():
        left = sorted(str(path.relative_to(run)) for path in run.rglob("*"))
        assert left == [], f"refused training left files in {run}: {left}"
        assert not list(run.rglob("*.ckpt"))


def frame_of(root: Path, sample_id: str) -> np.ndarray:
    return tifffile.imread(root / "train" / f"{sample_id}.tif")


# ---------------------------------------------------------------------------------------------------
# Data rows: each breaks a fresh copy; ``file`` is the name the problem must carry, ``kind`` the
# inspector's problem name (None when the whole data set is refused with an error line instead),
# ``fix`` the words that tell the user what to do.


def zero_byte_image(root: Path) -> None:
    (root / "train" / f"{BROKEN}.tif").write_bytes(b"")


def truncated_tiff(root: Path) -> None:
    path = root / "train" / f"{BROKEN}.tif"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def jpeg_named_tif(root: Path) -> None:
    frame = frame_of(root, BROKEN)
    jpeg = root / "train" / f"{BROKEN}.jpg"
    Image.fromarray(frame).save(jpeg, format="JPEG", quality=90)
    assert jpeg.read_bytes()[:3] == b"\xff\xd8\xff"
    jpeg.replace(root / "train" / f"{BROKEN}.tif")


def mask_of_another_size(root: Path) -> None:
    mask = tifffile.imread(root / "train" / f"{BROKEN}_mask.tif")
    tifffile.imwrite(root / "train" / f"{BROKEN}_mask.tif", np.ascontiguousarray(mask[:400]), compression="lzw")


def non_binary_mask(root: Path) -> None:
    mask = tifffile.imread(root / "train" / f"{BROKEN}_mask.tif").copy()
    assert set(np.unique(mask)) <= {0, 255}
    mask[:20, :10] = 128  # a corner holds two foreground levels, whatever the mask had: 0/128/255
    mask[:20, 10:20] = 255
    tifffile.imwrite(root / "train" / f"{BROKEN}_mask.tif", mask, compression="lzw")


def csv_without_pixels(root: Path) -> None:
    header, *rows = read_rows(root / "train_masks.csv")
    assert header == ["subject", "img", "pixels"]
    write_rows(root / "train_masks.csv", [["subject", "img", "rle"], *rows])


def duplicate_csv_row(root: Path) -> None:
    header, *rows = read_rows(root / "train_masks.csv")
    row = next(row for row in rows if f"{row[0]}_{row[1]}" == BROKEN)
    write_rows(root / "train_masks.csv", [header, *rows, row])


def rle_past_the_frame(root: Path) -> None:
    header, *rows = read_rows(root / "train_masks.csv")
    pixels = 420 * 580
    rows = [[r[0], r[1], f"{pixels - 10} 50"] if f"{r[0]}_{r[1]}" == BROKEN else r for r in rows]
    write_rows(root / "train_masks.csv", [header, *rows])


def csv_id_without_frame(root: Path) -> None:
    header, *rows = read_rows(root / "train_masks.csv")
    write_rows(root / "train_masks.csv", [header, *rows, ["1", "99", ""]])


def frame_without_mask(root: Path) -> None:
    (root / "train" / f"{BROKEN}_mask.tif").unlink()
    header, *rows = read_rows(root / "train_masks.csv")
    write_rows(root / "train_masks.csv", [header, *(r for r in rows if f"{r[0]}_{r[1]}" != BROKEN)])


def non_utf8_csv(root: Path) -> None:
    text = (root / "train_masks.csv").read_text(encoding="utf-8")
    (root / "train_masks.csv").write_bytes(text.replace("subject", "sujet_\u00e9tudi\u00e9", 1).encode("latin-1"))


@dataclass(frozen=True)
class DataRow:
    name: str
    breaks: Callable[[Path], None]
    file: str
    kind: str | None
    fix: str


DATA_ROWS = [
    DataRow("zero-byte image", zero_byte_image, f"{BROKEN}.tif", "unreadable_image", "replace it or remove it"),
    DataRow("truncated TIFF", truncated_tiff, f"{BROKEN}.tif", "unreadable_image", "replace the file"),
    DataRow("JPEG renamed .tif", jpeg_named_tif, f"{BROKEN}.tif", "unreadable_image", f"rename it to {BROKEN}.jpg"),
    DataRow(
        "mask and frame of different sizes",
        mask_of_another_size,
        f"{BROKEN}_mask.tif",
        "size_mismatch",
        "save the mask at the frame's size",
    ),
    DataRow("mask with values 0/128/255", non_binary_mask, f"{BROKEN}_mask.tif", "non_binary_mask", "--mask-value"),
    DataRow("CSV without the pixels column", csv_without_pixels, "train_masks.csv", None, "the CSV needs subject, img, pixels"),
    DataRow("duplicate id (CSV row twice)", duplicate_csv_row, "train_masks.csv", "duplicate_id", "keep one row per id"),
    DataRow("RLE row that runs past the frame", rle_past_the_frame, "train_masks.csv", "malformed_rle", "fix or regenerate this row"),
    DataRow("CSV id without a frame", csv_id_without_frame, "train_masks.csv", "missing_image", "add it or drop the row"),
    DataRow("frame without a mask", frame_without_mask, f"{BROKEN}.tif", "missing_mask", "add the mask"),
    DataRow("non-UTF-8 CSV", non_utf8_csv, "train_masks.csv", None, "save the CSV as UTF-8"),
]
ROW_IDS = [row.name for row in DATA_ROWS]


@pytest.fixture
def copy(small_kaggle_copy) -> Path:
    return small_kaggle_copy(train_ids=TRAIN_IDS, test_ids=("1", "2"))


def test_the_unbroken_copy_is_clean(capsys, copy):
    """The control: every row below fails because of what it breaks, not because of the copy."""
    code, out, err = run_cli(capsys, "inspect", str(copy))
    assert code == 0, out + err
    assert "No problems found." in out and err == ""


@pytest.mark.parametrize("row", DATA_ROWS, ids=ROW_IDS)
def test_inspect_names_the_broken_file(capsys, copy, row):
    row.breaks(copy)
    code, out, err = run_cli(capsys, "inspect", str(copy))
    assert code == 1, out + err
    assert "Traceback" not in out + err
    if row.kind is None:
        # The table itself cannot be read: the whole data set is refused with one error line.
        assert_one_line_error(err, row.file, row.fix)
        assert out == ""
        return
    assert err == ""
    assert "1 problem(s):" in out, out
    lines = [line.strip() for line in out.splitlines() if line.strip().startswith(f"{row.kind} ")]
    assert len(lines) == 1, out
    line = lines[0]
    assert row.file in line and row.fix in line, line
    # The problem line names the file by its path in the copy (after the kind, before the message).
    path = line[len(row.kind) + 1 :].split(": ", 1)[0]
    assert Path(path).name == row.file and Path(path).is_relative_to(copy), line


@pytest.mark.parametrize("row", DATA_ROWS, ids=ROW_IDS)
def test_train_refuses_before_any_epoch_and_leaves_no_run_files(capsys, copy, tmp_path, row):
    row.breaks(copy)
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, *train_args(copy, run))
    assert code == 1, out + err
    assert "Traceback" not in out + err
    assert_one_line_error(err, row.file, row.fix)
    assert "medseg inspect" in err or row.kind is None  # per-file problems point at the full listing
    assert "run folder:" not in out and "epoch" not in out + err
    assert_nothing_written(run)


def test_a_refused_training_does_not_block_the_next_one(capsys, copy, tmp_path):
    """What a refusal leaves behind must not make the user reach for --force after fixing the data."""
    original = (copy / "train" / f"{BROKEN}.tif").read_bytes()
    zero_byte_image(copy)
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, *train_args(copy, run))
    assert code == 1 and f"{BROKEN}.tif" in err
    (copy / "train" / f"{BROKEN}.tif").write_bytes(original)
    # Same --out, no --force: refused only for the (now absent) data problem, not for the folder.
    code, _, err = run_cli(capsys, *train_args(copy, run, "--fold", "7"))
    assert code == 2 and "--fold 7" in err and "--force" not in err, err


def test_rgb_and_16_bit_frames_are_read_as_gray(capsys, copy):
    """Not an error: a frame saved as RGB is converted to 8-bit gray, one saved as 16-bit keeps its precision
    (float32 in [0, 1] through the window), and inspect is clean."""
    rgb_id, deep_id = "2_1", "3_1"
    rgb_gray, deep_gray = frame_of(copy, rgb_id), frame_of(copy, deep_id)
    tifffile.imwrite(copy / "train" / f"{rgb_id}.tif", np.stack([rgb_gray] * 3, axis=-1), photometric="rgb", compression="lzw")
    tifffile.imwrite(copy / "train" / f"{deep_id}.tif", deep_gray.astype(np.uint16) * 257, compression="lzw")
    assert tifffile.imread(copy / "train" / f"{rgb_id}.tif").shape == (420, 580, 3)
    assert tifffile.imread(copy / "train" / f"{deep_id}.tif").dtype == np.uint16
    code, out, err = run_cli(capsys, "inspect", str(copy))
    assert code == 0, out + err
    assert "No problems found." in out and err == ""
    assert f"580x420: {len(TRAIN_IDS)}" in out
    image = io.read_image(copy / "train" / f"{rgb_id}.tif")
    assert image.dtype == np.uint8 and image.shape == (420, 580)
    np.testing.assert_array_equal(image, rgb_gray)
    deep = io.read_image(copy / "train" / f"{deep_id}.tif", window="none")
    assert deep.dtype == np.float32 and deep.shape == (420, 580)
    np.testing.assert_allclose(deep, deep_gray / 255.0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# Usage rows: paths and configuration. Exit 2; a refused training creates nothing.


def test_empty_data_folder(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, err = run_cli(capsys, "inspect", str(empty))
    assert code == 2 and out == "" and "Traceback" not in err
    assert_one_line_error(err, str(empty), "put the images")
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, *train_args(empty, run))
    assert code == 2 and "Traceback" not in out + err
    assert_one_line_error(err, str(empty), "put the images")
    assert_nothing_written(run)


def test_path_that_does_not_exist(capsys, tmp_path):
    missing = tmp_path / "no" / "such" / "data"
    code, out, err = run_cli(capsys, "inspect", str(missing))
    assert code == 2 and out == "" and "Traceback" not in err
    assert_one_line_error(err, str(missing), "check the path")
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, *train_args(missing, run))
    assert code == 2 and "Traceback" not in out + err
    assert_one_line_error(err, str(missing), "check the path")
    assert_nothing_written(run)
    assert not missing.exists()


@pytest.mark.parametrize("mistake", ["missing data folder", "broken frame", "unknown encoder", "missing weights file"])
def test_force_keeps_the_earlier_run_when_the_new_one_is_refused(capsys, copy, tmp_path, mistake):
    """--force replaces a run only once the new one's data has loaded and its model is known: a typo must
    not cost the earlier run."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "run.json").write_text('{"data": "/earlier/data", "n_folds": 5, "folds": [0], "several": false}\n')  # --force needs a real one
    (run / "checkpoints" / "best.ckpt").write_bytes(b"the earlier run's weights")
    before = sorted(str(path.relative_to(run)) for path in run.rglob("*"))
    data, extra = copy, []
    if mistake == "missing data folder":
        data = tmp_path / "typo"
    elif mistake == "broken frame":
        zero_byte_image(copy)
    elif mistake == "unknown encoder":
        extra = set_args("model.encoder=resnet19")
    else:
        extra = set_args(f"model.encoder_weights={tmp_path / 'missing.pth'}")
    code, out, err = run_cli(capsys, *train_args(data, run, "--force", *extra))
    assert code == (1 if mistake == "broken frame" else 2) and "Traceback" not in out + err, err
    assert len(err.strip().splitlines()) == 1 and "run folder:" not in out
    assert sorted(str(path.relative_to(run)) for path in run.rglob("*")) == before
    assert (run / "checkpoints" / "best.ckpt").read_bytes() == b"the earlier run's weights"


def test_missing_config_file(capsys, copy, tmp_path):
    config = tmp_path / "nope.yaml"
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, *train_args(copy, run, "--config", str(config)))
    assert code == 2 and "Traceback" not in out + err
    assert_one_line_error(err, str(config), "not found")
    assert not run.exists()


CONFIG_ROWS = [
    pytest.param("trainer:\n  max_epoch: 2\n", "trainer.max_epoch", "valid keys here: trainer.max_epochs", id="unknown key"),
    pytest.param("optim:\n  lr: fast\n", "optim.lr", "valid number", id="wrong type"),
    pytest.param("model: resnet34\n", "model", "set one of its keys", id="section given a value"),
]


@pytest.mark.parametrize(("text", "key", "fix"), CONFIG_ROWS)
def test_config_file_mistakes_name_the_file_and_key(capsys, copy, tmp_path, text, key, fix):
    config = tmp_path / "my-config.yaml"
    config.write_text(text)
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, *train_args(copy, run, "--config", str(config)))
    assert code == 2 and "Traceback" not in out + err
    line = assert_one_line_error(err, f"'{key}'", fix)
    # The user may combine --config with --set: the line has to say which file holds the mistake.
    assert config.name in line, f"the config file is not named: {line}"
    assert not run.exists()


SET_ROWS = [
    pytest.param("trainer.max_epoch=2", "trainer.max_epoch", "valid keys here: trainer.max_epochs", id="unknown key"),
    pytest.param("trainer.max_epochs=two", "trainer.max_epochs", "valid integer", id="wrong type"),
    pytest.param("input.height=100", "input.height", "divisible by 32", id="invalid value"),
    pytest.param("trainer.max_epochs", "trainer.max_epochs", "write key=value", id="no equals sign"),
]


@pytest.mark.parametrize(("override", "key", "fix"), SET_ROWS)
def test_set_mistakes_name_the_key(capsys, copy, tmp_path, override, key, fix):
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, *train_args(copy, run, "--set", override))
    assert code == 2 and "Traceback" not in out + err
    assert_one_line_error(err, key, fix)
    assert not run.exists()


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param(["model.encoder={}", "model.encoder=resnet18"], id="mistake then fix of one key"),
        pytest.param(["model.encoder=" + "[" * 2000 + "]" * 2000], id="deeply nested value"),
    ],
)
def test_odd_set_values_are_one_line_not_a_crash(capsys, tmp_path, overrides):
    """Whatever --set holds, the user sees one line and exit 2 (here: for the DATA path that does not exist)."""
    missing = tmp_path / "no-data"
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, *train_args(missing, run, *set_args(*overrides)))
    assert code == 2 and "Traceback" not in out + err
    line = assert_one_line_error(err, "", "")
    assert str(missing) in line or "model.encoder" in line, line
    assert_nothing_written(run)


def test_bad_option_value_is_a_usage_error(capsys, copy, tmp_path):
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, *train_args(copy, run, "--preset", "gpu-huge"))
    assert code == 2 and "Traceback" not in out + err
    assert_one_line_error(err, "gpu-huge", "use one of default, cpu")
    assert not run.exists()


# ---------------------------------------------------------------------------------------------------
# A CSV whose data rows carry one field more than its header (a trailing comma on every row, as some
# spreadsheet exports write). It must be refused, not read with every column shifted by one.


def test_submission_with_a_trailing_comma_on_every_row_is_not_silently_shifted(capsys, tmp_path):
    submission = tmp_path / "submission.csv"
    submission.write_text("img,pixels\n1,100 20,\n2,300 40 500 10,\n")
    code, out, err = run_cli(capsys, "check-submission", str(submission))
    assert "Traceback" not in out + err
    # Read as written, the file lists ids '100 20' and '300 40 500 10' with empty masks: accepting it
    # as "valid, 2 empty masks" throws the predicted masks away without a word.
    assert code == 1, f"accepted a shifted submission (exit {code}): {out.strip()}"
    assert_one_line_error(err, str(submission), "fix")


# ---------------------------------------------------------------------------------------------------
# The same through a real process: no traceback reaches a terminal, and the exit code is the process's.


def test_in_a_subprocess_inspect_and_train_print_one_line_not_a_traceback(copy, tmp_path):
    truncated_tiff(copy)
    command = [sys.executable, "-m", "medseg.cli"]
    result = subprocess.run([*command, "inspect", str(copy)], capture_output=True, text=True, check=False, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    assert re.search(rf"unreadable_image \S*{re.escape(BROKEN)}\.tif: .*replace the file", result.stdout), result.stdout

    config = tmp_path / "bad.yaml"
    config.write_text("optim:\n  lr: [1, 2]\n")
    run = tmp_path / "run"
    arguments = [*command, *train_args(copy, run, "--config", str(config))]
    result = subprocess.run(arguments, capture_output=True, text=True, check=False, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stdout + result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "optim.lr" in result.stderr, result.stderr
    assert not run.exists()
