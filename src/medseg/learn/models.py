"""Model factory: an smp architecture and encoder, one input channel, one logit per pixel.

:func:`create_model` builds any ``segmentation_models_pytorch`` architecture of :data:`ARCHITECTURES`
with any smp encoder (or ``tu-<timm model>``), ``in_channels=1``, one class per structure and no activation, and
puts a dropout module in front of the segmentation head (smp has no ``decoder_dropout``): the head is
``nn.Sequential(dropout, smp_head)``, so its state-dict keys are ``segmentation_head.1.*`` whatever the
dropout rate (``nn.Identity`` stands in for a rate of 0).

Encoder weights (``model.encoder_weights``):

- ``none``: random initialisation.
- ``imagenet``: the encoder's ImageNet weights, from the local Hugging Face cache or the Hub; when they
  cannot be had it fails within seconds with a message naming the alternatives.
- ``auto`` (default): ``imagenet`` when the weights can be had, otherwise random initialisation with a
  loud warning (a ``UserWarning`` that is also returned, so a run can record it).
- a file path: a state dict saved with ``torch.save`` (or ``.safetensors``) of the encoder or of a whole
  model; three-channel (RGB) encoder weights are reduced to one channel the way smp does it.

smp 0.6 itself downloads ``smp-hub/<encoder>.imagenet`` with ``huggingface_hub.hf_hub_download``, which,
with no network, retries for 20 s to minutes per file. medseg fetches the same file itself instead: the
cache first, nothing more when ``HF_HUB_OFFLINE`` is set, else one metadata request without retries,
bounded by :data:`PROBE_TIMEOUT_S`, before the download. ``HF_HUB_CACHE``, ``HF_HOME``, ``HF_HUB_OFFLINE``
and ``HF_ENDPOINT`` are read when the model is created (huggingface_hub reads them once, at import).
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

import segmentation_models_pytorch as smp
import timm
import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache
from huggingface_hub.errors import RemoteEntryNotFoundError
from safetensors.torch import load_file
from timm.models import get_pretrained_cfg
from torch import nn

from medseg.config import ModelConfig
from medseg.errors import UsageError
from medseg.runs import EncoderWeights

__all__ = ["ARCHITECTURES", "PROBE_TIMEOUT_S", "WEIGHT_OPTIONS", "EncoderWeights", "create_model", "split_outputs"]

ARCHITECTURES: dict[str, type[nn.Module]] = {
    cls.__name__: cls for cls in smp.MODEL_ARCHITECTURES_MAPPING.values()
}  # smp's registry, by class name
WEIGHT_OPTIONS = ("auto", "imagenet", "none")
PROBE_TIMEOUT_S = 3.0
_ALTERNATIVES = (
    "--set model.encoder_weights=none (random initialisation) or --set model.encoder_weights=/path/to/encoder.pth (a local weights file)"
)
_TIMM_FILES = ("model.safetensors", "pytorch_model.bin")
_TRUE = {"1", "ON", "YES", "TRUE"}
_MODEL_PREFIXES = ("encoder.", "model.encoder.")  # a model's state dict, and a Lightning checkpoint's


class _WeightsUnavailable(Exception):
    """Pretrained weights cannot be had; the message says why."""


def create_model(cfg: ModelConfig) -> tuple[nn.Module, EncoderWeights]:
    """Build the segmentation network a model configuration describes.

    Args:
        cfg: Architecture, encoder, encoder weights, dropout rate, presence head and number of structures.

    Returns:
        The model, which maps a ``(N, 1, H, W)`` float batch to ``(N, C, H, W)`` logits, one channel per
        structure (and, with a presence head, ``(N, C)`` presence logits: see :func:`split_outputs`), and how
        its encoder was initialised.

    Raises:
        UsageError: On an unknown architecture, encoder or weights option, an architecture that does not
            take the encoder, an unreadable or unfitting weights file, or ``imagenet`` weights that
            cannot be had.
    """
    check_model_config(cfg)
    arch = _architecture(cfg.arch)
    requested = cfg.encoder_weights
    option = requested.strip().lower()
    if option == "none":
        return _build(arch, cfg), EncoderWeights(requested=requested, used="random")
    if option in ("auto", "imagenet"):
        return _pretrained(arch, cfg, insist=option == "imagenet")
    path = _weights_path(requested)
    model = _build(arch, cfg)
    _load_encoder(model, cfg.encoder, _read_state(path), str(path))
    return model, EncoderWeights(requested=requested, used=f"file:{path}")


def check_model_config(cfg: ModelConfig) -> None:
    """The quick checks of :func:`create_model`, without building anything: the architecture, the encoder
    and, when ``encoder_weights`` names a file, that the file exists.

    Raises:
        UsageError: On an unknown architecture or encoder, or a weights file that does not exist.
    """
    _architecture(cfg.arch)
    _check_encoder(cfg.encoder)
    if cfg.encoder_weights.strip().lower() not in WEIGHT_OPTIONS:
        _weights_path(cfg.encoder_weights)


def split_outputs(outputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The pixel logits and, for a model with a presence head, the presence logits of a forward pass.

    Shape:
        outputs: (N, C, H, W), or that and (N, C). Returns: (N, C, H, W) and, for one structure (N,), for
        several (N, C), or None.
    """
    if isinstance(outputs, (tuple, list)):
        logits, presence = outputs
        return logits, presence.reshape(presence.shape[0], -1).squeeze(1)  # (N,) for one structure; traced, so ONNX keeps the batch dynamic
    return outputs, None


def _architecture(name: str) -> str:
    """The architecture's key in smp's registry (``smp.MODEL_ARCHITECTURES_MAPPING``, lower case)."""
    if name.lower() not in smp.MODEL_ARCHITECTURES_MAPPING:
        raise UsageError(f"unknown architecture {name!r} (model.arch); use one of {', '.join(ARCHITECTURES)}")
    return name.lower()


def _check_encoder(name: str) -> None:
    names = smp.encoders.get_encoder_names()
    if name in names or (name.startswith("tu-") and timm.is_model(name[3:])):
        return
    raise UsageError(
        f"unknown encoder {name!r} (model.encoder); use one of {', '.join(sorted(names))}, "
        "or tu-<timm model name> for any timm model (timm.list_models())"
    )


def _build(arch: str, cfg: ModelConfig, **weights: object) -> nn.Module:
    """Build ``arch`` with smp's ``create_model``, one input channel and one logit, and wrap its head with dropout.

    Args:
        arch: The architecture's key in smp's registry.
        cfg: The model configuration (encoder and dropout are used).
        **weights: ``encoder_weights`` and timm arguments; random initialisation when left out.

    Returns:
        The model.

    Raises:
        UsageError: If smp refuses the combination (e.g. DPT with a non-timm encoder).
    """
    options = {"encoder_weights": None, **weights}
    if cfg.presence_head:
        options["aux_params"] = {"classes": cfg.structures, "pooling": "avg", "dropout": cfg.presence_dropout or None, "activation": None}
    try:
        model = smp.create_model(arch, encoder_name=cfg.encoder, in_channels=1, classes=cfg.structures, activation=None, **options)
    except (ValueError, KeyError, TypeError) as error:
        raise UsageError(f"cannot build {cfg.arch} with encoder {cfg.encoder}: {_one_line(error)}") from error
    dropout = nn.Dropout2d(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
    model.segmentation_head = nn.Sequential(dropout, model.segmentation_head)
    return model


def _pretrained(arch: str, cfg: ModelConfig, insist: bool) -> tuple[nn.Module, EncoderWeights]:
    """Build with ImageNet encoder weights, or, unless ``insist``, with random ones and a warning."""
    try:
        weights_file = _imagenet_file(cfg.encoder)
    except _WeightsUnavailable as error:
        reason = f"ImageNet weights for {cfg.encoder} unavailable ({error})"
        if insist:
            raise UsageError(f"{reason}; use {_ALTERNATIVES}") from None
        warning = f"{reason}; training from random initialisation (to choose explicitly: {_ALTERNATIVES})"
        warnings.warn(warning, UserWarning, stacklevel=3)
        return _build(arch, cfg), EncoderWeights(requested=cfg.encoder_weights, used="random", warning=warning)
    if cfg.encoder.startswith("tu-"):
        model = _build(arch, cfg, encoder_weights=True, pretrained_cfg_overlay={"file": weights_file})
    else:
        model = _build(arch, cfg)
        _load_encoder(model, cfg.encoder, load_file(weights_file), weights_file)
    return model, EncoderWeights(requested=cfg.encoder_weights, used="imagenet")


def _imagenet_file(encoder: str) -> str:
    """The local path of the encoder's ImageNet weights, downloaded if need be.

    Raises:
        _WeightsUnavailable: If the encoder has none or they are neither cached nor downloadable.
    """
    if encoder.startswith("tu-"):
        pretrained = get_pretrained_cfg(encoder[3:], allow_unregistered=True)
        if pretrained is None or not pretrained.hf_hub_id:
            raise _WeightsUnavailable(f"timm has no pretrained weights for {encoder[3:]} on the Hugging Face Hub")
        repo_id, _, revision = pretrained.hf_hub_id.partition("@")
        files = (pretrained.hf_hub_filename,) if pretrained.hf_hub_filename else _TIMM_FILES
        return _hub_file(repo_id, files, revision or None)
    settings = smp.encoders.encoders[encoder]["pretrained_settings"].get("imagenet")
    if settings is None:
        raise _WeightsUnavailable(f"smp has no ImageNet weights for {encoder}")
    return _hub_file(settings["repo_id"], ("model.safetensors",), settings["revision"])


def _hub_file(repo_id: str, filenames: tuple[str, ...], revision: str | None) -> str:
    """The first of ``filenames`` in a Hub repository: from the cache, else from the Hub if it answers.

    Raises:
        _WeightsUnavailable: If no file is cached and the Hub is offline, unreachable or lacks them.
    """
    cache = _hub_cache_dir()
    for filename in filenames:
        cached = try_to_load_from_cache(repo_id, filename, cache_dir=cache, revision=revision)
        if isinstance(cached, str):
            return cached
    if _offline():
        raise _WeightsUnavailable(f"HF_HUB_OFFLINE is set and {repo_id} is not in the Hugging Face cache {cache}")
    endpoint = os.environ.get("HF_ENDPOINT", hub_constants.ENDPOINT).rstrip("/")
    for filename in filenames:
        error = _probe(hf_hub_url(repo_id, filename, revision=revision, endpoint=endpoint), endpoint)
        if isinstance(error, RemoteEntryNotFoundError):
            continue
        if error is not None:
            raise _WeightsUnavailable(f"cannot get {repo_id} from {endpoint}: {_one_line(error)}")
        return _download(repo_id, filename, revision, cache, endpoint)
    raise _WeightsUnavailable(f"{repo_id} has none of {', '.join(filenames)}")


def _probe(url: str, endpoint: str) -> BaseException | None:
    """Ask the Hub for a file's metadata once, without retries, within about :data:`PROBE_TIMEOUT_S`.

    The request runs in a daemon thread so that a hanging DNS lookup cannot hold the caller.

    Returns:
        None if the file is there, else the error (a timeout when there was no answer in time).
    """
    outcome: list[BaseException | None] = []

    def ask() -> None:
        try:
            get_hf_file_metadata(url, timeout=PROBE_TIMEOUT_S, endpoint=endpoint)
        except Exception as error:  # noqa: BLE001 - any failure means "not available", reported to the user
            outcome.append(error)
        else:
            outcome.append(None)

    thread = threading.Thread(target=ask, name="medseg-hub-probe", daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT_S + 1.0)
    return outcome[0] if outcome else TimeoutError(f"no answer within {PROBE_TIMEOUT_S:g} s")


def _download(repo_id: str, filename: str, revision: str | None, cache: str, endpoint: str) -> str:
    try:
        return hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache, endpoint=endpoint, etag_timeout=PROBE_TIMEOUT_S)
    except Exception as error:
        raise _WeightsUnavailable(f"download of {repo_id}/{filename} failed: {_one_line(error)}") from error


def _hub_cache_dir() -> str:
    """The Hugging Face Hub cache folder as the environment says now (huggingface_hub reads it at import)."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return os.path.expanduser(explicit)
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return hub_constants.HF_HUB_CACHE


def _offline() -> bool:
    return hub_constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in _TRUE


def _weights_path(value: str) -> Path:
    path = Path(value).expanduser()
    if path.is_file():
        return path
    raise UsageError(
        f"model.encoder_weights={value!r}: not one of {', '.join(WEIGHT_OPTIONS)} and no such file; "
        "give one of those or the path of an encoder weights file (.pth or .safetensors)"
    )


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """Read the encoder part of a weights file: an encoder's or a model's state dict, or a Lightning checkpoint.

    Raises:
        UsageError: If the file cannot be read or holds no state dict; the message names the file.
    """
    try:
        if path.suffix == ".safetensors":
            content = load_file(path)
        else:
            content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UsageError(f"{path}: cannot read encoder weights ({_one_line(error)})") from error
    if isinstance(content, dict) and isinstance(content.get("state_dict"), dict):
        content = content["state_dict"]
    if not isinstance(content, dict) or not content or not all(isinstance(v, torch.Tensor) for v in content.values()):
        raise UsageError(f"{path}: not a state dict; save one with torch.save(model.encoder.state_dict(), path)")
    for prefix in _MODEL_PREFIXES:
        part = {key[len(prefix) :]: value for key, value in content.items() if key.startswith(prefix)}
        if 0 < len(part) < len(content):
            return part
    return content


def _load_encoder(model: nn.Module, encoder_name: str, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a state dict into the model's one-channel encoder, reducing RGB weights to one channel.

    Raises:
        UsageError: If the weights do not fit the encoder; the message names ``source``.
    """
    encoder = model.encoder
    first_conv = _first_conv_key(encoder)
    if first_conv in state and state[first_conv].shape[1] == 3 and hasattr(encoder, "set_in_channels"):
        state = _one_channel(encoder_name, encoder._depth, state, source)
    _check_fits(encoder, state, encoder_name, source)
    encoder.load_state_dict(state)


def _first_conv_key(encoder: nn.Module) -> str | None:
    """The state-dict key of the encoder's input convolution (the one convolution that takes one channel)."""
    for name, module in encoder.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 1:
            return f"{name}.weight"
    return None


def _one_channel(encoder_name: str, depth: int, state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Turn RGB encoder weights into one-channel ones the way smp does for pretrained weights (sum over RGB)."""
    rgb = smp.encoders.get_encoder(encoder_name, in_channels=3, depth=depth, weights=None)
    _check_fits(rgb, state, encoder_name, source)
    rgb.load_state_dict(state)
    rgb.set_in_channels(1, pretrained=True)
    return rgb.state_dict()


def _check_fits(module: nn.Module, state: dict[str, torch.Tensor], encoder_name: str, source: str) -> None:
    expected = module.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    wrong = sorted(key for key in expected.keys() & state.keys() if expected[key].shape != state[key].shape)
    if missing or unexpected or wrong:
        example = (wrong or missing or unexpected)[0]
        raise UsageError(
            f"{source}: weights do not fit encoder {encoder_name}: {len(missing)} missing, {len(unexpected)} unexpected "
            f"and {len(wrong)} wrong-shaped tensors (e.g. {example})"
        )


def _one_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
