"""GPU batch augmentation, run on CPU tensors: sizes and types, alignment, probabilities, seeding, parity with the CPU backend."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from albumentations.augmentations.blur.functional import create_gaussian_kernel_1d
from albumentations.augmentations.geometric.functional import generate_displacement_fields

from medseg.config import Config, load_config
from medseg.data.gpu_augment import BatchAugment, displacement_from_noise, resize_batch
from medseg.data.io import read_image, read_mask
from medseg.data.transforms import apply, eval_transform, train_transform

TRAIN = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "uns-mini" / "train"
HEIGHT, WIDTH = 128, 160
AUGMENTS = ("elastic", "blur", "hflip", "brightness_contrast", "coarse_dropout")
STRONG = {
    "elastic": ("augment.elastic.alpha=1000", "augment.elastic.sigma=10"),
    "blur": ("augment.blur.sigma_min=1.0", "augment.blur.sigma_max=2.0"),
    "hflip": (),
    "brightness_contrast": ("augment.brightness_contrast.brightness=0.5", "augment.brightness_contrast.contrast=0.5"),
    "coarse_dropout": ("augment.coarse_dropout.max_size=0.3",),
}
PARITY_IDS = ("1_1", "10_1", "10_2", "10_3", "11_1", "12_2", "12_4", "13_1")
PARITY_SIZE = (64, 96)
PARITY_DRAWS = 800


def config_with(probs: dict[str, float], *extra: str, size: tuple[int, int] = (HEIGHT, WIDTH)) -> Config:
    """The cpu preset at ``size`` with the given augmentation probabilities, every other one 0."""
    overrides = [f"augment.{name}.p={probs.get(name, 0)}" for name in AUGMENTS]
    return load_config("cpu", overrides=[f"input.height={size[0]}", f"input.width={size[1]}", *overrides, *extra])


def frame(sample_id: str) -> np.ndarray:
    return read_image(TRAIN / f"{sample_id}.tif")


def as_batch(arrays: list[np.ndarray]) -> torch.Tensor:
    """Stack 2-D arrays into a (N, 1, H, W) uint8 tensor."""
    return torch.from_numpy(np.stack(arrays).astype(np.uint8)).unsqueeze(1)


def median_batch(sample_id: str, count: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``count`` copies of a frame, its mask ``frame > median`` (the threshold of its own frame) and the median."""
    image = frame(sample_id)
    level = float(np.median(image))
    return as_batch([image] * count), as_batch([image > level] * count), level


def small_batch(sample_id: str, count: int, size: tuple[int, int] = (64, 96)) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` copies of a frame already resized to ``size`` (cheap to augment) and its median mask."""
    image = cv2.resize(frame(sample_id), size[::-1], interpolation=cv2.INTER_AREA)
    return as_batch([image] * count), as_batch([image > np.median(image)] * count)


def agreement(image: torch.Tensor, mask: torch.Tensor, level: float, band: float = 10, margin: int = 8) -> float:
    """Share of pixels where ``image > level`` equals the mask, away from the borders and from the level itself.

    Args:
        image: One image in [0, 1], (H, W).
        mask: Its mask in {0, 1}, (H, W).
        level: Threshold in gray levels (0..255).
        band: Pixels within this many gray levels of the threshold are left out.
        margin: Pixels this close to the frame's border are left out.
    """
    gray = image.double() * 255
    inside = (gray - level).abs() > band
    inside[:margin] = inside[-margin:] = False
    inside[:, :margin] = inside[:, -margin:] = False
    return float(((gray > level) == (mask == 1))[inside].double().mean())


def per_sample_max_change(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs().flatten(1).amax(dim=1)


def test_output_has_network_size_types_and_ranges() -> None:
    images, masks, _ = median_batch("10_1", 4)
    augment = BatchAugment(config_with(dict.fromkeys(AUGMENTS, 1.0)), seed=0)
    for height, width in ((420, 580), (300, 200), (HEIGHT, WIDTH)):
        batch_images, batch_masks = images[..., :height, :width], masks[..., :height, :width]
        out_images, out_masks = augment(batch_images, batch_masks)
        assert out_images.shape == out_masks.shape == (4, 1, HEIGHT, WIDTH)
        assert out_images.dtype == out_masks.dtype == torch.float32
        assert out_images.device == batch_images.device
        assert 0.0 <= float(out_images.min()) and float(out_images.max()) <= 1.0
        assert set(out_masks.unique().tolist()) == {0.0, 1.0}


def test_windowed_float_frames_augment_as_their_8bit_twins() -> None:
    """Deeper frames arrive as float32 in [0, 1]: the same draws give what their uint8 twins (/ 255) give."""
    images, masks, _ = median_batch("1_1", 2)
    config = config_with(dict.fromkeys(AUGMENTS, 1.0))
    from_bytes = BatchAugment(config, seed=3)(images, masks)
    from_floats = BatchAugment(config, seed=3)(images.float() / 255.0, masks)
    torch.testing.assert_close(from_floats[0], from_bytes[0])
    torch.testing.assert_close(from_floats[1], from_bytes[1])


def test_forward_refuses_wrong_inputs() -> None:
    augment = BatchAugment(config_with({}), seed=0)
    images, masks, _ = median_batch("1_1", 2)
    with pytest.raises(ValueError, match="uint8 or float32 gray images"):
        augment(images.double(), masks)
    with pytest.raises(ValueError, match="uint8 or float32 gray images"):
        augment(images[:, 0], masks[:, 0])
    with pytest.raises(ValueError, match="do not match"):
        augment(images, masks[..., :100])


@pytest.mark.parametrize(("height", "width", "interpolation"), [(128, 160, cv2.INTER_AREA), (448, 608, cv2.INTER_LINEAR)])
def test_resize_batch_matches_per_frame_resizing(height: int, width: int, interpolation: int) -> None:
    ids = ("1_1", "10_1", "10_3")
    frames = [frame(sample_id) for sample_id in ids]
    masks = [read_mask(TRAIN / f"{sample_id}_mask.tif") for sample_id in ids]
    images, out_masks = resize_batch(as_batch(frames), as_batch(masks), height, width)
    assert images.shape == out_masks.shape == (3, 1, height, width) and images.dtype == torch.float32
    for index, (image, mask) in enumerate(zip(frames, masks)):
        alone_image, alone_mask = resize_batch(as_batch([image]), as_batch([mask]), height, width)
        torch.testing.assert_close(images[index], alone_image[0], atol=1e-6, rtol=0)
        assert torch.equal(out_masks[index], alone_mask[0])
        cpu_image, cpu_mask = apply(eval_transform(config_with({}, size=(height, width))), image, mask)
        assert cv2.resize(image, (width, height), interpolation=interpolation).tolist() == cpu_image.tolist()
        difference = (images[index, 0] - torch.from_numpy(cpu_image) / 255.0).abs()
        if interpolation == cv2.INTER_LINEAR:
            assert float(difference.max()) <= 1.0 / 255
        else:
            assert float(difference.mean()) <= 1.5 / 255, "antialiased bilinear shrinking should stay close to INTER_AREA"
        assert float((out_masks[index, 0] == torch.from_numpy(cpu_mask)).float().mean()) >= 0.999


def test_resize_batch_keeps_a_batch_of_network_size() -> None:
    images, masks, _ = median_batch("1_1", 2)
    small_images, small_masks = images[..., :HEIGHT, :WIDTH], masks[..., :HEIGHT, :WIDTH]
    out_images, out_masks = resize_batch(small_images, small_masks, HEIGHT, WIDTH)
    assert torch.equal(out_images, small_images.float() / 255)
    assert torch.equal(out_masks, small_masks.float())


@pytest.mark.parametrize("sample_id", ["1_1", "10_1"])
@pytest.mark.parametrize("step", ["elastic", "hflip"])
def test_geometric_steps_keep_mask_aligned_with_image(sample_id: str, step: str) -> None:
    images, masks, level = median_batch(sample_id, 4)
    resized_images, resized_masks = resize_batch(images, masks, HEIGHT, WIDTH)
    warped_images, warped_masks = BatchAugment(config_with({step: 1.0}, *STRONG[step]), seed=3)(images, masks)
    for index in range(4):
        aligned = agreement(warped_images[index, 0], warped_masks[index, 0], level)
        unwarped = agreement(warped_images[index, 0], resized_masks[index, 0], level)
        assert aligned >= 0.97
        assert unwarped <= aligned - 0.1, "the warp barely moved the frame, so this test could not catch a misaligned mask"
        assert agreement(resized_images[index, 0], resized_masks[index, 0], level) >= 0.97


def test_flip_mirrors_image_and_mask() -> None:
    images, masks, _ = median_batch("1_1", 3)
    resized_images, resized_masks = resize_batch(images, masks, HEIGHT, WIDTH)
    flipped_images, flipped_masks = BatchAugment(config_with({"hflip": 1.0}), seed=0)(images, masks)
    assert torch.equal(flipped_images, resized_images.flip(-1))
    assert torch.equal(flipped_masks, resized_masks.flip(-1))


@pytest.mark.parametrize("step", ["blur", "brightness_contrast", "coarse_dropout"])
def test_pixel_steps_change_image_but_never_mask(step: str) -> None:
    images, masks, _ = median_batch("10_1", 6)
    resized_images, resized_masks = resize_batch(images, masks, HEIGHT, WIDTH)
    out_images, out_masks = BatchAugment(config_with({step: 1.0}, *STRONG[step]), seed=0)(images, masks)
    assert torch.equal(out_masks, resized_masks)
    assert bool(((out_images - resized_images).abs().flatten(1).mean(dim=1) > 0.5 / 255).all())


def test_all_steps_at_zero_probability_give_the_plain_resize() -> None:
    images, masks, _ = median_batch("10_1", 4)
    strong = [item for name in AUGMENTS for item in STRONG[name]]
    out_images, out_masks = BatchAugment(config_with({}, *strong), seed=0)(images, masks)
    resized_images, resized_masks = resize_batch(images, masks, HEIGHT, WIDTH)
    torch.testing.assert_close(out_images, resized_images, atol=1e-6, rtol=0)
    assert torch.equal(out_masks, resized_masks)


@pytest.mark.parametrize("step", AUGMENTS)
def test_probability_one_changes_every_sample(step: str) -> None:
    images = as_batch([frame(sample_id) for sample_id in PARITY_IDS])
    masks = as_batch([read_mask(TRAIN / f"{sample_id}_mask.tif") for sample_id in PARITY_IDS])
    resized_images, _ = resize_batch(images, masks, HEIGHT, WIDTH)
    out_images, _ = BatchAugment(config_with({step: 1.0}), seed=0)(images, masks)
    assert bool((per_sample_max_change(out_images, resized_images) > 1e-3).all())


@pytest.mark.parametrize("step", AUGMENTS)
def test_each_sample_is_augmented_with_probability_p(step: str) -> None:
    images, masks = small_batch("10_1", 400)
    out_images, _ = BatchAugment(config_with({step: 0.3}, *STRONG[step], size=(64, 96)), seed=0)(images, masks)
    changed = per_sample_max_change(out_images, images.float() / 255) > 1e-3
    assert abs(float(changed.float().mean()) - 0.3) <= 0.08


def test_equal_seeds_give_equal_batches_and_different_seeds_differ() -> None:
    images, masks = small_batch("1_1", 6)
    config = config_with(dict.fromkeys(AUGMENTS, 0.5), size=(64, 96))
    first, second, other = BatchAugment(config, seed=7), BatchAugment(config, seed=7), BatchAugment(config, seed=8)
    first_batches = [first(images, masks) for _ in range(2)]
    for (image_a, mask_a), (image_b, mask_b) in zip(first_batches, [second(images, masks) for _ in range(2)]):
        assert torch.equal(image_a, image_b) and torch.equal(mask_a, mask_b)
    assert not torch.equal(first_batches[0][0], first_batches[1][0]), "the stream must move on between batches"
    assert not torch.equal(other(images, masks)[0], first_batches[0][0])
    first.manual_seed(7)
    assert torch.equal(first(images, masks)[0], first_batches[0][0])


@pytest.mark.parametrize(("height", "width", "alpha", "sigma"), [(128, 160, 120.0, 6.0), (64, 96, 30.0, 4.3)])
def test_elastic_displacement_is_albumentations_own(height: int, width: int, alpha: float, sigma: float) -> None:
    dx, dy = generate_displacement_fields((height, width), alpha, sigma, False, (0, 0), np.random.default_rng(5), "gaussian")
    noise = np.random.default_rng(5).standard_normal((1, 2, height, width), dtype=np.float32)
    displacement = displacement_from_noise(torch.from_numpy(noise), alpha, sigma)
    np.testing.assert_allclose(displacement[0, 0].numpy(), dx, atol=1e-4)
    np.testing.assert_allclose(displacement[0, 1].numpy(), dy, atol=1e-4)


def test_blur_with_a_fixed_sigma_is_albumentations_kernel() -> None:
    images, masks, _ = median_batch("10_1", 2)
    resized_images, _ = resize_batch(images, masks, HEIGHT, WIDTH)
    config = config_with({"blur": 1.0}, "augment.blur.sigma_min=1.2", "augment.blur.sigma_max=1.2")
    blurred, _ = BatchAugment(config, seed=0)(images, masks)
    kernel = create_gaussian_kernel_1d(1.2, 0).astype(np.float32)
    expected = cv2.sepFilter2D(resized_images[0, 0].numpy(), -1, kernel, kernel)
    np.testing.assert_allclose(blurred[0, 0].numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(blurred[1, 0].numpy(), expected, atol=1e-5)


def test_brightness_contrast_is_an_affine_map_within_the_limits() -> None:
    images, masks, _ = median_batch("10_1", 8)
    resized_images, _ = resize_batch(images, masks, HEIGHT, WIDTH)
    limit = 0.3
    limits = (f"augment.brightness_contrast.brightness={limit}", f"augment.brightness_contrast.contrast={limit}")
    config = config_with({"brightness_contrast": 1.0}, *limits)
    out_images, _ = BatchAugment(config, seed=0)(images, masks)
    for before, after in zip(resized_images.flatten(1), out_images.flatten(1)):
        unclipped = (after > 1e-4) & (after < 1 - 1e-4)
        slope, intercept = np.polyfit(before[unclipped].double().numpy(), after[unclipped].double().numpy(), 1)
        np.testing.assert_allclose(before[unclipped] * slope + intercept, after[unclipped], atol=1e-5)
        assert 1 - limit <= slope <= 1 + limit and -limit <= intercept <= limit


def test_coarse_dropout_blacks_out_a_rectangle_of_the_image_only() -> None:
    images = torch.full((16, 1, HEIGHT, WIDTH), 200, dtype=torch.uint8)
    masks = torch.ones_like(images)
    config = config_with({"coarse_dropout": 1.0}, "augment.coarse_dropout.max_size=0.3", "augment.coarse_dropout.max_holes=1")
    out_images, out_masks = BatchAugment(config, seed=0)(images, masks)
    assert bool((out_masks == 1).all())
    for image in out_images[:, 0]:
        rows, cols = torch.nonzero(image == 0, as_tuple=True)
        top, bottom, left, right = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
        assert bool((image[top:bottom, left:right] == 0).all()) and int(rows.numel()) == (bottom - top) * (right - left)
        assert int(0.3 / 4 * HEIGHT) <= bottom - top <= int(0.3 * HEIGHT)
        assert int(0.3 / 4 * WIDTH) <= right - left <= int(0.3 * WIDTH)


@pytest.fixture(scope="module")
def parity_data() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The parity frames and masks, already at the parity size, so that both backends' resizing is the identity."""
    height, width = PARITY_SIZE
    frames = [cv2.resize(frame(sample_id), (width, height), interpolation=cv2.INTER_AREA) for sample_id in PARITY_IDS]
    masks = [
        cv2.resize(read_mask(TRAIN / f"{sample_id}_mask.tif").astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)
        for sample_id in PARITY_IDS
    ]
    return frames, masks


def sample_statistics(images: np.ndarray, masks: np.ndarray, originals: np.ndarray) -> dict[str, np.ndarray]:
    """Per-sample mean and standard deviation of the pixels, mask area, and mean change from the un-augmented image."""
    return {
        "mean": images.mean(axis=(1, 2)),
        "std": images.std(axis=(1, 2)),
        "mask area": masks.mean(axis=(1, 2)),
        "change": np.abs(images - originals).mean(axis=(1, 2)),
    }


def standard_error(values: np.ndarray, groups: np.ndarray) -> float:
    """Standard error of the mean of values drawn in equal numbers from each group (frame): within-group spread only."""
    labels = np.unique(groups)
    variances = [values[groups == label].var(ddof=1) / (groups == label).sum() for label in labels]
    return float(np.sqrt(np.sum(variances)) / labels.size)


def assert_alike(name: str, gpu: np.ndarray, cpu: np.ndarray, groups: np.ndarray) -> None:
    """The two backends' sample means agree within 5% (or within 4 standard errors of their difference).

    The sample must be large enough that 4 standard errors are at most 15% of the value, so the check keeps
    its power to catch a parameter used with the wrong meaning (such as a doubled warp or a blur sigma off by 2).
    Both backends see the same frames equally often, so only the spread within a frame counts as noise.
    """
    gpu_mean, cpu_mean = float(gpu.mean()), float(cpu.mean())
    error = float(np.hypot(standard_error(gpu, groups), standard_error(cpu, groups)))
    assert 4 * error <= 0.15 * abs(cpu_mean) + 1e-4, f"{name}: too few draws for a meaningful comparison"
    assert abs(gpu_mean - cpu_mean) <= max(0.05 * abs(cpu_mean), 4 * error, 1e-4), f"{name}: GPU {gpu_mean:.5f} vs CPU {cpu_mean:.5f}"


@pytest.mark.parametrize("step", [*AUGMENTS, "default"])
def test_gpu_and_cpu_backends_are_statistically_alike(step: str, parity_data: tuple[list[np.ndarray], list[np.ndarray]]) -> None:
    frames, masks = parity_data
    if step == "default":
        config = load_config("cpu", overrides=[f"input.height={PARITY_SIZE[0]}", f"input.width={PARITY_SIZE[1]}"])
    else:
        config = config_with({step: 1.0}, size=PARITY_SIZE)
    draws = PARITY_DRAWS if step != "default" else 3 * PARITY_DRAWS  # the preset's steps are rarer: a draw changes less
    picks = np.arange(draws) % len(frames)
    originals = np.stack([frames[index] for index in picks]) / 255.0
    transform = train_transform(config, seed=0)
    cpu = [apply(transform, frames[index], masks[index]) for index in picks]
    cpu_images, cpu_masks = np.stack([image for image, _ in cpu]) / 255.0, np.stack([mask for _, mask in cpu])
    gpu_images, gpu_masks = BatchAugment(config, seed=0)(as_batch([frames[i] for i in picks]), as_batch([masks[i] for i in picks]))
    gpu_stats = sample_statistics(gpu_images[:, 0].double().numpy(), gpu_masks[:, 0].double().numpy(), originals)
    cpu_stats = sample_statistics(cpu_images, cpu_masks.astype(np.float64), originals)
    for name in gpu_stats:
        assert_alike(f"{step} {name}", gpu_stats[name], cpu_stats[name], picks)


@pytest.mark.parametrize("steps", [{"elastic": 1.0}, {"hflip": 0.5}, dict.fromkeys(AUGMENTS, 0.7)], ids=["elastic", "hflip", "all"])
def test_every_mask_channel_moves_with_its_frame(steps: dict[str, float]) -> None:
    """Several structures: each channel of a batch gets exactly the geometry a one-channel mask gets."""
    config = config_with(steps, *STRONG["elastic"], size=PARITY_SIZE)
    images, first = small_batch("1_1", 6)
    second = (images > 170).to(torch.uint8)
    _, alone = BatchAugment(config, seed=11)(images, first)
    _, other = BatchAugment(config, seed=11)(images, second)
    out_images, stacked = BatchAugment(config, seed=11)(images, torch.cat([first, second, first], dim=1))
    assert stacked.shape == (6, 3, *PARITY_SIZE) and out_images.shape == (6, 1, *PARITY_SIZE)
    torch.testing.assert_close(stacked[:, :1], alone, rtol=0, atol=0)
    torch.testing.assert_close(stacked[:, 1:2], other, rtol=0, atol=0)
    torch.testing.assert_close(stacked[:, 2:], stacked[:, :1], rtol=0, atol=0)


def test_masks_of_another_batch_size_are_refused() -> None:
    images, masks = small_batch("1_1", 2)
    with pytest.raises(ValueError, match="do not match"):
        BatchAugment(config_with({}, size=PARITY_SIZE), seed=0)(images, torch.cat([masks, masks])[:3])
