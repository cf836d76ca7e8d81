"""CPU transforms: sizes and types, image/mask alignment under warps, what each step may touch, seeding."""

from __future__ import annotations

from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytest

from medseg.config import Config, load_config
from medseg.data.io import read_image, read_mask
from medseg.data.transforms import apply, eval_transform, reseed, resize_back, train_transform

TRAIN = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "uns-mini" / "train"
HEIGHT, WIDTH = 128, 160
AUGMENTS = ("elastic", "blur", "hflip", "brightness_contrast", "coarse_dropout")
STEP_TYPES = {
    "elastic": A.ElasticTransform,
    "blur": A.GaussianBlur,
    "hflip": A.HorizontalFlip,
    "brightness_contrast": A.RandomBrightnessContrast,
    "coarse_dropout": A.CoarseDropout,
}


def config_with(probs: dict[str, float], *extra: str) -> Config:
    """The cpu preset at 128x160 (a frame shape that is not square) with the given augmentation probabilities, every other one 0."""
    overrides = [f"augment.{name}.p={probs.get(name, 0)}" for name in AUGMENTS]
    return load_config("cpu", overrides=[f"input.height={HEIGHT}", f"input.width={WIDTH}", *overrides, *extra])


def frame(sample_id: str = "1_1") -> np.ndarray:
    return read_image(TRAIN / f"{sample_id}.tif")


def median_mask(image: np.ndarray) -> np.ndarray:
    """A mask that is the threshold of its own frame: any warp must keep it equal to the warped frame's."""
    return image > np.median(image)


def agreement(image: np.ndarray, mask: np.ndarray, level: float, band: float = 10, margin: int = 8) -> float:
    """Share of pixels where ``image > level`` equals the mask, away from the borders and the level itself."""
    gray = image.astype(np.float64)
    inside = np.abs(gray - level) > band
    inside[:margin] = inside[-margin:] = False
    inside[:, :margin] = inside[:, -margin:] = False
    return float(((gray > level) == (mask == 1))[inside].mean())


def types_of(transform: A.Compose) -> list[type]:
    return [type(step) for step in transform.transforms]


def test_train_output_has_network_size_and_uint8_types() -> None:
    image = frame("10_1")
    transform = train_transform(config_with(dict.fromkeys(AUGMENTS, 1.0)), seed=0)
    for mask in (read_mask(TRAIN / "10_1_mask.tif"), read_mask(TRAIN / "10_1_mask.tif").astype(np.uint8)):
        out_image, out_mask = apply(transform, image, mask)
        assert out_image.shape == out_mask.shape == (HEIGHT, WIDTH)
        assert out_image.dtype == out_mask.dtype == np.uint8
        assert set(np.unique(out_mask)) == {0, 1}
    out_image, out_mask = apply(transform, image)
    assert out_image.shape == (HEIGHT, WIDTH) and out_image.dtype == np.uint8 and out_mask is None


@pytest.mark.parametrize(("height", "width", "interpolation"), [(128, 160, cv2.INTER_AREA), (448, 608, cv2.INTER_LINEAR)])
def test_eval_is_a_plain_deterministic_resize(height: int, width: int, interpolation: int) -> None:
    image, mask = frame("1_1"), read_mask(TRAIN / "1_1_mask.tif")
    transform = eval_transform(load_config("cpu", overrides=[f"input.height={height}", f"input.width={width}"]))
    assert types_of(transform) == [A.Resize]
    out_image, out_mask = apply(transform, image, mask)
    np.testing.assert_array_equal(out_image, cv2.resize(image, (width, height), interpolation=interpolation))
    np.testing.assert_array_equal(out_mask, cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST))
    again_image, again_mask = apply(transform, image, mask)
    np.testing.assert_array_equal(again_image, out_image)
    np.testing.assert_array_equal(again_mask, out_mask)


@pytest.mark.parametrize("sample_id", ["1_1", "10_1"])
@pytest.mark.parametrize(
    ("step", "extra"),
    [("elastic", ("augment.elastic.alpha=1000", "augment.elastic.sigma=10")), ("hflip", ())],
)
def test_geometric_steps_keep_mask_aligned_with_image(sample_id: str, step: str, extra: tuple[str, ...]) -> None:
    image = frame(sample_id)
    mask, level = median_mask(image), float(np.median(image))
    config = config_with({step: 1.0}, *extra)
    resized_image, resized_mask = apply(eval_transform(config), image, mask)
    warped_image, warped_mask = apply(train_transform(config, seed=3), image, mask)
    aligned = agreement(warped_image, warped_mask, level)
    unwarped = agreement(warped_image, resized_mask, level)
    assert aligned >= 0.97
    assert unwarped <= aligned - 0.1, "the warp barely moved the frame, so this test could not catch a misaligned mask"
    assert agreement(resized_image, resized_mask, level) >= 0.97


def test_flip_mirrors_image_and_mask() -> None:
    image = frame("1_1")
    mask = median_mask(image)
    config = config_with({"hflip": 1.0})
    resized_image, resized_mask = apply(eval_transform(config), image, mask)
    flipped_image, flipped_mask = apply(train_transform(config, seed=0), image, mask)
    np.testing.assert_array_equal(flipped_image, resized_image[:, ::-1])
    np.testing.assert_array_equal(flipped_mask, resized_mask[:, ::-1])


@pytest.mark.parametrize(
    ("step", "extra"),
    [
        ("blur", ()),
        ("brightness_contrast", ("augment.brightness_contrast.brightness=0.5", "augment.brightness_contrast.contrast=0.5")),
        ("coarse_dropout", ("augment.coarse_dropout.max_size=0.3",)),
    ],
)
def test_pixel_steps_change_image_but_never_mask(step: str, extra: tuple[str, ...]) -> None:
    image = frame("10_1")
    mask = median_mask(image)
    config = config_with({step: 1.0}, *extra)
    resized_image, resized_mask = apply(eval_transform(config), image, mask)
    transform = train_transform(config, seed=0)
    for _ in range(3):
        out_image, out_mask = apply(transform, image, mask)
        assert np.abs(out_image.astype(int) - resized_image).mean() > 0.5
        np.testing.assert_array_equal(out_mask, resized_mask)


def test_coarse_dropout_blacks_out_rectangles_of_the_image_only() -> None:
    image = frame("10_1")
    mask = np.ones_like(image, dtype=bool)
    config = config_with({"coarse_dropout": 1.0}, "augment.coarse_dropout.max_size=0.3")
    resized_image, _ = apply(eval_transform(config), image, mask)
    out_image, out_mask = apply(train_transform(config, seed=0), image, mask)
    dropped = (out_image == 0) & (resized_image > 0)
    assert dropped.sum() >= (0.3 / 4 * HEIGHT) * (0.3 / 4 * WIDTH) * 0.9
    assert out_mask.all()


def test_zero_probability_steps_are_left_out() -> None:
    recipe = train_transform(load_config("cpu", overrides=["augment.elastic.p=0.25"]))
    assert types_of(recipe) == [A.Resize, *STEP_TYPES.values()]
    assert A.ElasticTransform not in types_of(train_transform(load_config("cpu", overrides=["augment.elastic.p=0"])))
    for name in AUGMENTS:
        kept = [STEP_TYPES[other] for other in AUGMENTS if other != name]
        assert types_of(train_transform(config_with({other: 0.5 for other in AUGMENTS if other != name}))) == [A.Resize, *kept]
    assert types_of(train_transform(config_with({}))) == [A.Resize]


def test_config_values_reach_the_steps() -> None:
    config = load_config("cpu", overrides=["augment.elastic.p=0.25"])
    augment = config.augment
    elastic, blur, flip, contrast, dropout = train_transform(config).transforms[1:]
    assert (elastic.alpha, elastic.sigma, elastic.p, elastic.mask_interpolation) == (120.0, 6.0, 0.25, cv2.INTER_NEAREST)
    assert (elastic.border_mode, elastic.fill, elastic.fill_mask) == (cv2.BORDER_CONSTANT, 0, 0)
    assert tuple(blur.sigma_limit) == (augment.blur.sigma_min, augment.blur.sigma_max) and blur.p == augment.blur.p
    assert flip.p == augment.hflip.p
    assert tuple(contrast.brightness_limit) == (-0.2, 0.2) and tuple(contrast.contrast_limit) == (-0.2, 0.2)
    assert tuple(dropout.num_holes_range) == (1, augment.coarse_dropout.max_holes)
    assert tuple(dropout.hole_height_range) == tuple(dropout.hole_width_range) == (0.025, 0.1)
    assert dropout.fill == 0 and dropout.fill_mask is None


def run_many(transform: A.Compose, image: np.ndarray, mask: np.ndarray, count: int = 4) -> list[tuple[np.ndarray, np.ndarray]]:
    return [apply(transform, image, mask) for _ in range(count)]


def test_seeded_train_transform_is_reproducible() -> None:
    image = frame("1_1")
    mask = median_mask(image)
    config = config_with(dict.fromkeys(AUGMENTS, 0.5))
    first = run_many(train_transform(config, seed=7), image, mask)
    second = run_many(train_transform(config, seed=7), image, mask)
    other = run_many(train_transform(config, seed=8), image, mask)
    for (image_a, mask_a), (image_b, mask_b) in zip(first, second):
        np.testing.assert_array_equal(image_a, image_b)
        np.testing.assert_array_equal(mask_a, mask_b)
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(first, other))
    transform = train_transform(config, seed=7)
    run_many(transform, image, mask)
    reseed(transform, 7)
    np.testing.assert_array_equal(apply(transform, image, mask)[0], first[0][0])


def test_seeded_steps_choose_independently() -> None:
    """Albumentations 2.0.8 seeds each step alike; with equal p a seeded flip would fire exactly with the warp."""
    image = frame("1_1")
    mask = median_mask(image)
    config = config_with({"elastic": 0.5, "hflip": 0.5}, "augment.elastic.alpha=1000", "augment.elastic.sigma=10")
    _, resized = apply(eval_transform(config), image, mask)
    mirrored = resized[:, ::-1]
    decisions = set()
    for seed in range(24):
        _, out = apply(train_transform(config, seed=seed), image, mask)
        flipped = (out == mirrored).mean() > (out == resized).mean()
        warped = not (np.array_equal(out, resized) or np.array_equal(out, mirrored))
        decisions.add((bool(flipped), warped))
    assert len(decisions) == 4, f"flip and warp decisions are coupled: {sorted(decisions)}"


def test_resize_back_gives_original_size_and_probabilities() -> None:
    probs = np.random.default_rng(0).random((HEIGHT, WIDTH), dtype=np.float32)
    back = resize_back(probs, (420, 580))
    assert back.shape == (420, 580) and back.dtype == np.float32
    assert back.min() >= 0.0 and back.max() <= 1.0
    assert abs(float(back.mean()) - float(probs.mean())) < 0.01
    np.testing.assert_allclose(resize_back(np.full((HEIGHT, WIDTH), 0.7), (420, 580)), 0.7, atol=1e-6)
    np.testing.assert_allclose(resize_back(probs, (HEIGHT, WIDTH)), probs)


def test_apply_refuses_wrong_inputs() -> None:
    transform = eval_transform(load_config("cpu"))
    image = frame("1_1")
    with pytest.raises(ValueError, match="2-D uint8"):
        apply(transform, np.stack([image] * 3, axis=-1))
    with pytest.raises(ValueError, match="2-D uint8 or float32"):
        apply(transform, image.astype(np.float64))
    with pytest.raises(ValueError, match="does not match"):
        apply(transform, image, np.zeros((10, 10), dtype=bool))


def test_a_windowed_float_frame_resizes_as_its_8bit_twin() -> None:
    """A deeper frame, windowed to float32 in [0, 1], goes through the same pipeline without rounding to 8 bits."""
    transform = eval_transform(load_config("cpu"))
    image = frame("1_1")
    resized, _ = apply(transform, image)
    resized_float, _ = apply(transform, image.astype(np.float32) / 255.0)
    assert resized_float.dtype == np.float32
    np.testing.assert_allclose(resized_float * 255.0, resized, atol=1.0)


@pytest.mark.parametrize("steps", [{"elastic": 1.0}, {"hflip": 1.0}, dict.fromkeys(AUGMENTS, 1.0)], ids=["elastic", "hflip", "all"])
def test_every_mask_channel_moves_with_its_frame(steps: dict[str, float]) -> None:
    """Several structures: each channel gets the geometry a one-structure mask gets from the same draw."""
    config = config_with(steps)
    image = frame("1_1")
    first, second = median_mask(image), image > np.percentile(image, 80)
    single = [apply(train_transform(config, seed=3), image, mask)[1] for mask in (first, second)]
    out_image, stacked = apply(train_transform(config, seed=3), image, np.stack([first, second, first]))
    assert stacked.shape == (3, HEIGHT, WIDTH) and stacked.dtype == np.uint8
    np.testing.assert_array_equal(stacked[0], single[0])
    np.testing.assert_array_equal(stacked[1], single[1])
    np.testing.assert_array_equal(stacked[2], stacked[0])
    np.testing.assert_array_equal(out_image, apply(train_transform(config, seed=3), image, first)[0])


def test_eval_resizes_every_mask_channel() -> None:
    transform = eval_transform(config_with({}))
    image = frame("1_1")
    _, stacked = apply(transform, image, np.stack([median_mask(image), ~median_mask(image)]))
    assert stacked.shape == (2, HEIGHT, WIDTH)
    np.testing.assert_array_equal(stacked[0], apply(transform, image, median_mask(image))[1])
