"""Tests of the model factory: architectures, dropout, name checks and every encoder-weights option."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from medseg.config import ModelConfig
from medseg.errors import UsageError
from medseg.learn import models
from medseg.learn.models import ARCHITECTURES, create_model, split_outputs
from medseg.runs import EncoderWeights

FAST_S = 10.0
RESNET18_REVISION = smp.encoders.encoders["resnet18"]["pretrained_settings"]["imagenet"]["revision"]


def config(**changes: object) -> ModelConfig:
    """A small model configuration: resnet18, random initialisation, unless changed."""
    return ModelConfig(**{"encoder": "resnet18", "encoder_weights": "none", "presence_head": False, **changes})


def batch(n: int = 2) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(n, 1, 64, 96)


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty Hugging Face cache of this test, the default endpoint and online mode; returns the cache."""
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    return cache


@pytest.fixture
def offline(hub: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub


@pytest.fixture
def silent_endpoint(monkeypatch: pytest.MonkeyPatch, hub: Path) -> Iterator[None]:
    """An endpoint that accepts connections and never answers (a firewall that swallows requests)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    yield
    server.close()


@pytest.fixture
def refusing_endpoint(monkeypatch: pytest.MonkeyPatch, hub: Path) -> None:
    """An endpoint where nothing listens: connections are refused."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")


def first_conv(model: nn.Module) -> torch.Tensor:
    return next(m.weight for m in model.encoder.modules() if isinstance(m, nn.Conv2d))


def assert_encoders_equal(left: nn.Module, right: nn.Module) -> None:
    left_state, right_state = left.encoder.state_dict(), right.encoder.state_dict()
    assert left_state.keys() == right_state.keys()
    for key, value in left_state.items():
        assert torch.equal(value, right_state[key]), key


def test_registry_holds_every_smp_architecture() -> None:
    assert set(ARCHITECTURES) == {
        "Unet", "UnetPlusPlus", "FPN", "PSPNet", "DeepLabV3", "DeepLabV3Plus",
        "Linknet", "MAnet", "PAN", "UPerNet", "Segformer", "DPT",
    }  # fmt: skip
    assert all(issubclass(cls, smp.base.SegmentationModel) for cls in ARCHITECTURES.values())


@pytest.mark.parametrize("arch", ["Unet", "UnetPlusPlus", "FPN", "DeepLabV3Plus"])
def test_architecture_forward_and_backward(arch: str) -> None:
    model, weights = create_model(config(arch=arch))
    model.train()
    logits = model(batch())
    assert logits.shape == (2, 1, 64, 96)
    assert torch.isfinite(logits).all()
    logits.mean().backward()
    grad = first_conv(model).grad
    assert first_conv(model).shape[1] == 1
    assert grad is not None and grad.abs().sum() > 0
    assert weights == EncoderWeights(requested="none", used="random")


@pytest.mark.parametrize("name", ["unetplusplus", "UNETPLUSPLUS", "uNetPlusPlus"])
def test_architecture_names_are_case_insensitive(name: str) -> None:
    """Any spelling builds the very network of the registry's name, with what the configuration asks for."""
    asked = {"structures": 2, "presence_head": True, "dropout": 0.2, "presence_dropout": 0.4}
    model, _ = create_model(config(arch=name, **asked))
    reference, _ = create_model(config(arch="UnetPlusPlus", **asked))
    assert type(model) is smp.UnetPlusPlus and type(model.decoder) is type(reference.decoder)
    assert {key: value.shape for key, value in model.state_dict().items()} == {
        key: value.shape for key, value in reference.state_dict().items()
    }
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in reference.parameters())
    # the resnet18 encoder (blocks 2-2-2-2, depth 5) on one input channel
    assert model.encoder.conv1.in_channels == 1 and model.encoder.out_channels == [1, 64, 64, 128, 256, 512]
    assert [len(getattr(model.encoder, f"layer{k}")) for k in range(1, 5)] == [2, 2, 2, 2]
    dropout, head = model.segmentation_head
    assert isinstance(dropout, nn.Dropout2d) and dropout.p == 0.2 and head[0].out_channels == 2
    assert model.classification_head[2].p == 0.4 and model.classification_head[3].out_features == 2
    logits, presence = split_outputs(model.eval()(batch()))
    assert logits.shape == (2, 2, 64, 96) and presence.shape == (2, 2)


def test_dropout_sits_before_the_head_and_follows_train_eval() -> None:
    model, _ = create_model(config(dropout=0.5))
    dropout, head = model.segmentation_head
    assert isinstance(dropout, nn.Dropout2d) and dropout.p == 0.5
    assert isinstance(head, smp.base.SegmentationHead)
    x = batch()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        assert not torch.equal(model(x), model(x))


def test_zero_dropout_means_none_and_keeps_the_state_dict_keys() -> None:
    plain, _ = create_model(config(dropout=0.0))
    with_dropout, _ = create_model(config(dropout=0.3))
    assert isinstance(plain.segmentation_head[0], nn.Identity)
    assert plain.state_dict().keys() == with_dropout.state_dict().keys()
    plain.load_state_dict(with_dropout.state_dict())


def test_unknown_architecture_lists_valid_names() -> None:
    with pytest.raises(UsageError, match="unknown architecture 'Unett'") as caught:
        create_model(config(arch="Unett"))
    assert "Unet" in str(caught.value) and "DeepLabV3Plus" in str(caught.value)


def test_unknown_encoder_lists_valid_names_on_one_line() -> None:
    with pytest.raises(UsageError, match="unknown encoder 'resnet19'") as caught:
        create_model(config(encoder="resnet19"))
    message = str(caught.value)
    assert "resnet18" in message and "efficientnet-b0" in message and "tu-" in message
    assert "\n" not in message


def test_timm_universal_encoder_is_accepted() -> None:
    model, weights = create_model(config(encoder="tu-resnet18"))
    assert model(batch()).shape == (2, 1, 64, 96)
    assert weights.used == "random"


def test_architecture_that_refuses_the_encoder_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="cannot build DPT with encoder resnet18"):
        create_model(config(arch="DPT"))


def test_imagenet_offline_with_empty_cache_fails_fast(offline: Path) -> None:
    start = time.monotonic()
    with pytest.raises(UsageError) as caught:
        create_model(config(encoder_weights="imagenet"))
    assert time.monotonic() - start < FAST_S
    message = str(caught.value)
    assert "--set model.encoder_weights=none" in message
    assert "--set model.encoder_weights=/path/to/encoder.pth" in message
    assert "HF_HUB_OFFLINE" in message and "\n" not in message


def test_auto_offline_with_empty_cache_falls_back_loudly(offline: Path) -> None:
    start = time.monotonic()
    with pytest.warns(UserWarning, match="ImageNet weights for resnet18 unavailable"):
        model, weights = create_model(config(encoder_weights="auto"))
    assert time.monotonic() - start < FAST_S
    assert weights.requested == "auto" and weights.used == "random"
    assert weights.warning is not None and "random initialisation" in weights.warning
    assert model(batch()).shape == (2, 1, 64, 96)


@pytest.mark.parametrize("endpoint", ["refusing_endpoint", "silent_endpoint"])
def test_network_attempts_fail_fast(endpoint: str, request: pytest.FixtureRequest) -> None:
    request.getfixturevalue(endpoint)
    start = time.monotonic()
    with pytest.raises(UsageError, match="model.encoder_weights=none"):
        create_model(config(encoder_weights="imagenet"))
    assert time.monotonic() - start < FAST_S
    start = time.monotonic()
    with pytest.warns(UserWarning):
        _, weights = create_model(config(encoder_weights="auto"))
    assert time.monotonic() - start < FAST_S
    assert weights.used == "random" and weights.warning


def test_a_hanging_hub_call_is_cut_off(hub: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    monkeypatch.setattr(models, "get_hf_file_metadata", lambda *args, **kwargs: release.wait(60))
    start = time.monotonic()
    try:
        with pytest.raises(UsageError, match="no answer within"):
            create_model(config(encoder_weights="imagenet"))
    finally:
        release.set()
    assert time.monotonic() - start < models.PROBE_TIMEOUT_S + 3


def test_imagenet_from_the_cache_offline(offline: Path) -> None:
    rgb = smp.encoders.get_encoder("resnet18", in_channels=3, weights=None).state_dict()
    snapshot = offline / "models--smp-hub--resnet18.imagenet" / "snapshots" / RESNET18_REVISION
    snapshot.mkdir(parents=True)
    save_file(rgb, snapshot / "model.safetensors")
    model, weights = create_model(config(encoder_weights="imagenet"))
    assert weights == EncoderWeights(requested="imagenet", used="imagenet")
    assert torch.allclose(model.encoder.conv1.weight, rgb["conv1.weight"].sum(1, keepdim=True))
    assert torch.equal(model.encoder.layer4[1].conv2.weight, rgb["layer4.1.conv2.weight"])


def test_timm_imagenet_from_the_cache_offline(offline: Path) -> None:
    rgb = timm.create_model("resnet18", pretrained=False).state_dict()
    repo = offline / "models--timm--resnet18.a1_in1k"
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    save_file(rgb, repo / "snapshots" / ("0" * 40) / "model.safetensors")
    model, weights = create_model(config(encoder="tu-resnet18", encoder_weights="imagenet"))
    assert weights.used == "imagenet"
    assert torch.allclose(model.encoder.model.conv1.weight, rgb["conv1.weight"].sum(1, keepdim=True))


def test_encoder_weights_file_round_trip(tmp_path: Path) -> None:
    source, _ = create_model(config())
    path = tmp_path / "encoder.pth"
    torch.save(source.encoder.state_dict(), path)
    model, weights = create_model(config(arch="FPN", encoder_weights=str(path)))
    assert weights == EncoderWeights(requested=str(path), used=f"file:{path}")
    assert_encoders_equal(model, source)


def test_whole_model_weights_file(tmp_path: Path) -> None:
    source, _ = create_model(config())
    path = tmp_path / "model.pt"
    torch.save(source.state_dict(), path)
    model, _ = create_model(config(encoder_weights=str(path)))
    assert_encoders_equal(model, source)


def test_lightning_checkpoint_as_weights_file(tmp_path: Path) -> None:
    source, _ = create_model(config())
    path = tmp_path / "last.ckpt"
    state = {f"model.{key}": value for key, value in source.state_dict().items()}
    torch.save({"epoch": 3, "state_dict": state, "hyper_parameters": {"config": {"model": {}}}}, path)
    model, weights = create_model(config(encoder_weights=str(path)))
    assert weights.used == f"file:{path}"
    assert_encoders_equal(model, source)


def test_rgb_encoder_weights_file_is_reduced_to_one_channel(tmp_path: Path) -> None:
    rgb = smp.encoders.get_encoder("resnet18", in_channels=3, weights=None).state_dict()
    path = tmp_path / "resnet18_rgb.pth"
    torch.save(rgb, path)
    model, _ = create_model(config(encoder_weights=str(path)))
    assert torch.allclose(model.encoder.conv1.weight, rgb["conv1.weight"].sum(1, keepdim=True))


def test_corrupt_weights_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.pth"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(UsageError, match="cannot read encoder weights") as caught:
        create_model(config(encoder_weights=str(path)))
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_weights_of_another_encoder_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "resnet34.pth"
    torch.save(create_model(config(encoder="resnet34"))[0].encoder.state_dict(), path)
    with pytest.raises(UsageError, match="do not fit encoder resnet18") as caught:
        create_model(config(encoder_weights=str(path)))
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("value", ["/no/such/encoder.pth", "imagenett"])
def test_unknown_weights_option_names_it_and_the_options(value: str) -> None:
    with pytest.raises(UsageError) as caught:
        create_model(config(encoder_weights=value))
    message = str(caught.value)
    assert value in message and "auto, imagenet, none" in message
