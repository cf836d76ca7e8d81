"""Tests for medseg.losses."""

from __future__ import annotations

import pytest
import torch
from segmentation_models_pytorch.losses import DiceLoss, FocalLoss, LovaszLoss, TverskyLoss

from medseg.config import LossConfig
from medseg.errors import UsageError
from medseg.learn.losses import PerImageDiceLoss, create_loss

NAMES = ("dice_bce", "tversky", "lovasz", "focal")


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 1, 32, 48, generator=generator) * 3
    target = (torch.rand(2, 1, 32, 48, generator=generator) < 0.3).float()
    return logits, target


def bce_by_hand(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy on logits, in the stable form max(x, 0) - x t + log(1 + exp(-|x|))."""
    return (logits.clamp_min(0) - logits * target + torch.log1p(torch.exp(-logits.abs()))).mean()


@pytest.mark.parametrize(
    "cfg",
    [LossConfig(name=name) for name in NAMES] + [LossConfig(per_image_dice=True)],
    ids=[*NAMES, "dice_bce_per_image"],
)
def test_every_loss_is_a_finite_scalar_with_gradients(cfg: LossConfig) -> None:
    logits, target = batch()
    logits.requires_grad_(True)
    loss = create_loss(cfg)(logits, target)
    assert loss.shape == () and loss.dtype == torch.float32
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["tversky", "lovasz", "focal"])
def test_per_image_dice_with_another_loss_is_refused(name: str) -> None:
    with pytest.raises(UsageError, match="per_image_dice"):
        create_loss(LossConfig(name=name, per_image_dice=True))


def test_dice_bce_is_half_smp_dice_plus_half_bce() -> None:
    logits, target = batch(1)
    expected = 0.5 * DiceLoss(mode="binary", from_logits=True)(logits, target) + 0.5 * bce_by_hand(logits, target)
    assert create_loss(LossConfig())(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize(
    ("name", "term"),
    [
        ("tversky", TverskyLoss(mode="binary", alpha=0.3, beta=0.7)),
        ("lovasz", LovaszLoss(mode="binary", per_image=True)),
        ("focal", FocalLoss(mode="binary", gamma=2.0)),
    ],
)
def test_named_losses_are_the_smp_term_plus_weighted_bce(name: str, term: torch.nn.Module) -> None:
    logits, target = batch(2)
    cfg = LossConfig(name=name, dice_weight=0.7, bce_weight=0.2, tversky_alpha=0.3, tversky_beta=0.7)
    expected = 0.7 * term(logits, target) + 0.2 * bce_by_hand(logits, target)
    assert create_loss(cfg)(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)


def test_tversky_parameters_reach_the_loss() -> None:
    logits, target = batch(3)
    fp_heavy = create_loss(LossConfig(name="tversky", bce_weight=0, tversky_alpha=0.9, tversky_beta=0.1))
    fn_heavy = create_loss(LossConfig(name="tversky", bce_weight=0, tversky_alpha=0.1, tversky_beta=0.9))
    assert fp_heavy(logits, target).item() != pytest.approx(fn_heavy(logits, target).item(), rel=1e-3)


def test_weights_are_respected() -> None:
    logits, target = batch(4)
    smp_dice = DiceLoss(mode="binary", from_logits=True)(logits, target)
    pure_dice = create_loss(LossConfig(bce_weight=0))(logits, target)
    assert pure_dice.item() == pytest.approx(0.5 * smp_dice.item(), rel=1e-6)
    pure_bce = create_loss(LossConfig(dice_weight=0, bce_weight=1))(logits, target)
    assert pure_bce.item() == pytest.approx(bce_by_hand(logits, target).item(), rel=1e-6)
    with pytest.raises(UsageError, match="both 0"):
        create_loss(LossConfig(dice_weight=0, bce_weight=0))


def empty_and_full() -> tuple[torch.Tensor, torch.Tensor]:
    target = torch.zeros(2, 1, 16, 16)
    target[1] = 1.0
    return target, (target * 2 - 1) * 20


def test_per_image_dice_near_zero_for_perfect_predictions_including_empty_image() -> None:
    target, logits = empty_and_full()
    assert PerImageDiceLoss()(logits, target).item() == pytest.approx(0.0, abs=1e-5)
    assert create_loss(LossConfig(per_image_dice=True))(logits, target).item() == pytest.approx(0.0, abs=1e-5)


def test_per_image_dice_differs_from_batch_dice() -> None:
    target, _ = empty_and_full()
    # A few false-positive pixels on the empty image, the full image predicted perfectly.
    logits = (target * 2 - 1) * 20
    logits[0, 0, :2, :2] = 20.0
    per_image = PerImageDiceLoss()(logits, target).item()
    pooled = DiceLoss(mode="binary", from_logits=True)(logits, target).item()
    # Pooled: 4 false positives against 256 true pixels barely matter; per image, the empty image's
    # false positives cost 4 / 5 of that image's loss, close to the competition score's 0 for it.
    assert pooled == pytest.approx(4 / (2 * 256 + 4), rel=1e-3)
    assert per_image == pytest.approx((4 / 5) / 2, rel=1e-3)


def test_per_image_dice_requires_positive_smoothing() -> None:
    with pytest.raises(ValueError, match="smooth"):
        PerImageDiceLoss(smooth=0)


def test_bf16_logits_give_float32_loss() -> None:
    logits, target = batch(5)
    reference = create_loss(LossConfig())(logits.bfloat16().float(), target)
    half = logits.bfloat16().requires_grad_(True)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss = create_loss(LossConfig())(half, target)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    loss.backward()
    assert half.grad is not None and half.grad.dtype == torch.bfloat16 and torch.isfinite(half.grad.float()).all()


def test_shape_mismatch_is_an_error() -> None:
    logits, target = batch()
    with pytest.raises(ValueError, match="differ in shape"):
        create_loss(LossConfig())(logits, target[:, :, :16])
