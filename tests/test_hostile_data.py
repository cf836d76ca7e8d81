"""Hostile and careless data (issue 31): every input a data folder can hand medseg to escape a folder, fill
memory or train on nothing, met where the user meets it.

Each class of problem is crafted small and checked through ``medseg inspect`` (and ``train`` where it
refuses): exit code, one line that names the file and the fix, no traceback. The classes:

- names that become paths: class labels (a long table's class column, ``masks/<class>/`` folders) and
  frame ids (CSV rows, file names, exclusions); a property test throws generated names at each entry;
- frames whose header declares more pixels than ``data.max_pixels`` (decompression bombs), in every format;
- NaN and infinite pixels;
- CSV tables with a column named twice, too large a file, a huge field;
- ``--mask-value``, class-index ``--classes`` labels and ``--mask-threshold`` that no mask holds;
- DICOM files with a malformed window or header;
- range checks of numbers read from data (window, frame size).
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
import tifffile
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from conftest import TINY_OVERRIDES, read_rows, set_args, write_rows
from medseg.cli import main
from medseg.config import DataOptions
from medseg.data import exclusions, intensity, io, long_rle
from medseg.data.datasets import image_records, load_dataset
from medseg.errors import DataError, ImageReadError, MedsegError, UsageError
from medseg.files import inside

TRAIN_IDS = ("1_1", "1_2", "2_1", "2_2", "3_1", "4_1")
BROKEN = "1_2"
HUGE = 60_000  # a side that declares 3.6 billion pixels
TRACEBACK = "Traceback"


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run ``medseg ARGS`` in-process; return the exit code, stdout and stderr."""
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str, *words: str) -> str:
    """stderr is one ``error:`` line holding every word (the file, the fix)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0], f"{word!r} missing from: {lines[0]}"
    return lines[0]


def problem_line(out: str, kind: str, *words: str) -> str:
    """The one problem line of ``kind`` that inspect printed, holding every word."""
    lines = [line.strip() for line in out.splitlines() if line.strip().startswith(f"{kind} ")]
    assert len(lines) == 1, out
    for word in words:
        assert word in lines[0], f"{word!r} missing from: {lines[0]}"
    return lines[0]


def inspect_lists(capsys, data: Path, kind: str, *words: str, flags: tuple[str, ...] = ()) -> str:
    """``medseg inspect DATA`` exits 1 and lists one problem of ``kind`` with ``words``, no traceback."""
    code, out, err = run_cli(capsys, "inspect", str(data), *flags)
    assert code == 1 and TRACEBACK not in out + err and err == "", out + err
    return problem_line(out, kind, *words)


def train_refuses(capsys, data: Path, run: Path, *words: str, flags: tuple[str, ...] = (), code: int = 1) -> str:
    """``medseg train`` refuses the data before any epoch with one line, and writes no run."""
    base = ["train", str(data), "--out", str(run), "--preset", "cpu", "--quiet", "--no-report", *flags]
    got, out, err = run_cli(capsys, *base, *set_args(*TINY_OVERRIDES, "trainer.max_epochs=1"))
    assert got == code and TRACEBACK not in out + err and "epoch" not in out, out + err
    assert not run.exists() or not any(run.iterdir())
    return one_error_line(err, *words)


@pytest.fixture
def kaggle(small_kaggle_copy) -> Path:
    return small_kaggle_copy(train_ids=TRAIN_IDS, test_ids=("1", "2"))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """One folder for the property tests' files (each example writes its own)."""
    return tmp_path_factory.mktemp("hostile")


def small_png(path: Path, size: tuple[int, int] = (12, 16), value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame = np.full(size, value, dtype=np.uint8)
    frame[2:5, 3:7] = 200
    Image.fromarray(frame).save(path, format="PNG")
    return path


# ---------------------------------------------------------------------------------------------------
# 1. Names that become paths


def long_table_folder(root: Path, label: str, sample_id: str = "f1") -> Path:
    """An rle-csv folder with one frame and a long table whose class column holds ``label``."""
    small_png(root / "images" / "f1.png")
    write_rows(root / "train.csv", [["id", "class", "rle"], [sample_id, label, "1 3"], ["f1", "nerve", ""]])
    return root


@pytest.mark.parametrize("label", ["../../x", "/tmp/evil", "a b", "-rf", "x\ny"])
def test_a_long_table_class_that_cannot_be_a_folder_name_is_refused(capsys, tmp_path, label):
    data = long_table_folder(tmp_path / "data", label)
    code, out, err = run_cli(capsys, "inspect", str(data))
    assert code == 2 and out == "" and TRACEBACK not in err
    one_error_line(err, str(data / "train.csv"), "row 2", "class", "cannot become a file name", "rename it")


def test_a_class_folder_that_cannot_be_a_folder_name_is_refused(capsys, tmp_path):
    data = tmp_path / "data"
    small_png(data / "images" / "f1.png")
    small_png(data / "masks" / "nerve" / "f1.png")
    small_png(data / "masks" / "-rf" / "f1.png")
    code, out, err = run_cli(capsys, "inspect", str(data))
    assert code == 2 and out == "" and TRACEBACK not in err
    one_error_line(err, str(data / "masks"), "class folder '-rf'", "rename it")


def test_kaggle_csv_ids_that_leave_a_folder_are_listed_and_refused(capsys, kaggle, tmp_path):
    header, *rows = read_rows(kaggle / "train_masks.csv")
    write_rows(kaggle / "train_masks.csv", [header, *rows, ["..", "../../etc/x", ""]])
    line = inspect_lists(capsys, kaggle, "unsafe_name", "train_masks.csv", "row", "'.._../../etc/x'", "fix the id or drop the row")
    assert "missing_image" not in line
    train_refuses(capsys, kaggle, tmp_path / "run", "train_masks.csv", "cannot be a frame id", "medseg inspect")


def test_rle_csv_and_sample_submission_ids_are_checked(capsys, kaggle, tmp_path):
    header, *rows = read_rows(kaggle / "sample_submission.csv")
    write_rows(kaggle / "sample_submission.csv", [header, *rows, ["/etc/passwd", ""]])
    inspect_lists(capsys, kaggle, "unsafe_name", "sample_submission.csv", "'/etc/passwd'")
    data = tmp_path / "rle"
    small_png(data / "images" / "f1.png")
    write_rows(data / "masks.csv", [["id", "rle"], ["f1", ""], ["../../evil.png", "1 2"], ["", ""]])
    code, out, _ = run_cli(capsys, "inspect", str(data))
    assert code == 1 and "'../../evil.png'" in out and "row 3" in out and "row 4: the id is empty" in out, out


def test_image_files_whose_names_cannot_be_ids_are_listed_not_read(capsys, kaggle):
    for suffix in (".tif", "_mask.tif"):
        shutil.copyfile(kaggle / "train" / f"1_1{suffix}", kaggle / "train" / f"-1_9{suffix}")
    code, out, err = run_cli(capsys, "inspect", str(kaggle))
    assert code == 1 and TRACEBACK not in out + err
    assert out.count("unsafe_name") == 2 and "-1_9.tif: image id '-1_9' cannot be a frame id" in out and "rename the file" in out


def test_real_ids_and_file_names_with_spaces_are_frame_ids():
    real = ["1_1", "10", "1.2.276.0.7230010.3.1.4.8323329.5597.1517875188.959090", "case123_day20_slice_0001", "patient 7", "Müller_01"]
    assert all(io.is_frame_id(name) for name in real)
    hostile = ["", ".", "..", "../x", "a/b", "a\\b", "-x", "a\nb", "a\x00b", "\udcff", "x" * 201]
    assert not any(io.is_frame_id(name) for name in hostile)


def test_an_exclusions_file_with_an_unsafe_id_is_one_line(capsys, kaggle, tmp_path):
    listing = tmp_path / "noisy.csv"
    listing.write_text("id,reason\n../../1_1,bad\n")
    train_refuses(capsys, kaggle, tmp_path / "run", str(listing), "line 2", "cannot be a frame id", flags=("--exclude", str(listing)))


names = st.one_of(
    st.text(max_size=30),
    st.text(alphabet="./\\-_ a\x00\n\t", max_size=12),
    st.sampled_from(["..", ".", "../x", "/etc/passwd", "a/b", "-rf", "con", " x ", "x.png", "..png", "../x.png", "é" * 120]),
)


def write_quoted(path: Path, head: str, cells: list[str]) -> Path:
    """``head``, then one row of ``cells``, each quoted, written byte for byte (NUL and lone surrogates too)."""
    row = ",".join('"' + cell.replace('"', '""') + '"' for cell in cells)
    path.write_bytes(f"{head}\n{row}\n".encode("utf-8", "surrogatepass"))
    return path


def assert_stays_inside(folder: Path, name: str) -> None:
    """An accepted name, joined as medseg writes it, lands directly in ``folder``."""
    path = inside(folder, f"{name}.png")
    assert path.parent == folder and path.name == f"{name}.png"


def hostile_settings(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@hostile_settings(150)
@given(label=names)
@example(label="../../x")
@example(label="/abs")
def test_any_class_label_is_refused_or_stays_inside_its_folder(scratch, label):
    path = write_quoted(scratch / "long.csv", "id,class,rle", ["f1", label, ""])
    try:
        table = long_rle.read_long_table(path, long_rle.LONG_FORMATS[0])
    except (UsageError, DataError) as error:
        assert str(path) in str(error) and "\n" not in str(error)
        return
    for accepted in table.labels:
        assert_stays_inside(scratch, accepted)


@hostile_settings(150)
@given(sample_id=names)
@example(sample_id="../evil.png")
def test_any_csv_id_is_listed_or_stays_inside_its_folder(scratch, sample_id):
    root = scratch / "rle-csv"
    small_png(root / "images" / "f1.png")
    write_quoted(root / "masks.csv", "id,rle\nf1,", [sample_id, ""])
    try:
        dataset = load_dataset(root)
    except (UsageError, DataError) as error:
        assert "\n" not in str(error)
        return
    listed = [problem for problem in dataset.problems if problem.kind == "unsafe_name"]
    if not listed:
        stripped = sample_id.strip()
        assert_stays_inside(scratch, stripped.rsplit(".", 1)[0] if stripped.endswith(".png") else stripped)
    for record in dataset.train:
        assert_stays_inside(scratch, record.id)


@hostile_settings(100)
@given(name=names)
@example(name="¹0")  # a superscript digit: isdigit() but not a number int() reads
@example(name="frame٣2")  # an Arabic-Indic digit beside ASCII ones
def test_any_file_name_is_listed_or_stays_inside_its_folder(scratch, name):
    folder = scratch / "files"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    path = folder / f"{name}.png"
    if "/" in name or "\x00" in name or path.parent != folder:
        return  # a file system holds no such file name: no folder can hand it to medseg
    try:
        small_png(path)
    except (OSError, UnicodeEncodeError):
        return  # too long, or not encodable as a file name
    records, problems = image_records(folder)
    for record in records:
        assert_stays_inside(scratch, record.id)
    assert len(records) + len(problems) == (0 if path.name.startswith(".") else 1)  # hidden files are not frames


@hostile_settings(150)
@given(sample_id=names)
def test_any_excluded_id_is_refused_or_stays_inside_its_folder(scratch, sample_id):
    path = write_quoted(scratch / "exclusions.csv", "id", [sample_id])
    try:
        excluded = exclusions.read_exclusions(path)
    except (UsageError, DataError) as error:
        assert str(path) in str(error) and "\n" not in str(error)
        return
    for frame in excluded:
        assert_stays_inside(scratch, frame)


# ---------------------------------------------------------------------------------------------------
# 2. Frames too large: small files whose headers declare HUGE x HUGE pixels


def tiff_bomb(path: Path) -> Path:
    """A 300-byte zlib-tiled TIFF whose header says HUGE x HUGE."""
    tifffile.imwrite(path, np.zeros((16, 16), np.uint8), compression="zlib", tile=(16, 16))
    with tifffile.TiffFile(path) as tif:
        offsets = [tif.pages.first.tags[name].valueoffset for name in ("ImageWidth", "ImageLength")]
    data = bytearray(path.read_bytes())
    for offset in offsets:
        struct.pack_into("<I", data, offset, HUGE)
    path.write_bytes(bytes(data))
    return path


def png_bomb(path: Path) -> Path:
    """A small PNG whose IHDR says HUGE x HUGE (its CRC fixed, so only the size is wrong)."""
    small_png(path)
    data = bytearray(path.read_bytes())
    struct.pack_into(">II", data, 16, HUGE, HUGE)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def jpeg_bomb(path: Path) -> Path:
    """A small baseline JPEG whose SOF0 says HUGE x HUGE."""
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(path, format="JPEG")
    data = bytearray(path.read_bytes())
    struct.pack_into(">HH", data, data.index(b"\xff\xc0") + 5, HUGE, HUGE)
    path.write_bytes(bytes(data))
    return path


def bmp_bomb(path: Path) -> Path:
    """A small BMP whose header says HUGE x HUGE."""
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(path, format="BMP")
    data = bytearray(path.read_bytes())
    struct.pack_into("<ii", data, 18, HUGE, HUGE)
    path.write_bytes(bytes(data))
    return path


def dicom_file(path: Path, pixels: np.ndarray, **attributes) -> Path:
    """A single-frame gray DICOM file (explicit VR little endian)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = pydicom.Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID, dataset.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
    bits = pixels.dtype.itemsize * 8
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = bits, bits, bits - 1, 0
    dataset.PixelData = np.ascontiguousarray(pixels).tobytes()
    for key, value in attributes.items():
        setattr(dataset, key, value)
    dataset.save_as(path, enforce_file_format=True)
    return path


def dicom_bomb(path: Path) -> Path:
    """A DICOM file of 512 pixel bytes whose header says HUGE x HUGE."""
    return dicom_file(path, np.zeros((16, 16), np.uint16), Rows=HUGE, Columns=HUGE)


BOMBS: dict[str, Callable[[Path], Path]] = {".tif": tiff_bomb, ".png": png_bomb, ".jpg": jpeg_bomb, ".bmp": bmp_bomb, ".dcm": dicom_bomb}


@pytest.mark.parametrize("suffix", list(BOMBS))
@pytest.mark.parametrize("reader", ["read_image", "read_mask_values", "image_size"])
def test_a_bomb_of_every_format_is_refused_from_its_header_fast_and_small(tmp_path, suffix, reader):
    path = BOMBS[suffix](tmp_path / f"bomb{suffix}")
    assert path.stat().st_size < 10_000
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(ImageReadError) as caught:
        getattr(io, reader)(path)
    elapsed = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert elapsed < 0.5 and peak < 20_000_000, (elapsed, peak)
    error = caught.value
    assert error.kind == "too_many_pixels" and error.path == path and "\n" not in str(error)
    assert f"{HUGE}x{HUGE} = {HUGE * HUGE:,} pixels" in str(error) and f"--max-pixels {HUGE * HUGE}" in str(error)


def test_a_bomb_frame_is_listed_by_inspect_and_refused_by_train(capsys, kaggle, tmp_path):
    tiff_bomb(kaggle / "train" / f"{BROKEN}.tif")
    inspect_lists(capsys, kaggle, "too_many_pixels", f"{BROKEN}.tif", "--max-pixels ")
    train_refuses(capsys, kaggle, tmp_path / "run", f"{BROKEN}.tif", "more than the limit", "medseg inspect")


def test_a_bomb_mask_is_listed_by_inspect(capsys, kaggle):
    tiff_bomb(kaggle / "train" / f"{BROKEN}_mask.tif")
    inspect_lists(capsys, kaggle, "unreadable_mask", f"{BROKEN}_mask.tif", "--max-pixels ")


def test_the_limit_is_data_max_pixels_above_and_below_pillows(tmp_path, kaggle):
    frame = kaggle / "train" / "1_1.tif"
    with pytest.raises(ImageReadError, match="580x420 = 243,600 pixels"):
        io.read_image(frame, max_pixels=243_599)
    assert io.read_image(frame, max_pixels=243_600).shape == (420, 580)
    big = png_bomb(tmp_path / "big.png")  # above Pillow's own bomb limit, within a raised data.max_pixels
    assert io.image_size(big, max_pixels=HUGE * HUGE) == (HUGE, HUGE)
    options = DataOptions.model_validate({"max_pixels": 243_599})
    with pytest.raises(DataError, match="more than the limit of 243,599"):
        require_samples(kaggle, options)


def require_samples(root: Path, options: DataOptions) -> None:
    from medseg.data.datasets import require_clean
    from medseg.data.samples import load_samples

    load_samples(require_clean(load_dataset(root, options)).train, options, workers=1)


@pytest.mark.parametrize("bomb", [Image.DecompressionBombError("too big"), Image.DecompressionBombWarning("too big")])
def test_pillows_own_bomb_guard_is_the_same_problem(tmp_path, monkeypatch, bomb):
    path = small_png(tmp_path / "f.png")

    def refuse(*args, **kwargs):
        raise bomb

    monkeypatch.setitem(io._PILLOW_FILES, "PNG", refuse)
    for reader in (io.read_image, io.image_size):
        with pytest.raises(ImageReadError, match="decompression bomb") as caught:
            reader(path)
        assert caught.value.kind == "too_many_pixels"


def test_a_header_that_declares_no_pixels_is_one_line(tmp_path):
    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, np.zeros((4, 4), np.uint8))
    with tifffile.TiffFile(path) as tif:
        offset = tif.pages.first.tags["ImageWidth"].valueoffset
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, offset, 0)
    path.write_bytes(bytes(data))
    with pytest.raises(ImageReadError, match="holds none; replace the file"):
        io.image_size(path)


# ---------------------------------------------------------------------------------------------------
# 3. Non-finite pixels


def test_nan_and_infinite_pixels_are_listed_and_refused(capsys, kaggle, tmp_path):
    frame = tifffile.imread(kaggle / "train" / f"{BROKEN}.tif").astype(np.float32) / 255
    frame[0, :3] = [np.nan, np.inf, -np.inf]
    tifffile.imwrite(kaggle / "train" / f"{BROKEN}.tif", frame)
    inspect_lists(
        capsys, kaggle, "non_finite_pixels", f"{BROKEN}.tif", "3 of 243,600 pixels are NaN or infinite", "replace them with finite values"
    )
    train_refuses(capsys, kaggle, tmp_path / "run", f"{BROKEN}.tif", "NaN or infinite", "medseg inspect")
    for window in ("auto", "percentile", "none", (0.0, 1.0)):
        with pytest.raises(ImageReadError, match="NaN or infinite"):
            io.read_image(kaggle / "train" / f"{BROKEN}.tif", window)


@pytest.mark.filterwarnings("error")
def test_a_dicom_rescale_to_infinity_is_non_finite(tmp_path):
    path = dicom_file(tmp_path / "ct.dcm", np.array([[0, 1]], np.uint16), RescaleSlope="1e308", RescaleIntercept="1e308")
    with pytest.raises(ImageReadError, match="1 of 2 pixels are NaN or infinite"):
        io.read_image(path)


def test_a_nan_mask_is_refused(tmp_path):
    path = tmp_path / "mask.tif"
    tifffile.imwrite(path, np.array([[0.0, np.nan]], np.float32))
    with pytest.raises(ImageReadError, match="1 of 2 pixels are NaN"):
        io.read_mask_values(path)


# ---------------------------------------------------------------------------------------------------
# 4. CSV tables


def test_a_column_named_twice_is_one_line_in_every_reader(capsys, kaggle, tmp_path):
    header, *rows = read_rows(kaggle / "train_masks.csv")
    write_rows(kaggle / "train_masks.csv", [[*header, "pixels"], *[[*row, row[2]] for row in rows]])
    code, out, err = run_cli(capsys, "inspect", str(kaggle))
    assert code == 1 and out == "" and TRACEBACK not in err
    one_error_line(err, "train_masks.csv", "column 'pixels' appears more than once in the header; keep one")
    table = tmp_path / "long.csv"
    table.write_text("id,class,rle, class\nf1,nerve,\n")
    with pytest.raises(DataError, match="column 'class' appears more than once"):
        long_rle.read_long_table(table, long_rle.LONG_FORMATS[0])
    listing = tmp_path / "noisy.csv"
    listing.write_text("id,reason,ID\n1_1,x,y\n")
    with pytest.raises(DataError, match="line 1: column 'id' appears more than once"):
        exclusions.read_exclusions(listing)


def test_a_sample_submission_with_a_column_named_twice_is_one_line(capsys, kaggle):
    (kaggle / "sample_submission.csv").write_text("img,img,pixels\n1,1,\n2,2,\n")
    code, _, err = run_cli(capsys, "inspect", str(kaggle))
    assert code == 1
    one_error_line(err, "sample_submission.csv", "column 'img' appears more than once")


def test_a_table_larger_than_the_cap_is_refused_before_parsing(capsys, kaggle, monkeypatch, tmp_path):
    monkeypatch.setattr(io, "MAX_TABLE_BYTES", 1000)
    code, _, err = run_cli(capsys, "inspect", str(kaggle))
    assert code == 1
    one_error_line(err, "train_masks.csv", "more than a CSV table medseg reads (1,000)", "is it the right file?")
    monkeypatch.setattr(exclusions, "MAX_BYTES", 10)
    listing = tmp_path / "noisy.csv"
    listing.write_text("id,reason\n1_1,a reason\n")
    with pytest.raises(DataError, match="more than an exclusions file can be"):
        exclusions.read_exclusions(listing)


def test_a_huge_field_neither_hangs_nor_blows_memory(tmp_path):
    table = tmp_path / "huge.csv"
    field = "1 2 " * 5_000_000  # 20 MB in one cell
    table.write_text(f"img,pixels\n1,{field}\n2,\n")
    start = time.perf_counter()
    read = io.read_csv(table, ("img", "pixels"))
    assert time.perf_counter() - start < 5 and len(read["pixels"][0]) == len(field)
    unclosed = tmp_path / "unclosed.csv"
    unclosed.write_text(f'img,pixels\n1,"{field}\n')
    with pytest.raises(DataError, match="not a valid CSV"):
        io.read_csv(unclosed, ())
    listing = tmp_path / "noisy.csv"
    listing.write_text(f"id,reason\n1_1,{'x' * 200_000}\n")
    with pytest.raises(DataError, match="field larger than field limit"):
        exclusions.read_exclusions(listing)


def test_rows_wider_than_the_header_name_the_line(tmp_path):
    table = tmp_path / "wide.csv"
    table.write_text("img,pixels\n1,\n2,5 3,\n")
    with pytest.raises(DataError, match=r"line 3 has 3 fields, more than the 2 of the header \(a trailing comma\?\); fix the file"):
        io.read_csv(table, ())


# ---------------------------------------------------------------------------------------------------
# 5. Labels no mask holds


def test_a_mask_value_no_mask_holds_is_listed_and_refused(capsys, kaggle, tmp_path):
    line = inspect_lists(
        capsys, kaggle, "absent_label", "train", "no mask holds the value 3", "the masks hold 0, 255", flags=("--mask-value", "3")
    )
    assert "pick one of those with --mask-value" in line
    train_refuses(capsys, kaggle, tmp_path / "run", "no mask holds the value 3", "medseg inspect", flags=("--mask-value", "3"))


def test_a_mask_value_that_some_masks_hold_is_fine_though_others_are_empty(capsys, kaggle):
    assert not io.read_mask(kaggle / "train" / f"{BROKEN}_mask.tif").any()  # an empty mask in the copy
    code, out, err = run_cli(capsys, "inspect", str(kaggle), "--mask-value", "255")
    assert code == 0 and "No problems found." in out, out + err


def test_a_threshold_that_empties_every_mask_is_listed(capsys, kaggle):
    inspect_lists(
        capsys, kaggle, "empty_after_threshold", "--mask-threshold 255", "highest mask value is 255", flags=("--mask-threshold", "255")
    )
    code, out, _ = run_cli(capsys, "inspect", str(kaggle), "--mask-threshold", "254")
    assert code == 0, out


def test_a_class_index_label_no_mask_holds_is_listed(capsys, shared_data, tmp_path):
    data = tmp_path / "usgra"
    for folder in ("images", "masks"):
        (data / folder).mkdir(parents=True)
        for name in ("0000", "0001"):
            shutil.copyfile(shared_data / "usgra-seg" / folder / f"{name}.png", data / folder / f"{name}.png")
    line = inspect_lists(capsys, data, "absent_label", "of class artery (--classes artery=9)", flags=("--classes", "nerve=1,artery=9"))
    assert "the masks hold 0, 1, 2" in line and "nerve" not in line.split("artery")[0]


# ---------------------------------------------------------------------------------------------------
# 6. DICOM files with a malformed window or header


def patched_dicom(path: Path, **values: str) -> Path:
    """A DICOM file whose elements hold ``values`` byte for byte (malformed ones too), 8-byte placeholders patched."""
    placeholders = {key: f"{90000 + index}.5 " for index, key in enumerate(values)}
    dicom_file(path, np.arange(64, dtype=np.uint16).reshape(8, 8), **{key: text.strip() for key, text in placeholders.items()})
    data = path.read_bytes()
    for key, value in values.items():
        data = data.replace(placeholders[key].encode(), value.encode().ljust(8))
    path.write_bytes(data)
    return path


MALFORMED_WINDOWS = [("abc", "400"), ("40", ""), ("40", "0"), ("40", "-5"), ("40", "abc\\def"), ("nan", "inf")]


@pytest.mark.filterwarnings("error")  # told as a problem, not as pydicom's warning
@pytest.mark.parametrize(("centre", "width"), MALFORMED_WINDOWS)
def test_a_malformed_dicom_window_is_a_listed_problem(tmp_path, centre, width):
    path = patched_dicom(tmp_path / "w.dcm", WindowCenter=centre, WindowWidth=width)
    with pytest.raises(ImageReadError) as caught:
        io.read_image(path)
    assert caught.value.kind == "bad_dicom_window" and "\n" not in str(caught.value)
    assert "--set data.intensity_window=percentile" in str(caught.value)
    assert io.read_image(path, "percentile").shape == (8, 8)  # the way out the message gives


def test_inspect_lists_a_malformed_window_with_its_file(capsys, tmp_path):
    data = tmp_path / "dicom"
    for name in ("a", "b"):
        path = patched_dicom(data / "images" / f"{name}.dcm", WindowCenter="abc" if name == "b" else "40", WindowWidth="400")
        assert path.is_file()
        small_png(data / "masks" / f"{name}.png", size=(8, 8))
    inspect_lists(capsys, data, "bad_dicom_window", "b.dcm", "WindowCenter 'abc'")


def test_several_windows_use_the_first(tmp_path):
    path = patched_dicom(tmp_path / "w.dcm", WindowCenter="32\\10", WindowWidth="64\\5")
    frame = io.read_image(path)
    assert frame.dtype == np.float32 and frame.min() == 0.0 and frame.max() == pytest.approx(63 / 64)


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize(("key", "value"), [("RescaleSlope", "abc"), ("RescaleSlope", "0"), ("RescaleIntercept", "inf")])
def test_a_malformed_dicom_rescale_is_one_line(tmp_path, key, value):
    path = patched_dicom(tmp_path / "r.dcm", **{key: value})
    with pytest.raises(ImageReadError, match=f"DICOM {key} is") as caught:
        io.read_image(path)
    assert caught.value.kind == "bad_dicom_header"


@pytest.mark.filterwarnings("error")
def test_a_malformed_number_of_frames_is_one_line(tmp_path):
    path = dicom_file(tmp_path / "n.dcm", np.zeros((8, 8), np.uint16), NumberOfFrames="1")
    path.write_bytes(path.read_bytes().replace(b"IS\x02\x001 ", b"IS\x02\x00x "))
    for reader in (io.read_image, io.image_size):
        with pytest.raises(ImageReadError, match="DICOM NumberOfFrames is 'x', not a whole number"):
            reader(path)


# ---------------------------------------------------------------------------------------------------
# 7. Range checks


@pytest.mark.parametrize("window", [(float("nan"), 1.0), (0.0, float("inf"))])
def test_a_fixed_window_must_be_finite(window):
    with pytest.raises(ValueError, match="not two finite numbers"):
        intensity.window_of(np.zeros((2, 2), np.uint16), window)


# ---------------------------------------------------------------------------------------------------
# The user's terminal: the console script prints lines, never a traceback


def test_the_console_script_lists_hostile_frames_and_refuses_a_hostile_table(kaggle):
    script = Path(sys.executable).parent / "medseg"
    tiff_bomb(kaggle / "train" / f"{BROKEN}.tif")
    nan = tifffile.imread(kaggle / "train" / "2_1.tif").astype(np.float32)
    nan[5, 5] = np.nan
    tifffile.imwrite(kaggle / "train" / "2_1.tif", nan)
    result = subprocess.run([str(script), "inspect", str(kaggle)], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1 and TRACEBACK not in result.stdout + result.stderr, result.stderr
    problem_line(result.stdout, "too_many_pixels", f"{BROKEN}.tif")
    problem_line(result.stdout, "non_finite_pixels", "2_1.tif", "1 of 243,600 pixels")
    rows = read_rows(kaggle / "train_masks.csv")[1:]
    write_rows(kaggle / "train_masks.csv", [["subject", "img", "pixels", "pixels"], *[[*row, ""] for row in rows]])
    result = subprocess.run([str(script), "inspect", str(kaggle)], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1 and result.stdout == "" and TRACEBACK not in result.stderr
    one_error_line(result.stderr, "train_masks.csv", "column 'pixels' appears more than once")


def test_inside_refuses_what_the_checks_refuse(tmp_path):
    """The last line of defence: a name that slipped past every check still cannot leave its folder."""
    for name in ("../x", "/etc/passwd", ".."):
        with pytest.raises(MedsegError):
            inside(tmp_path, name)
