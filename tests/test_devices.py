"""Where and how a run computes (:mod:`medseg.devices`), tested for the cards people train on without one here:
the precision each compute capability gets, the type predictions are made in, and one device by default."""

from __future__ import annotations

import pytest
import torch

from medseg import devices
from medseg.config import load_config
from medseg.infer import predict as predict_module
from medseg.infer.predict import TorchEnsemble, mean_sigmoid

CARDS = [
    ((5, 2), "32-true", None),  # Maxwell (GTX 980, M40): neither fast fp16 nor bf16
    ((6, 0), "16-mixed", torch.float16),  # P100, one of Kaggle's free cards
    ((6, 1), "32-true", None),  # GTX 1080, P40: fp16 at a fraction of fp32's speed
    ((7, 0), "16-mixed", torch.float16),  # V100
    ((7, 5), "16-mixed", torch.float16),  # T4, Kaggle's free pair: emulated bf16 would be slower than fp32
    ((8, 0), "bf16-mixed", torch.bfloat16),  # A100
    ((8, 9), "bf16-mixed", torch.bfloat16),  # L4
    ((9, 0), "bf16-mixed", torch.bfloat16),  # H100, H200
]


@pytest.fixture
def on_card(monkeypatch):
    """Make the run see one CUDA card of the given compute capability (and ``count`` cards in all)."""

    def make(capability: tuple[int, int], count: int = 1) -> None:
        monkeypatch.setattr(devices, "uses_cuda", lambda config: config.trainer.accelerator != "cpu")
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)

    return make


@pytest.mark.parametrize(("capability", "expected", "dtype"), CARDS)
def test_each_card_trains_in_the_precision_it_has_in_hardware(capability, expected, dtype, on_card):
    on_card(capability)
    config = load_config("default")
    assert devices.card_precision(capability) == expected
    assert devices.precision(config) == expected
    major, minor = capability
    assert devices.precision_reason(config).startswith(f"{expected} (auto: compute capability {major}.{minor}, ")


@pytest.mark.parametrize(("capability", "expected", "dtype"), CARDS)
def test_each_card_predicts_in_its_training_type_and_the_cpu_in_fp32(capability, expected, dtype, on_card):
    on_card(capability)
    assert devices.inference_dtype(torch.device("cuda", 0)) is dtype
    assert devices.inference_dtype(torch.device("cpu")) is None


def test_a_set_precision_is_kept_and_said_so(on_card):
    on_card((7, 5))
    config = load_config("default", overrides=["trainer.precision=32-true"])
    assert devices.precision(config) == "32-true"
    assert devices.precision_reason(config) == "32-true (trainer.precision)"
    assert "fp16 with loss scaling" in devices.precision_reason(load_config("default"))


def test_the_cpu_reason_names_native_bf16(monkeypatch):
    config = load_config("cpu")
    for native, words in ((True, "bf16-mixed (auto: native bf16 on this CPU)"), (False, "32-true (auto: no native bf16 on this CPU)")):
        monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda native=native: native)
        assert devices.precision_reason(config) == words


def test_the_sigmoid_is_taken_in_fp32_not_in_the_half_type():
    logits = torch.tensor([[[[0.01, -3.3, 7.9]]]], dtype=torch.bfloat16)
    probs, presence = mean_sigmoid([logits, (logits, torch.tensor([[0.02]], dtype=torch.float16))])
    assert presence is None  # one model without a presence head: none for the ensemble
    expected = torch.sigmoid(logits.float())
    assert probs.dtype == torch.float32 and torch.equal(probs, expected)
    assert not torch.equal(probs, torch.sigmoid(logits).float())  # in bf16 the probabilities round to about 0.004


def test_the_torch_ensemble_on_the_cpu_gives_fp32_probabilities():
    model = torch.nn.Conv2d(1, 2, 3, padding=1).eval()
    probs, presence = TorchEnsemble([model])(torch.rand(2, 1, 8, 12))
    assert probs.dtype == torch.float32 and probs.shape == (2, 2, 8, 12) and presence is None


@pytest.mark.parametrize("preset", ["default", "cpu", "kaggle"])
def test_every_preset_trains_on_one_device_unless_asked(preset):
    assert load_config(preset).trainer.devices == 1


def test_idle_cards_are_noted_with_the_flags_that_use_them(on_card):
    on_card((9, 0), count=4)
    note = devices.idle_gpus_note(load_config("kaggle"))
    assert note is not None and "4 CUDA devices here" in note and "--devices 4 --strategy ddp" in note and "4x the batch" in note
    assert devices.idle_gpus_note(load_config("kaggle", overrides=["trainer.devices=4", "trainer.strategy=ddp"])) is None
    assert devices.idle_gpus_note(load_config("cpu", overrides=["trainer.accelerator=cpu"])) is None
    on_card((9, 0), count=1)
    assert devices.idle_gpus_note(load_config("kaggle")) is None


def test_the_frames_whose_fp16_logits_overflow_are_predicted_again_in_fp32(monkeypatch):
    model = torch.nn.Conv2d(1, 1, 3, padding=1, bias=False).eval()
    torch.nn.init.constant_(model.weight, 1.0e4)  # 9e4 on ones: beyond fp16's 65,504, as a bf16-trained model's logits may be
    images = torch.stack([torch.ones(1, 6, 6), torch.full((1, 6, 6), 1.0e-4)])  # the second frame stays in fp16's range
    assert not torch.isfinite(TorchEnsemble([model])._outputs(images[:1], torch.float16)[0]).all()  # the overflow guarded against
    monkeypatch.setattr(predict_module, "inference_dtype", lambda device: torch.float16)
    ensemble = TorchEnsemble([model])
    assert ensemble.dtype == torch.float16
    probs, _ = ensemble(images)
    assert torch.equal(probs[0], torch.sigmoid(model(images[:1]))[0])
    assert torch.equal(probs[1], torch.sigmoid(ensemble._outputs(images[1:], torch.float16)[0].float())[0])  # not redone: as alone


class _WithPresence(torch.nn.Module):
    """A stand-in for a model with a presence head: logits and one presence logit per frame."""

    def __init__(self, conv: torch.nn.Module) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, images):
        logits = self.conv(images)
        return logits, logits.mean(dim=(2, 3))


def test_a_presence_heads_overflow_is_redone_with_its_frame(monkeypatch):
    conv = torch.nn.Conv2d(1, 1, 3, padding=1, bias=False).eval()
    torch.nn.init.constant_(conv.weight, 1.0e4)
    model = _WithPresence(conv).eval()
    images = torch.stack([torch.full((1, 6, 6), 1.0e-4), torch.ones(1, 6, 6)])
    monkeypatch.setattr(predict_module, "inference_dtype", lambda device: torch.float16)
    probs, presence = TorchEnsemble([model])(images)
    logits, presence_logits = model(images[1:])
    assert torch.equal(probs[1], torch.sigmoid(logits)[0]) and torch.equal(presence[1], torch.sigmoid(presence_logits)[0, 0])
    assert torch.isfinite(probs).all() and torch.isfinite(presence).all()
