"""The siim RLE dialect end to end: a SIIM-style folder read, inspected, trained on, predicted and checked.

The frames are small generated PNGs laid out as ``../shared/data/siim-sample`` is (``images/`` and
``train-rle.csv`` under ``ImageId, EncodedPixels``, relative offsets, ``-1`` for an empty mask, one frame
with two rows), so that these tests need no DICOM reader.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from conftest import TINY_OVERRIDES, read_rows, set_args
from medseg.cli import main
from medseg.config import DataOptions
from medseg.data import rle
from medseg.data.datasets import load_dataset, mask_of

SHAPE = (96, 128)
IDS = [f"1.2.276.0.7230010.3.1.4.8323329.{n}.1517875165.{878027 + n}" for n in range(10)]
EMPTY = {IDS[i] for i in (1, 4, 6, 8)}


def blob(index: int, shift: int = 0) -> np.ndarray:
    """A filled ellipse, somewhere else in every frame."""
    mask = np.zeros(SHAPE, dtype=np.uint8)
    centre = (20 + (index * 9 + shift) % 80, 20 + (index * 7 + shift) % 50)
    cv2.ellipse(mask, centre, (12, 7), index * 17, 0, 360, 1, -1)
    return mask.astype(bool)


def truth(sample_id: str) -> np.ndarray:
    index = IDS.index(sample_id)
    if sample_id in EMPTY:
        return np.zeros(SHAPE, dtype=bool)
    return blob(index) | blob(index, shift=40) if index == 0 else blob(index)


def siim_rows() -> list[tuple[str, str]]:
    """Rows of a siim ``train-rle.csv``: frame 0's two regions on two rows, ``-1`` for the empty frames."""
    rows = []
    for sample_id in IDS:
        if sample_id in EMPTY:
            rows.append((sample_id, "-1"))
        elif sample_id == IDS[0]:
            rows += [(sample_id, rle.encode(blob(0), dialect="siim")), (sample_id, rle.encode(blob(0, shift=40), dialect="siim"))]
        else:
            rows.append((sample_id, rle.encode(truth(sample_id), dialect="siim")))
    return rows


def write_siim_csv(path: Path, rows: list[tuple[str, str]], header: str = "ImageId, EncodedPixels") -> None:
    """Write the table as SIIM wrote it: the header's stray space, a space before every non-empty RLE cell."""
    lines = [header] + [f"{sample_id},{text}" if text == "-1" else f"{sample_id}, {text}" for sample_id, text in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def make_siim_folder(root: Path, rows: list[tuple[str, str]] | None = None, header: str = "ImageId, EncodedPixels") -> Path:
    """``images/<ImageId>.png`` (noise, brighter where the mask is) and ``train-rle.csv``."""
    (root / "images").mkdir(parents=True)
    for index, sample_id in enumerate(IDS):
        noise = np.random.default_rng(index).integers(0, 120, SHAPE, dtype=np.uint8)
        cv2.imwrite(str(root / "images" / f"{sample_id}.png"), np.where(truth(sample_id), noise + 120, noise).astype(np.uint8))
    write_siim_csv(root / "train-rle.csv", siim_rows() if rows is None else rows, header)
    return root


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# --------------------------------------------------------------------------- reading


def test_the_rle_csv_layout_reads_a_siim_folder_its_rows_ored(tmp_path):
    root = make_siim_folder(tmp_path / "siim")
    dataset = load_dataset(root)
    assert dataset.layout == "rle-csv" and dataset.options.rle_format == "siim" and dataset.problems == []
    assert [record.id for record in dataset.train] == IDS
    two_rows = dataset.train[0]
    assert two_rows.rle.startswith(" ") and len(two_rows.extra_rles) == 1  # cells as written; decoding ignores the space
    for record in dataset.train:
        np.testing.assert_array_equal(mask_of(record, dataset.options), truth(record.id))
    assert mask_of(two_rows, dataset.options).sum() > blob(0).sum()  # the union of both rows, not the first


def test_a_siim_folder_read_as_kaggle_reports_the_repeated_row_and_the_minus_ones(tmp_path, capsys):
    root = make_siim_folder(tmp_path / "siim")
    dataset = load_dataset(root, DataOptions(rle_format="kaggle"))
    assert [(problem.kind, problem.message.split(":")[0]) for problem in dataset.problems] == [("duplicate_id", "row 3")]
    code, out, _ = run_cli(capsys, "inspect", root, "--rle-format", "kaggle")
    assert code == 1 and "duplicate_id" in out and "siim dialect's empty mask" in out


def test_an_ambiguous_table_is_one_error_line_naming_the_file_and_the_flag(tmp_path, capsys):
    column = np.zeros(SHAPE, dtype=bool)
    column[10:30, 5] = True  # one run: "start length" reads both as absolute starts and as relative offsets
    root = make_siim_folder(tmp_path / "siim", [(sample_id, rle.encode(column)) for sample_id in IDS], header="ImageId,EncodedPixels")
    code, _, err = run_cli(capsys, "inspect", root)
    line = one_error_line(err)
    assert code == 2 and str(root / "train-rle.csv") in line and "cannot tell the RLE dialect" in line, line
    assert "--rle-format kaggle, row-major or siim" in line
    for dialect, first in (("kaggle", 5 * 96 + 10), ("siim", 5 * 96 + 11)):  # named, it is read so: siim's offsets are 0-based
        dataset = load_dataset(root, DataOptions(rle_format=dialect))
        assert dataset.options.rle_format == dialect
        assert int(np.flatnonzero(mask_of(dataset.train[0], dataset.options).T.reshape(-1))[0]) == first


def test_a_table_whose_rows_contradict_each_other_names_both_rows(tmp_path, capsys):
    rows = [(sample_id, "-1") for sample_id in IDS]
    rows[3] = (IDS[3], rle.encode(truth(IDS[3])))  # kaggle's absolute starts among siim's -1
    root = make_siim_folder(tmp_path / "siim", rows)
    code, _, err = run_cli(capsys, "inspect", root)
    line = one_error_line(err)
    assert code == 2 and "row 2 is '-1'" in line and "row 5 reads as absolute starts" in line, line


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--rle-format", "kaggle", "--rle-order", "C"), "rle_format=kaggle numbers pixels column-major but rle_order=C"),
        (("--rle-format", "siim", "--rle-order", "C"), "rle_format=siim numbers pixels column-major"),
        (("--rle-format", "row-major", "--rle-order", "F"), "--rle-format row-major numbers pixels row-major but --rle-order F"),
        (("--rle-format", "uw"), "--rle-format: Input should be 'kaggle', 'row-major' or 'siim'"),
    ],
)
def test_contradicting_or_unknown_rle_flags_are_one_line(tmp_path, capsys, flags, message):
    root = make_siim_folder(tmp_path / "siim")
    code, _, err = run_cli(capsys, "inspect", root, *flags)
    assert code == 2 and message in one_error_line(err)


def test_row_major_is_rle_order_c():
    assert DataOptions(rle_format="row-major") == DataOptions(rle_format="row-major", rle_order="C")
    assert DataOptions(rle_order="C").named_dialect == "row-major" and DataOptions().named_dialect is None


# --------------------------------------------------------------------------- inspect, train, predict, check-submission


@pytest.fixture(scope="module")
def siim_run(tmp_path_factory) -> tuple[Path, Path]:
    """A SIIM-style folder and a run trained on it for one tiny epoch through the command line."""
    base = tmp_path_factory.mktemp("siim")
    root = make_siim_folder(base / "data")
    run = base / "run"
    args = ["train", str(root), "--out", str(run), "--preset", "cpu", "--quiet", "--no-report"]
    assert main(args + set_args(*TINY_OVERRIDES, "trainer.max_epochs=1")) == 0
    return root, run


def test_inspect_reads_the_siim_folder_without_problems(siim_run, capsys):
    root, _ = siim_run
    code, out, _ = run_cli(capsys, "inspect", root, "--json")
    summary = json.loads(out)["summary"]
    assert code == 0 and summary["train_images"] == 10 and summary["non_empty"] == 6 and summary["empty"] == 4


def test_train_saves_the_told_dialect_with_the_run(siim_run):
    _, run = siim_run
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["rle_format"] == "siim"


def test_predict_writes_a_siim_submission_that_check_submission_accepts(siim_run, tmp_path, capsys):
    root, run_source = siim_run
    run = tmp_path / "run"
    shutil.copytree(run_source, run)
    out, masks = tmp_path / "submission.csv", tmp_path / "masks"
    assert main(["predict", str(run), str(root / "images"), "--out", str(out), "--save-probs", "--quiet", "--allow-degenerate"]) == 0
    with np.load(f"{out}.probs.npz") as saved:  # a threshold that leaves masks of many runs, whatever the tiny model learnt
        median = float(np.median(np.concatenate([saved[f"p{i}"].ravel() for i in range(len(IDS))])))
    (run / "postprocess.json").write_text(json.dumps({"threshold": median, "min_area": 0}))
    args = ["predict", str(run), str(root / "images"), "--out", str(out), "--masks-dir", str(masks), "--force", "--quiet"]
    assert main([*args, "--allow-degenerate"]) == 0
    header, *rows = read_rows(out)
    assert header == ["ImageId", "EncodedPixels"] and [row[0] for row in rows] == IDS  # one row per image
    for sample_id, text in rows:
        written = cv2.imread(str(masks / f"{sample_id}.png"), cv2.IMREAD_GRAYSCALE) > 0
        assert text == rle.encode(written, dialect="siim") and (text == "-1") == (not written.any())
        np.testing.assert_array_equal(rle.decode(text, SHAPE, dialect="siim"), written)
    assert any(len(text.split()) > 2 for _, text in rows)
    capsys.readouterr()
    code, out_text, _ = run_cli(capsys, "check-submission", out, "--shape", *map(str, SHAPE), "--allow-degenerate")
    assert code == 0 and "valid" in out_text and "10 rows" in out_text
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("rle_format: siim", "rle_format: kaggle"))
    kaggle = tmp_path / "kaggle.csv"
    assert main([*args[:4], str(kaggle), "--quiet", "--allow-degenerate"]) == 0
    header, *again = read_rows(kaggle)
    assert header == ["img", "pixels"]
    for (_, siim_text), (_, kaggle_text) in zip(rows, again, strict=True):  # the same masks, in the run's dialect
        np.testing.assert_array_equal(rle.decode(kaggle_text, SHAPE), rle.decode(siim_text, SHAPE, dialect="siim"))


def test_check_submission_tells_a_siim_file_and_checks_its_dialect(tmp_path, capsys):
    path = tmp_path / "siim.csv"
    rows = [(sample_id, rle.encode(truth(sample_id), dialect="siim")) for sample_id in IDS]
    path.write_text("ImageId,EncodedPixels\n" + "".join(f"{i},{text}\n" for i, text in rows), encoding="utf-8")
    code, out, err = run_cli(capsys, "check-submission", path, "--shape", *map(str, SHAPE))
    assert code == 0 and "valid" in out and "4 empty masks" in out and "note" not in err, err
    code, _, err = run_cli(capsys, "check-submission", path, "--rle-format", "kaggle")
    line = one_error_line(err)
    assert code == 1 and str(path) in line and "siim dialect's empty mask" in line, line
    mixed = tmp_path / "mixed.csv"
    mixed.write_text(f"ImageId,EncodedPixels\n{IDS[0]},-1\n{IDS[2]},{rle.encode(truth(IDS[2]))}\n", encoding="utf-8")
    code, _, err = run_cli(capsys, "check-submission", mixed, "--shape", *map(str, SHAPE))
    assert code == 1 and "cannot tell the RLE dialect" in one_error_line(err) and str(mixed) in err


SIIM_SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "siim-sample"


def test_the_real_siim_sample_goes_through_inspect_train_predict_and_check_submission(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "inspect", SIIM_SAMPLE, "--json")
    summary = json.loads(out)["summary"]
    assert code == 0 and (summary["non_empty"], summary["empty"]) == (5, 5)
    run, submission = tmp_path / "run", tmp_path / "submission.csv"
    args = ["train", SIIM_SAMPLE, "--out", run, "--preset", "cpu", "--quiet", "--no-report"]
    assert run_cli(capsys, *args, *set_args(*TINY_OVERRIDES, "trainer.max_epochs=1"))[0] == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["rle_format"] == "siim"
    code, _, err = run_cli(capsys, "predict", run, SIIM_SAMPLE / "images", "--out", submission, "--quiet", "--allow-degenerate")
    assert code == 0, err
    header, *rows = read_rows(submission)
    assert header == ["ImageId", "EncodedPixels"] and len(rows) == 10
    for _, text in rows:
        rle.check(text, (1024, 1024), dialect="siim")
    code, out, err = run_cli(capsys, "check-submission", submission, "--shape", "1024", "1024", "--allow-degenerate")
    assert code == 0 and "valid" in out, err
