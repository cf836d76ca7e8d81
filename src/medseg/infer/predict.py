"""Prediction: a run's fold models as an ensemble, flip test-time augmentation, probabilities at the
original frame size, and the tuned post-processing that turns them into masks.

The probability of a frame is the mean, over the run's fold models and the flips, of the sigmoid of the
logits, resized back from the network size to the frame's own size; a model with a presence head also
gives the mean sigmoid of its presence logit. A mask is the pixels at or above the threshold, emptied when
its area is below the minimum area or its presence probability is not above the presence threshold (all
from ``RUN/postprocess.json``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from medseg import progress
from medseg.config import Config
from medseg.data import transforms
from medseg.data.intensity import common_type, normalise
from medseg.devices import inference_dtype
from medseg.errors import UsageError
from medseg.learn.metrics import DEFAULT_THRESHOLD
from medseg.learn.models import create_model, split_outputs
from medseg.runs import TTA_MODES, FoldDir, Run, StructuresTuning, Tuning

TTA_PASSES = {"none": 1, "hflip": 2, "hvflip": 3}  # forward passes of each model per frame


@dataclass(frozen=True)
class PostProcess:
    """How probabilities become masks.

    Attributes:
        threshold: A pixel is foreground when its probability is at least this.
        min_area: A mask with fewer foreground pixels (at the original size) becomes empty.
        presence_threshold: With a presence head, a mask becomes empty unless the frame's presence
            probability is above this; 0 switches the presence decision off (1 empties every mask).
        tuned: Whether the values come from ``medseg tune`` (else the defaults).
    """

    threshold: float = DEFAULT_THRESHOLD
    min_area: int = 0
    presence_threshold: float = 0.0
    tuned: bool = False

    def apply(self, probs: np.ndarray, presence: float = math.nan) -> np.ndarray:
        """The mask of one probability map, given the frame's presence probability (``nan``: no head)."""
        mask = probs >= self.threshold
        if (self.min_area and np.count_nonzero(mask) < self.min_area) or self.absent(presence):
            mask[:] = False
        return mask

    def absent(self, presence: float) -> bool:
        """Whether the presence decision empties a frame with this presence probability."""
        return self.presence_threshold > 0 and not math.isnan(presence) and presence <= self.presence_threshold


@dataclass(frozen=True)
class Prediction:
    """The ensemble's output for one frame: one probability map and one presence probability per structure (a run of
    one structure has one of each).

    Attributes:
        probs: Probability maps at the frame's size, in [0, 1] (``float32`` from a model; ``float64`` for held-out
            frames, which are always quantised as kept predictions are, :mod:`medseg.infer.kept`).
        presence: Presence probabilities, ``nan`` for models without a presence head.

    Shape:
        probs: (C, H, W). presence: (C,).
    """

    probs: np.ndarray
    presence: np.ndarray

    def mask(self, posts: Sequence[PostProcess]) -> np.ndarray:
        """The post-processed masks, each structure with its own setting.

        Shape:
            Returns: (C, H, W), ``bool``.
        """
        return np.stack([rule.apply(probs, float(value)) for rule, probs, value in zip(posts, self.probs, self.presence, strict=True)])


def default_postprocess(presence_head: bool) -> PostProcess:
    """The untuned setting: threshold 0.5, no minimum area and, with a presence head, presence above 0.5."""
    return PostProcess(presence_threshold=DEFAULT_THRESHOLD if presence_head else 0.0)


def read_postprocess(run: Run) -> list[PostProcess]:
    """The tuned post-processing of each of a run's structures, read from ``postprocess.json`` (:func:`postprocess_of`)."""
    return postprocess_of(run, run.tuning())


def postprocess_of(run: Run, tuning: Tuning | StructuresTuning | None) -> list[PostProcess]:
    """The post-processing of each of a run's structures in its tuning (one block per structure in a run of several),
    or the untuned setting (:func:`default_postprocess`) of each before ``medseg tune``."""
    if tuning is None:
        return [default_postprocess(run.config.model.presence_head)] * run.structures
    blocks = list(tuning.classes.values()) if isinstance(tuning, StructuresTuning) else [tuning]
    return [PostProcess(block.threshold, block.min_area, block.presence_threshold, tuned=True) for block in blocks]


def untuned_note(run: Run, posts: Sequence[PostProcess]) -> str | None:
    """The line that says a run predicts with the untuned setting, or ``None`` when it is tuned."""
    if any(rule.tuned for rule in posts):
        return None
    return f"{run.path} is not tuned: threshold {DEFAULT_THRESHOLD}, no minimum area (run `medseg tune {run.path}` first)"


def check_tta(tta: str) -> None:
    """Refuse a test-time augmentation that is not one of :data:`~medseg.runs.TTA_MODES`.

    Raises:
        UsageError: Naming the ones there are.
    """
    if tta not in TTA_MODES:
        raise UsageError(f"TTA {tta!r}; use one of {', '.join(TTA_MODES)}")


def postprocess_record(run: Run, posts: list[PostProcess]) -> dict:
    """The post-processing used, as the JSON outputs give it: the one setting of a run of one structure, else a
    setting by structure name."""
    if not run.classes:
        return vars(posts[0])
    return {name: vars(rule) for name, rule in zip(run.classes, posts, strict=True)}


def load_fold_model(run: Run, fold: FoldDir, device: torch.device) -> torch.nn.Module:
    """The model of one fold with its best weights, in eval mode on ``device``.

    The checkpoint is read with ``weights_only=True`` (:meth:`medseg.runs.Run.best_weights`).

    Raises:
        CheckpointError: If the checkpoint is truncated, corrupt or holds more than weights.
        UsageError: If the checkpoint does not fit the run's model.
    """
    model, _ = create_model(run.config.model.model_copy(update={"encoder_weights": "none"}))
    prefix = "model."
    state = {key[len(prefix) :]: value for key, value in run.best_weights(fold).items() if key.startswith(prefix)}
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise UsageError(f"{fold.best}: does not fit the model of {run.config_file} ({str(error).splitlines()[0]})") from error
    model = model.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


Probabilities = tuple[torch.Tensor, torch.Tensor | None]
ProbFn = Callable[[torch.Tensor], Probabilities]


def predict_frames(
    models: Sequence[torch.nn.Module] | ProbFn,
    frames: Sequence[np.ndarray],
    config: Config,
    tta: str = "hflip",
    batch_size: int = 16,
) -> Iterator[Prediction]:
    """Probability maps (and presence probabilities) of frames at their original size, from an ensemble
    with flip TTA.

    Args:
        models: Models in eval mode, all on one device (their sigmoids are averaged), or a function from a
            normalised float batch to probabilities and presence probabilities or None (an ONNX Runtime
            session, see :mod:`medseg.infer.export`).
        frames: Gray frames of any sizes, ``uint8`` or ``float32`` in [0, 1] (:func:`medseg.data.io.read_image`).
        config: The run's configuration (input size).
        tta: ``none``, ``hflip`` (mean with the horizontally flipped frame) or ``hvflip`` (and vertically).
        batch_size: Frames per forward pass.

    Yields:
        One :class:`Prediction` per frame, in order; its maps have the frame's (H, W), one per structure.
    """
    check_tta(tta)
    prob_fn = models if callable(models) else TorchEnsemble(models)
    yield from progress.track(frame_predictions(prob_fn, frames, config, tta, batch_size), len(frames), "predicting")


def frame_predictions(prob_fn: ProbFn, frames: Sequence[np.ndarray], config: Config, tta: str, batch_size: int) -> Iterator[Prediction]:
    """:func:`predict_frames` without a progress bar (a server predicting one batch after another), for a checked TTA and
    an ensemble as one function (:class:`TorchEnsemble` or :class:`~medseg.infer.export.OnnxEnsemble`)."""
    resize = transforms.eval_transform(config)
    device = getattr(prob_fn, "device", torch.device("cpu"))
    for start in range(0, len(frames), batch_size):
        chunk = frames[start : start + batch_size]
        # each frame resized in its own type, then batched in a common one: a frame's prediction does not depend on the
        # frames beside it (a server batches the frames of different clients; an 8-bit frame's resize rounds)
        batch = np.stack(common_type([transforms.apply(resize, frame)[0] for frame in chunk]))[:, None]
        probs, presence = flip_averaged(prob_fn, torch.from_numpy(batch).to(device), tta)
        probs = probs.float().cpu().numpy()
        presence = np.full(probs.shape[:2], np.nan) if presence is None else presence.float().cpu().numpy().reshape(probs.shape[:2])
        for frame, prob, present in zip(chunk, probs, presence, strict=True):
            yield Prediction(np.stack([transforms.resize_back(channel, frame.shape) for channel in prob]), present.astype(np.float64))


class TorchEnsemble:
    """Mean sigmoid of several torch models on a normalised batch, and of their presence logits when they have a
    presence head.

    On CUDA the models run channels-last in the card's mixed precision (:func:`~medseg.devices.inference_dtype`:
    bf16 where the card has it in hardware, fp16 on a T4, V100 or P100, and the frames whose fp16 outputs overflow, as a
    model trained in bf16 or fp32 may, again in fp32: only those, so that a frame's precision does not depend on the
    frames batched with it); the sigmoid and the mean are taken in fp32
    outside autocast, so that probabilities are not rounded to the half type's steps (about 0.004 near 0.5 in bf16)
    and agree with the ONNX model's at the threshold.

    Args:
        models: Models in eval mode on one device.
    """

    def __init__(self, models: Sequence[torch.nn.Module]) -> None:
        self.models = list(models)
        self.device = next(self.models[0].parameters()).device
        self.dtype = inference_dtype(self.device)

    @torch.inference_mode()
    def __call__(self, inputs: torch.Tensor) -> Probabilities:
        if inputs.device.type == "cuda":
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        outputs = self._outputs(inputs, self.dtype)
        if self.dtype == torch.float16:
            overflowed = _overflowed(outputs)  # fp16's range (a model trained in bf16 or fp32): those frames again in fp32
            if bool(overflowed.any()):
                again = self._outputs(inputs[overflowed], None)
                outputs = [_with_rows(output, redone, overflowed) for output, redone in zip(outputs, again, strict=True)]
        return mean_sigmoid(outputs)

    def _outputs(self, inputs: torch.Tensor, dtype: torch.dtype | None) -> list:
        with torch.autocast(inputs.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return [model(inputs) for model in self.models]


def _overflowed(outputs: list) -> torch.Tensor:
    """Which frames of a batch have a logit that is not finite in any model's output (one wait for the device).

    Shape:
        Returns: (N,), ``bool``.
    """
    parts = [part for output in outputs for part in split_outputs(output) if part is not None]
    return ~torch.stack([torch.isfinite(part).reshape(len(part), -1).all(dim=1) for part in parts]).all(dim=0)


def _with_rows(output, redone, rows: torch.Tensor):
    """A model's output (logits, or logits and presence logits) with the ``rows`` frames replaced by ``redone``'s."""
    if isinstance(output, tuple | list):
        return type(output)(_with_rows(part, again, rows) for part, again in zip(output, redone, strict=True))
    merged = output.float().clone()
    merged[rows] = redone.float()
    return merged


def mean_sigmoid(outputs: Sequence[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]) -> Probabilities:
    """The mean sigmoid of several models' outputs: probabilities, and presence probabilities or None.

    Shape:
        Returns: (N, C, H, W), one channel per structure, and (N,) or (N, C) or None.
    """
    pairs = [split_outputs(output) for output in outputs]
    probs = torch.stack([torch.sigmoid(logits.float()) for logits, _ in pairs]).mean(dim=0)
    if any(presence is None for _, presence in pairs):
        return probs, None
    return probs, torch.stack([torch.sigmoid(presence.float()) for _, presence in pairs]).mean(dim=0)


@torch.inference_mode()
def flip_averaged(prob_fn: ProbFn, images: torch.Tensor, tta: str) -> Probabilities:
    """Mean probability over the flips of a ``uint8`` batch, each flipped back, and mean presence probability.

    Shape:
        images: (N, 1, H, W). Returns: (N, C, H, W), one channel per structure, and (N,) or (N, C) or None.
    """
    inputs = normalise(images)
    flips = {"none": [()], "hflip": [(), (3,)], "hvflip": [(), (3,), (2,)]}[tta]
    total: torch.Tensor | None = None
    presence_total: torch.Tensor | None = None
    for dims in flips:
        probs, presence = prob_fn(torch.flip(inputs, dims) if dims else inputs)
        probs = (torch.flip(probs, dims) if dims else probs).float()
        total = probs if total is None else total + probs
        if presence is not None:
            presence_total = presence.float() if presence_total is None else presence_total + presence.float()
    return total / len(flips), None if presence_total is None else presence_total / len(flips)
