"""The files medical data comes in: DICOM (compressed, rescaled, MONOCHROME1, extension-less) and frames
deeper than 8 bits, read with their precision, windowed the same way in training, prediction and export.

The real files are the SIIM-ACR sample radiographs (JPEG-baseline DICOM) in ``../shared/data/siim-sample``;
the other DICOM files are written here with pydicom, and the 16-bit frames from real usgra-seg frames.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from conftest import TINY_OVERRIDES, set_args
from medseg.cli import main
from medseg.data import io
from medseg.data.datasets import image_records
from medseg.errors import ImageReadError

SIIM_ID = "1.2.276.0.7230010.3.1.4.8323329.4904.1517875185.355709"


def write_dicom(path: Path, pixels: np.ndarray | None, **attributes) -> Path:
    """A single-frame gray DICOM file (explicit VR little endian) with the given pixels and attributes."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR image storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = pydicom.Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID, dataset.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    dataset.Modality = "CR"
    if pixels is not None:
        bits = pixels.dtype.itemsize * 8
        dataset.Rows, dataset.Columns = pixels.shape
        dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
        dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = bits, bits, bits - 1
        dataset.PixelRepresentation = int(np.issubdtype(pixels.dtype, np.signedinteger))
        dataset.PixelData = np.ascontiguousarray(pixels).tobytes()
    for key, value in attributes.items():
        setattr(dataset, key, value)
    dataset.save_as(path, enforce_file_format=True)
    return path


def test_the_real_siim_radiographs_decode_from_jpeg_baseline(shared_data):
    path = shared_data / "siim-sample" / "images" / f"{SIIM_ID}.dcm"
    assert str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.4.50"
    image = io.read_image(path)
    assert image.dtype == np.uint8 and image.shape == (1024, 1024) == io.image_size(path)
    assert 100 < len(np.unique(image)) and 20 < image.mean() < 235  # a radiograph, not a blank or noise


def test_rescale_window_and_monochrome1_are_applied(tmp_path):
    stored = np.array([[0, 100, 200, 300]], dtype=np.uint16)
    path = write_dicom(tmp_path / "ct.dcm", stored, RescaleSlope=2, RescaleIntercept=-100, WindowCenter=200, WindowWidth=400)
    np.testing.assert_allclose(io.read_image(path)[0], [0.0, 0.25, 0.75, 1.0])  # values -100, 100, 300, 500 in [0, 400]
    inverted = write_dicom(tmp_path / "mono1.dcm", stored, PhotometricInterpretation="MONOCHROME1", WindowCenter=150, WindowWidth=300)
    np.testing.assert_allclose(io.read_image(inverted)[0], [1.0, 2 / 3, 1 / 3, 0.0], atol=1e-6)  # lowest value is white
    fixed = io.read_image(inverted, window=(0.0, 100.0))
    np.testing.assert_allclose(fixed[0], [1.0, 0.0, 0.0, 0.0])  # a fixed window overrides the file's


def test_an_8bit_monochrome1_dicom_is_inverted_and_stays_8bit(tmp_path):
    stored = np.array([[0, 10, 255]], dtype=np.uint8)
    path = write_dicom(tmp_path / "mono1.dcm", stored, PhotometricInterpretation="MONOCHROME1")
    image = io.read_image(path)
    assert image.dtype == np.uint8 and image.tolist() == [[255, 245, 0]]


def test_a_16bit_dicom_without_a_window_keeps_its_levels(tmp_path):
    stored = np.linspace(0, 2000, 64 * 96).round().astype(np.uint16).reshape(64, 96)
    image = io.read_image(write_dicom(tmp_path / "mr.dcm", stored))
    assert image.dtype == np.float32 and len(np.unique(image)) > 200


def test_a_dicom_without_pixels_is_one_line_naming_it(tmp_path):
    path = write_dicom(tmp_path / "report.dcm", None)
    with pytest.raises(ImageReadError, match="holds no pixel data") as caught:
        io.read_image(path)
    assert "report.dcm" in str(caught.value) and "\n" not in str(caught.value)


def test_a_truncated_dicom_is_one_line_naming_it(tmp_path):
    path = write_dicom(tmp_path / "cut.dcm", np.zeros((32, 32), dtype=np.uint16))
    path.write_bytes(path.read_bytes()[:400])
    with pytest.raises(ImageReadError) as caught:
        io.read_image(path)
    assert "cut.dcm" in str(caught.value) and "\n" not in str(caught.value)


def test_an_extensionless_dicom_is_an_image_named_by_its_whole_name(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    write_dicom(folder / "1.2.840.113619.2.55", np.zeros((8, 8), dtype=np.uint16))
    (folder / "notes.txt").write_text("not an image")
    records, problems = image_records(folder)
    assert [record.id for record in records] == ["1.2.840.113619.2.55"]
    assert [problem.path.name for problem in problems] == ["notes.txt"]


def test_inspect_lists_an_unreadable_dicom_as_a_problem(shared_data, tmp_path, capsys):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    for index in range(2):
        frame = cv2.imread(str(shared_data / "usgra-seg" / "images" / f"000{index}.png"), cv2.IMREAD_GRAYSCALE)
        write_dicom(data / "images" / f"f{index}.dcm", frame)
        shutil.copyfile(shared_data / "usgra-seg" / "masks" / f"000{index}.png", data / "masks" / f"f{index}.png")
    write_dicom(data / "images" / "empty.dcm", None)
    shutil.copyfile(shared_data / "usgra-seg" / "masks" / "0000.png", data / "masks" / "empty.png")
    main(["inspect", str(data), "--mask-value", "1"])
    out = capsys.readouterr().out
    assert "empty.dcm" in out and "holds no pixel data" in out


def sixteen_bit_copy(shared_data: Path, root: Path, names=("0000", "0001", "0002", "0003", "0012", "0025")) -> Path:
    """usgra-seg frames stored as 16-bit PNG with values 0..2,000 (as an MRI slice's), and their masks."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for name in names:
        frame = cv2.imread(str(shared_data / "usgra-seg" / "images" / f"{name}.png"), cv2.IMREAD_GRAYSCALE)
        cv2.imwrite(str(root / "images" / f"{name}.png"), (frame.astype(np.uint32) * 2000 // 255).astype(np.uint16))
        shutil.copyfile(shared_data / "usgra-seg" / "masks" / f"{name}.png", root / "masks" / f"{name}.png")
    return root


def test_a_16bit_data_set_trains_predicts_and_exports_with_its_window(shared_data, tmp_path):
    data = sixteen_bit_copy(shared_data, tmp_path / "mri")
    run = tmp_path / "run"
    args = ["train", str(data), "--mask-value", "1", "--out", str(run), "--preset", "cpu", "--quiet"]
    assert main([*args, *set_args(*TINY_OVERRIDES, "trainer.max_epochs=1", "data.intensity_window=[0,2000]")]) == 0
    saved = (run / "config.yaml").read_text()
    assert "intensity_window" in saved and "2000" in saved  # the window is part of the run
    out = tmp_path / "masks"
    assert main(["predict", str(run), str(data / "images"), "--masks-dir", str(out), "--quiet"]) == 0
    assert len(list(out.glob("*.png"))) == 6
    assert main(["export", str(run), "--onnx", str(tmp_path / "model.onnx")]) == 0
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["input"]["intensity_window"] == [0.0, 2000.0] and "fixed [0, 2000]" in meta["input"]["intensity_window_meaning"]
