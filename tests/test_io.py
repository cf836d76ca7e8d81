"""Tests for medseg.io on the real data in ../shared/data and on broken copies of it."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from conftest import uns_mini_rle
from medseg.data import io, rle
from medseg.errors import DataError, ImageReadError

LUMA = np.array([0.299, 0.587, 0.114])


# --------------------------------------------------------------------------- read_image


def test_read_image_real_kaggle_lzw_tiff(shared_data: Path) -> None:
    path = shared_data / "kaggle-uns" / "train" / "1_1.tif"
    with tifffile.TiffFile(path) as tif:
        assert tif.pages.first.compression == 5  # LZW, as in the competition
        stored = tif.pages.first.asarray()
    image = io.read_image(path)
    assert image.dtype == np.uint8
    assert image.shape == (420, 580)
    np.testing.assert_array_equal(image, stored)
    assert image.std() > 5  # a real ultrasound frame, not a blank


def test_read_image_rgb_png_is_luma(shared_data: Path) -> None:
    path = shared_data / "usgra-seg" / "images" / "0040.png"
    rgb = np.array(Image.open(path))
    assert rgb.ndim == 3 and rgb.shape[2] == 3
    image = io.read_image(path)
    assert image.dtype == np.uint8
    assert image.shape == rgb.shape[:2]
    luma = rgb[..., :3].astype(np.float64) @ LUMA
    assert np.abs(image.astype(np.float64) - luma).max() <= 1.0


def test_read_image_gray_png_unchanged(shared_data: Path) -> None:
    path = shared_data / "montgomery-cxr" / "images" / "MCUCXR_0001_0.png"
    image = io.read_image(path)
    np.testing.assert_array_equal(image, np.array(Image.open(path).convert("L")))


def test_read_image_16bit_png_keeps_its_precision(tmp_path: Path) -> None:
    values = np.array([[0, 65535, 257], [32768, 1000, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")  # really stored as 16-bit
    image = io.read_image(path, window="none")  # the full 16-bit range to [0, 1], no rounding to 8 bits
    assert image.dtype == np.float32
    np.testing.assert_allclose(image, values / 65535.0, atol=1e-6)


def test_a_16bit_mri_like_frame_keeps_over_200_levels(tmp_path: Path) -> None:
    # An MRI slice whose values run 0..2,000: divided by 257 it became 8 gray levels.
    values = np.linspace(0, 2000, 64 * 96).round().astype(np.uint16).reshape(64, 96)
    path = tmp_path / "slice.png"
    Image.fromarray(values).save(path)
    image = io.read_image(path)
    assert image.dtype == np.float32 and 0.0 <= image.min() and image.max() <= 1.0
    assert len(np.unique(image)) > 200
    low, high = np.percentile(values, (0.5, 99.5))  # the default window: the 0.5th to 99.5th percentile
    np.testing.assert_allclose(image, np.clip((values - low) / (high - low), 0, 1), atol=1e-5)


@pytest.mark.parametrize(("window", "expected"), [((1000.0, 2000.0), [0.0, 0.0, 0.5, 1.0]), ("none", [0, 500 / 65535, 1500 / 65535, 1])])
def test_a_named_window_maps_16bit_values(tmp_path: Path, window, expected) -> None:
    path = tmp_path / "deep.tif"
    tifffile.imwrite(path, np.array([[0, 500, 1500, 65535]], dtype=np.uint16))
    np.testing.assert_allclose(io.read_image(path, window)[0], expected, atol=1e-6)


def test_8bit_frames_stay_as_stored_unless_a_window_is_named(tmp_path: Path) -> None:
    path = tmp_path / "eight.png"
    frame = np.arange(60, dtype=np.uint8).reshape(6, 10) + 100
    Image.fromarray(frame).save(path)
    assert io.read_image(path).dtype == np.uint8 and np.array_equal(io.read_image(path), frame)
    stretched = io.read_image(path, window="percentile")
    assert stretched.dtype == np.float32 and stretched.min() == 0.0 and stretched.max() == 1.0


def test_read_image_16bit_rgb_tiff_is_gray_not_clipped(tmp_path: Path) -> None:
    # Gray 16-bit data stored as RGB: every channel equal, so the gray level is the channel value.
    level = np.array([[0, 1000], [32768, 65535]], dtype=np.uint16)
    path = tmp_path / "deep_rgb.tif"
    tifffile.imwrite(path, np.stack([level] * 3, axis=-1), photometric="rgb")
    np.testing.assert_allclose(io.read_image(path, window="none"), level / 65535.0, atol=1e-6)


def test_read_image_dark_rgb_png_is_not_stretched(tmp_path: Path) -> None:
    # An 8-bit RGB frame whose brightest pixel is 1: its gray levels are 0 and 1, not 0 and 255.
    rgb = np.zeros((4, 5, 3), dtype=np.uint8)
    rgb[1, 2] = (1, 1, 1)
    rgb[2, 3] = (0, 1, 0)
    path = tmp_path / "dark.png"
    Image.fromarray(rgb).save(path)
    image = io.read_image(path)
    assert image.max() <= 1, f"gray levels {np.unique(image)} of an image whose channels are at most 1"


def test_read_image_jpeg_close_to_frame(tmp_path: Path, shared_data: Path) -> None:
    frame = io.read_image(shared_data / "uns-mini" / "train" / "1_1.tif")
    path = tmp_path / "1_1.jpg"
    Image.fromarray(frame).save(path, quality=95)
    image = io.read_image(path)
    assert image.dtype == np.uint8 and image.shape == frame.shape
    difference = np.abs(image.astype(np.int16) - frame.astype(np.int16))
    assert difference.mean() < 2.0
    assert difference.max() < 20


# --------------------------------------------------------------------------- read_mask


def test_read_mask_kaggle_mask_matches_csv_rle(shared_data: Path) -> None:
    path = shared_data / "uns-mini" / "train" / "1_1_mask.tif"
    assert set(np.unique(tifffile.imread(path)).tolist()) == {0, 255}
    mask = io.read_mask(path)
    assert mask.dtype == np.bool_ and mask.shape == (420, 580)
    expected = rle.decode(uns_mini_rle("1_1"), (420, 580))
    assert mask.sum() == expected.sum() > 1000
    np.testing.assert_array_equal(mask, expected)


def test_read_mask_empty_kaggle_mask(shared_data: Path) -> None:
    assert uns_mini_rle("1_2") == ""
    mask = io.read_mask(shared_data / "uns-mini" / "train" / "1_2_mask.tif")
    assert mask.dtype == np.bool_ and mask.shape == (420, 580) and not mask.any()


def test_read_mask_palette_class_value(shared_data: Path) -> None:
    path = shared_data / "usgra-seg" / "masks" / "0040.png"
    indices = np.array(Image.open(path))
    assert Image.open(path).mode == "P"
    assert set(np.unique(indices).tolist()) == {0, 1, 2}
    nerve = io.read_mask(path, value=1)
    assert nerve.dtype == np.bool_
    np.testing.assert_array_equal(nerve, indices == 1)
    np.testing.assert_array_equal(io.read_mask(path, value=2), indices == 2)
    # Without a value every labelled class is foreground.
    np.testing.assert_array_equal(io.read_mask(path), indices != 0)


def test_read_mask_antialiased_threshold(shared_data: Path) -> None:
    path = shared_data / "montgomery-cxr" / "masks" / "MCUCXR_0001_0.png"
    levels = np.array(Image.open(path))
    assert len(np.unique(levels)) > 2  # anti-aliased edges
    mask = io.read_mask(path, threshold=127)
    assert mask.dtype == np.bool_ and mask.shape == levels.shape
    np.testing.assert_array_equal(mask, levels > 127)
    assert 0 < mask.sum() < (levels != 0).sum()


def test_is_binary_mask(shared_data: Path) -> None:
    assert io.is_binary_mask(io.read_mask_values(shared_data / "uns-mini" / "train" / "1_1_mask.tif"))
    assert io.is_binary_mask(io.read_mask_values(shared_data / "uns-mini" / "train" / "1_2_mask.tif"))  # empty
    assert io.is_binary_mask(np.array([[0, 1], [1, 0]], dtype=np.uint8))
    assert not io.is_binary_mask(io.read_mask_values(shared_data / "usgra-seg" / "masks" / "0040.png"))
    assert not io.is_binary_mask(io.read_mask_values(shared_data / "montgomery-cxr" / "masks" / "MCUCXR_0001_0.png"))
    assert not io.is_binary_mask(np.array([[0, 128], [255, 0]], dtype=np.uint8))


def test_read_mask_gray_rgb_accepted(tmp_path: Path) -> None:
    values = np.zeros((6, 7), dtype=np.uint8)
    values[2:4, 1:5] = 255
    path = tmp_path / "gray_rgb_mask.png"
    Image.fromarray(np.stack([values] * 3, axis=-1)).save(path)
    np.testing.assert_array_equal(io.read_mask(path), values != 0)


def test_read_mask_colour_raises(tmp_path: Path) -> None:
    rgb = np.zeros((6, 7, 3), dtype=np.uint8)
    rgb[2:4, 1:5] = (255, 0, 0)
    path = tmp_path / "red_mask.png"
    Image.fromarray(rgb).save(path)
    with pytest.raises(ImageReadError, match="colour") as caught:
        io.read_mask(path)
    assert "red_mask.png" in str(caught.value)


# --------------------------------------------------------------------------- broken files


def _frame_bytes(shared_data: Path) -> bytes:
    return (shared_data / "uns-mini" / "train" / "1_1.tif").read_bytes()


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty_frame.tif"
    path.write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty") as caught:
        io.read_image(path)
    assert "empty_frame.tif" in str(caught.value)


def test_truncated_tiff(tmp_path: Path, shared_data: Path) -> None:
    data = _frame_bytes(shared_data)
    path = tmp_path / "cut_frame.tif"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError) as caught:
        io.read_image(path)
    assert "cut_frame.tif" in str(caught.value)


def test_truncated_tiff_pixel_data(tmp_path: Path) -> None:
    # A TIFF whose header comes first: cutting it keeps the header but loses pixel data.
    source = tmp_path / "whole.tif"
    frame = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    tifffile.imwrite(source, frame)
    with tifffile.TiffFile(source) as tif:
        end = max(o + c for o, c in zip(tif.pages.first.dataoffsets, tif.pages.first.databytecounts))
        start = min(tif.pages.first.dataoffsets)
    data = source.read_bytes()
    assert start < len(data) // 2 < end  # the cut falls inside the pixel data
    path = tmp_path / "cut_pixels.tif"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="truncated") as caught:
        io.read_image(path)
    assert "cut_pixels.tif" in str(caught.value)


def test_truncated_png(tmp_path: Path, shared_data: Path) -> None:
    data = (shared_data / "usgra-seg" / "images" / "0040.png").read_bytes()
    path = tmp_path / "cut_image.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError) as caught:
        io.read_image(path)
    assert "cut_image.png" in str(caught.value)


def test_jpeg_named_tif(tmp_path: Path, shared_data: Path) -> None:
    frame = io.read_image(shared_data / "uns-mini" / "train" / "1_1.tif")
    path = tmp_path / "1_1.tif"
    Image.fromarray(frame).save(path, format="JPEG")
    with pytest.raises(ImageReadError) as caught:
        io.read_image(path)
    message = str(caught.value)
    assert "1_1.tif" in message
    assert "JPEG" in message
    assert "rename it to 1_1.jpg" in message


def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "noise.png"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ImageReadError) as caught:
        io.read_image(path)
    assert "noise.png" in str(caught.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="not found") as caught:
        io.read_image(tmp_path / "nowhere.tif")
    assert "nowhere.tif" in str(caught.value)
    with pytest.raises(ImageReadError, match="nowhere_mask.tif"):
        io.read_mask(tmp_path / "nowhere_mask.tif")


def test_multipage_tiff(tmp_path: Path) -> None:
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, np.zeros((3, 20, 30), dtype=np.uint8), photometric="minisblack")
    with tifffile.TiffFile(path) as tif:
        assert len(tif.pages) == 3
    with pytest.raises(ImageReadError, match="frames") as caught:
        io.read_image(path)
    assert "stack.tif" in str(caught.value)
    with pytest.raises(ImageReadError, match="frames"):
        io.read_mask(path)


def test_planar_rgb_tiff_is_one_frame(tmp_path: Path) -> None:
    # One RGB frame stored with separate colour planes (what tifffile.imwrite makes of a (3, H, W)
    # uint8 array by default): a single frame that reads as its luma, not a "several frames" error.
    planes = np.zeros((3, 20, 30), dtype=np.uint8)
    planes[:, 5:10, 5:10] = 200
    path = tmp_path / "planar.tif"
    tifffile.imwrite(path, planes, photometric="rgb", planarconfig="separate")
    with tifffile.TiffFile(path) as tif:
        assert len(tif.pages) == 1
    image = io.read_image(path)
    assert image.shape == (20, 30)
    np.testing.assert_array_equal(image, np.where(planes[0] == 200, 200, 0))


def test_read_image_big_endian_16bit_tiff(tmp_path: Path) -> None:
    path = tmp_path / "motorola.tif"
    tifffile.imwrite(path, np.array([[0, 1000], [32768, 65535]], dtype=np.uint16), byteorder=">")
    assert path.read_bytes()[:4] == b"MM\x00*"
    np.testing.assert_allclose(io.read_image(path, window="none"), [[0, 1000 / 65535], [32768 / 65535, 1]], atol=1e-6)


# --------------------------------------------------------------------------- image_size


@pytest.mark.parametrize(
    "relative",
    [
        "kaggle-uns/train/1_1.tif",
        "uns-mini/test/1.tif",
        "usgra-seg/images/0040.png",
        "usgra-seg/images/0043.png",
        "montgomery-cxr/images/MCUCXR_0001_0.png",
    ],
)
def test_image_size_matches_decoded_shape(shared_data: Path, relative: str) -> None:
    path = shared_data / relative
    assert io.image_size(path) == io.read_image(path).shape


def test_image_size_planar_rgb_tiff(tmp_path: Path) -> None:
    # (height, width) of a one-frame RGB TIFF with separate colour planes, not (planes, height).
    path = tmp_path / "planar.tif"
    tifffile.imwrite(path, np.zeros((3, 20, 30), dtype=np.uint8), photometric="rgb", planarconfig="separate")
    assert io.image_size(path) == (20, 30)


def test_image_size_errors_name_file(tmp_path: Path, shared_data: Path) -> None:
    data = _frame_bytes(shared_data)
    path = tmp_path / "cut_header.tif"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="cut_header.tif"):
        io.image_size(path)
    with pytest.raises(ImageReadError, match="nothing.png"):
        io.image_size(tmp_path / "nothing.png")


# --------------------------------------------------------------------------- read_csv


def test_read_csv_real_table(shared_data: Path) -> None:
    table = io.read_csv(shared_data / "uns-mini" / "train_masks.csv", ("subject", "img", "pixels"))
    assert len(table) == 253
    assert table["pixels"].map(type).eq(str).all()
    assert (table["pixels"] == "").sum() == 89  # empty masks are empty strings, not NaN


def test_read_csv_missing_column(tmp_path: Path) -> None:
    path = tmp_path / "masks_table.csv"
    path.write_text("subject,img\n1,1\n", encoding="utf-8")
    with pytest.raises(DataError) as caught:
        io.read_csv(path, ("subject", "img", "pixels"))
    message = str(caught.value)
    assert "masks_table.csv" in message
    assert "missing column(s) pixels" in message


def test_read_csv_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin.csv"
    path.write_bytes(b"img,pixels\ncaf\xe9,\n")
    with pytest.raises(DataError, match="UTF-8") as caught:
        io.read_csv(path, ("img", "pixels"))
    assert "latin.csv" in str(caught.value)


def test_read_csv_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "nothing.csv"
    path.write_bytes(b"")
    with pytest.raises(DataError, match="empty") as caught:
        io.read_csv(path, ("img", "pixels"))
    assert "nothing.csv" in str(caught.value)


def test_read_csv_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="absent.csv"):
        io.read_csv(tmp_path / "absent.csv", ("img",))


def test_read_csv_empty_cells_and_text(tmp_path: Path) -> None:
    path = tmp_path / "cells.csv"
    path.write_text(" img ,pixels\n007,\nNA,1 2\n3,\n", encoding="utf-8")
    table = io.read_csv(path, ("img", "pixels"))
    assert list(table.columns) == ["img", "pixels"]  # header stripped
    assert table["img"].tolist() == ["007", "NA", "3"]  # text kept as text, "NA" not a missing value
    assert table["pixels"].tolist() == ["", "1 2", ""]
    assert not table.isna().any().any()


def test_is_image_file() -> None:
    assert io.is_image_file(Path("a/1_1.TIF"))
    assert io.is_image_file(Path("x.jpeg"))
    assert not io.is_image_file(Path("notes.txt"))
    assert not io.is_image_file(Path("train_masks.csv"))


def test_copy_of_real_frame_reads_like_original(tmp_path: Path, shared_data: Path) -> None:
    source = shared_data / "uns-mini" / "train" / "1_1.tif"
    copy = tmp_path / "frame.TIFF"
    shutil.copyfile(source, copy)
    np.testing.assert_array_equal(io.read_image(copy), io.read_image(source))
