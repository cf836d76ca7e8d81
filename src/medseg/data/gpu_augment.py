"""Batch augmentation on the device: the recipe's augmentations applied to whole batches with torch ops.

This is the GPU backend of :mod:`medseg.data.transforms`. It reads the same :class:`~medseg.config.AugmentConfig`
and applies the same steps in the same order, each decided per sample with its own probability::

    resize -> elastic -> Gaussian blur -> horizontal flip -> brightness/contrast -> coarse dropout

Geometric steps (elastic, flip) move image and mask together, the mask with nearest-neighbour sampling;
pixel steps (blur, brightness/contrast, dropout) change the image only. Every step is a few batched
tensor operations (``grid_sample``, matrix products, grouped ``conv2d``): the number of kernel launches
does not grow with the batch, and nothing waits for the device. Every sample's random numbers are drawn
whether or not its step fires (the choice is applied with ``torch.where``), so no data-dependent shape
forces a host-device synchronisation. Random numbers come from a ``torch.Generator`` owned by the module
and created on the batch's device: equal seeds give equal batches on one kind of device (CPU and CUDA
generators draw different streams).

Parameters mean what they mean in Albumentations 2.0.8 (see each step). Differences from the CPU
backend, on purpose:

- images stay ``float32`` between steps, where the CPU backend rounds to ``uint8`` after each one;
- shrinking resizes with antialiased bilinear filtering instead of OpenCV's ``INTER_AREA`` (about 0.7 gray
  levels apart on average for 420x580 -> 128x160; enlarging is bilinear in both, within one gray level);
- ``coarse_dropout.max_size`` is always a fraction of the side; Albumentations reads a range whose upper
  end is 1 or more as pixels, so the CPU backend's ``max_size=1.0`` drops holes of 0 or 1 pixel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from medseg.config import BlurConfig, BrightnessContrastConfig, Config, DropoutConfig, ElasticConfig, FlipConfig


class BatchAugment(torch.nn.Module):
    """The recipe's training augmentations for a batch of frames and masks, on the batch's device.

    Args:
        config: Run configuration; reads ``input`` (network size) and ``augment``.
        seed: Start of the module's random stream; ``None`` draws one from torch's global generator
            (so that ``lightning.seed_everything`` makes runs reproducible). Give each DDP rank its own.
    """

    def __init__(self, config: Config, seed: int | None = None) -> None:
        super().__init__()
        augment = config.augment
        self.height, self.width = config.input.height, config.input.width
        self.elastic: ElasticConfig = augment.elastic
        self.blur: BlurConfig = augment.blur
        self.hflip: FlipConfig = augment.hflip
        self.brightness_contrast: BrightnessContrastConfig = augment.brightness_contrast
        self.coarse_dropout: DropoutConfig = augment.coarse_dropout
        self.manual_seed(int(torch.randint(0, 2**62, (1,)).item()) if seed is None else seed)

    def manual_seed(self, seed: int) -> None:
        """Restart the random stream on every device from ``seed``.

        Args:
            seed: Start of the stream.
        """
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def forward(self, images: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
        """Resize a batch to the network size and augment it.

        Args:
            images: Gray frames, ``uint8`` or ``float32`` in [0, 1] (windowed deeper frames), on any device; all of one
                size, which may differ from the network's.
            masks: Their masks, ``{0, 1}`` (any non-zero value counts as foreground), one channel per structure;
                every channel moves with its frame.

        Returns:
            The images as ``float32`` in [0, 1] and the masks as ``float32`` in {0, 1}, on the input's device.

        Raises:
            ValueError: If the shapes or the image type are not as below.

        Shape:
            - images: (N, 1, H, W).
            - masks: (N, C, H, W).
            - Returns: (N, 1, height, width) and (N, C, height, width) at ``config.input``'s size.
        """
        _check_batch(images, masks)
        with torch.no_grad():
            generator = self._generator(images.device)
            image, mask = resize_batch(images, masks, self.height, self.width)
            if self.elastic.p > 0:
                image, mask = _elastic(image, mask, self.elastic, generator)
            if self.blur.p > 0:
                image = _gaussian_blur(image, self.blur, generator)
            if self.hflip.p > 0:
                image, mask = _hflip(image, mask, self.hflip.p, generator)
            if self.brightness_contrast.p > 0:
                image = _brightness_contrast(image, self.brightness_contrast, generator)
            if self.coarse_dropout.p > 0:
                image = _coarse_dropout(image, self.coarse_dropout, generator)
        return image, mask

    def _generator(self, device: torch.device) -> torch.Generator:
        """The module's generator on ``device``, created from the seed on first use."""
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]


def resize_batch(images: Tensor, masks: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """Resize a batch to the network size: images bilinear (antialiased when shrinking), masks nearest.

    A batch already of that size is only converted. This is also the validation pipeline of the GPU backend.

    Args:
        images: Gray frames, ``uint8`` (scaled to [0, 1]) or floating point in [0, 1].
        masks: Their masks; any non-zero value counts as foreground.
        height: Output height.
        width: Output width.

    Returns:
        The images as ``float32`` in [0, 1] and the masks as ``float32`` in {0, 1}.

    Shape:
        - images: (N, 1, H, W).
        - masks: (N, 1, H, W).
        - Returns: (N, 1, height, width) for both.
    """
    image = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    mask = (masks != 0).float()
    if image.shape[-2:] == (height, width):
        return image, mask
    shrinking = height < image.shape[-2] or width < image.shape[-1]
    image = F.interpolate(image, size=(height, width), mode="bilinear", align_corners=False, antialias=shrinking)
    mask = F.interpolate(mask, size=(height, width), mode="nearest")
    return image.clamp_(0.0, 1.0), mask


def _check_batch(images: Tensor, masks: Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 1 or images.dtype not in (torch.uint8, torch.float32):
        raise ValueError(
            f"expected uint8 or float32 gray images of shape (N, 1, H, W), got shape {tuple(images.shape)} and dtype {images.dtype}"
        )
    if masks.ndim != 4 or masks.shape[0] != images.shape[0] or masks.shape[2:] != images.shape[2:]:
        raise ValueError(f"masks of shape {tuple(masks.shape)} do not match their images of shape {tuple(images.shape)}")


def _chosen(p: float, n: int, generator: torch.Generator) -> Tensor:
    """Which of ``n`` samples a step with probability ``p`` applies to, as a (N, 1, 1, 1) bool tensor."""
    return (torch.rand(n, generator=generator, device=generator.device) < p).view(n, 1, 1, 1)


def _uniform(low: float, high: float, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """Uniform numbers in [low, high)."""
    return low + (high - low) * torch.rand(shape, generator=generator, device=generator.device)


def _elastic(image: Tensor, mask: Tensor, config: ElasticConfig, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``ElasticTransform``: warp chosen samples by a smoothed random field (image bilinear, mask nearest, zeros outside)."""
    n, _, height, width = image.shape
    chosen = _chosen(config.p, n, generator)
    displacement = _elastic_displacement(n, height, width, config.alpha, config.sigma, generator)
    grid = _sampling_grid(displacement)
    warped_image = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    warped_mask = F.grid_sample(mask, grid, mode="nearest", padding_mode="zeros", align_corners=True)
    return torch.where(chosen, warped_image, image), torch.where(chosen, warped_mask, mask)


def _elastic_displacement(n: int, height: int, width: int, alpha: float, sigma: float, generator: torch.Generator) -> Tensor:
    """Random displacement fields in pixels, one pair per sample (see :func:`displacement_from_noise`).

    Shape:
        Returns: (N, 2, height, width).
    """
    noise = torch.randn((n, 2, height, width), generator=generator, device=generator.device)
    return displacement_from_noise(noise, alpha, sigma)


def displacement_from_noise(noise: Tensor, alpha: float, sigma: float) -> Tensor:
    """Turn noise into elastic displacement fields exactly as Albumentations 2.0.8's ``generate_displacement_fields``.

    Each sample's noise is divided by its largest magnitude over both fields, smoothed by OpenCV's automatic
    Gaussian for float data (``8 * sigma + 1`` taps, replicated borders) and scaled by ``alpha``, so
    displacements are in pixels. Like Albumentations, the x and y fields are smoothed as one image stacked
    along y, so the bottom rows of the x field and the top rows of the y field blend into each other.
    Separable smoothing is two products with band matrices: faster than a depthwise convolution with such
    wide kernels, on CPUs and GPUs alike.

    Args:
        noise: Standard normal noise for the x (channel 0) and y (channel 1) displacements.
        alpha: Scale of the displacements, in pixels.
        sigma: Standard deviation of the smoothing Gaussian, in pixels.

    Returns:
        The displacements in pixels: ``x + field[0]``, ``y + field[1]`` is where each output pixel samples from.

    Shape:
        - noise: (N, 2, H, W).
        - Returns: (N, 2, H, W).
    """
    n, _, height, width = noise.shape
    noise = noise / noise.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    taps = _gaussian_taps(sigma, round(sigma * 8 + 1) | 1, noise.device)
    stacked = noise.reshape(n, 2 * height, width)
    smooth = _replicate_band_matrix(2 * height, taps) @ stacked @ _replicate_band_matrix(width, taps).T
    return smooth.view(n, 2, height, width) * alpha


def _gaussian_taps(sigma: float, size: int, device: torch.device) -> Tensor:
    """A normalised 1-D Gaussian of ``size`` (odd) taps centred on the middle one."""
    offsets = torch.arange(size, device=device, dtype=torch.float64) - size // 2
    taps = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return (taps / taps.sum()).float()


def _replicate_band_matrix(length: int, taps: Tensor) -> Tensor:
    """The (length, length) matrix that filters a line with ``taps`` and replicated borders (``out = M @ line``)."""
    radius = taps.numel() // 2
    positions = torch.arange(length, device=taps.device)
    source = (positions[:, None] + torch.arange(-radius, radius + 1, device=taps.device)[None, :]).clamp(0, length - 1)
    matrix = torch.zeros(length, length, device=taps.device)
    return matrix.scatter_add_(1, source, taps.expand(length, -1).contiguous())


def _sampling_grid(displacement: Tensor) -> Tensor:
    """``grid_sample`` coordinates (``align_corners=True``) of pixel positions plus their displacement.

    Shape:
        - displacement: (N, 2, H, W) in pixels.
        - Returns: (N, H, W, 2) in [-1, 1] inside the frame.
    """
    _, _, height, width = displacement.shape
    xs = torch.arange(width, device=displacement.device, dtype=displacement.dtype)
    ys = torch.arange(height, device=displacement.device, dtype=displacement.dtype)
    grid_x = (xs + displacement[:, 0]) * (2.0 / (width - 1)) - 1.0
    grid_y = (ys[:, None] + displacement[:, 1]) * (2.0 / (height - 1)) - 1.0
    return torch.stack((grid_x, grid_y), dim=-1)


def _gaussian_blur(image: Tensor, config: BlurConfig, generator: torch.Generator) -> Tensor:
    """``GaussianBlur``: chosen samples blurred with their own sigma, drawn uniformly in [sigma_min, sigma_max].

    Each kernel has ``int(3.5 * sigma) * 2 + 1`` taps (Albumentations' and PIL's rule) and reflected
    borders (OpenCV's default); all kernels share the widest support, zero beyond their own size, so the
    batch is one grouped convolution per direction.
    """
    n = image.shape[0]
    chosen = _chosen(config.p, n, generator)
    sigmas = _uniform(config.sigma_min, config.sigma_max, (n, 1), generator)
    radius = int(config.sigma_max * 3.5)
    offsets = torch.arange(-radius, radius + 1, device=image.device, dtype=image.dtype)[None, :]
    inside = offsets.abs() <= torch.floor(sigmas * 3.5)
    taps = torch.exp(-0.5 * (offsets / sigmas) ** 2) * inside
    taps = taps / taps.sum(dim=1, keepdim=True)
    blurred = _separable_filter(image, taps)
    return torch.where(chosen, blurred.clamp_(0.0, 1.0), image)


def _separable_filter(image: Tensor, taps: Tensor) -> Tensor:
    """Filter each sample with its own separable kernel (rows, then columns), reflected (101) borders.

    Shape:
        - image: (N, 1, H, W).
        - taps: (N, K), K odd.
        - Returns: (N, 1, H, W).
    """
    n, _, height, width = image.shape
    size = taps.shape[1]
    radius = size // 2
    mode = "reflect" if radius < min(height, width) else "replicate"
    lines = F.pad(image.view(1, n, height, width), (radius, radius, radius, radius), mode=mode)
    lines = F.conv2d(lines, taps.view(n, 1, 1, size), groups=n)
    lines = F.conv2d(lines, taps.view(n, 1, size, 1), groups=n)
    return lines.view(n, 1, height, width)


def _hflip(image: Tensor, mask: Tensor, p: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``HorizontalFlip`` of chosen samples, image and mask together."""
    chosen = _chosen(p, image.shape[0], generator)
    return torch.where(chosen, image.flip(-1), image), torch.where(chosen, mask.flip(-1), mask)


def _brightness_contrast(image: Tensor, config: BrightnessContrastConfig, generator: torch.Generator) -> Tensor:
    """``RandomBrightnessContrast(brightness_by_max=True)`` on [0, 1] data: ``clip(alpha * x + beta, 0, 1)``.

    Albumentations 2.0.8 draws ``alpha = 1 + U(-contrast, contrast)`` and ``beta = U(-brightness,
    brightness) * max_value`` and maps ``x -> x * alpha + beta`` (no centring on the mean, whatever its
    docstring's formula says); on [0, 1] data ``max_value`` is 1.
    """
    n = image.shape[0]
    chosen = _chosen(config.p, n, generator)
    alpha = 1.0 + _uniform(-config.contrast, config.contrast, (n, 1, 1, 1), generator)
    beta = _uniform(-config.brightness, config.brightness, (n, 1, 1, 1), generator)
    return torch.where(chosen, (image * alpha + beta).clamp_(0.0, 1.0), image)


def _coarse_dropout(image: Tensor, config: DropoutConfig, generator: torch.Generator) -> Tensor:
    """``CoarseDropout``: 1 to ``max_holes`` rectangles of chosen samples set to 0.

    As Albumentations draws them: the number of holes uniformly in 1..max_holes, each side
    ``int(side * U(max_size / 4, max_size))`` pixels, each top-left corner uniformly where the hole fits.
    """
    n, _, height, width = image.shape
    holes = config.max_holes
    chosen = _chosen(config.p, n, generator).view(n, 1)
    count = torch.randint(1, holes + 1, (n, 1), generator=generator, device=image.device)
    active = chosen & (torch.arange(holes, device=image.device)[None, :] < count)
    rows = _hole_spans(height, config.max_size, (n, holes), generator)
    cols = _hole_spans(width, config.max_size, (n, holes), generator)
    dropped = torch.zeros(n, height, width, dtype=torch.bool, device=image.device)
    for hole in range(holes):
        dropped |= active[:, hole, None, None] & rows[:, hole, :, None] & cols[:, hole, None, :]
    return image.masked_fill(dropped[:, None], 0.0)


def _hole_spans(length: int, max_size: float, shape: tuple[int, int], generator: torch.Generator) -> Tensor:
    """Which pixels along one side each hole covers.

    Shape:
        Returns: (*shape, length), bool.
    """
    sizes = torch.floor(length * _uniform(max_size / 4, max_size, shape, generator))
    starts = torch.floor(torch.rand(shape, generator=generator, device=generator.device) * (length - sizes + 1))
    positions = torch.arange(length, device=generator.device)
    return (positions >= starts[..., None]) & (positions < (starts + sizes)[..., None])
