"""The model a server holds: a run's fold ensemble with its post-processing, the frames' readers, and the answers.

A frame posted to the server goes through the very code ``medseg predict`` runs: the same reader
(:func:`medseg.data.io.read_image`, on the bytes in memory), the same ensemble and TTA
(:func:`medseg.infer.predict.frame_predictions`), the same tuned post-processing and the same RLE dialect, so
that the same frames give the same masks and RLE.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medseg import __version__
from medseg.data import io, rle
from medseg.data.intensity import GRAY_MEAN, GRAY_STD
from medseg.data.intensity import describe as describe_window
from medseg.data.io import FrameBytes
from medseg.infer.kept import run_identity
from medseg.infer.outputs import load_engine, mask_png
from medseg.infer.predict import TorchEnsemble, check_tta, frame_predictions, postprocess_record, read_postprocess, untuned_note
from medseg.report.figures import STRUCTURE_COLOURS
from medseg.runs import Run
from medseg.serve.uploads import V2_TYPES

OUTPUT_TYPES = {"mask": "UINT8", "presence": "FP32", "area": "INT64", "rle": "BYTES"}
"""The KServe v2 outputs and their types."""
ONE_STRUCTURE = "foreground"
"""The name a run of one structure gives its structure in the answers (a run of several names each)."""


@dataclass(frozen=True)
class ModelOptions:
    """How a server predicts: the engine, the TTA and the frames it takes.

    Attributes:
        engine: ``torch`` (the checkpoints; CUDA when there is one) or ``onnx`` (ONNX Runtime on the CPU).
        onnx: The exported model for the onnx engine; ``RUN/model.onnx`` (exported on first use) when ``None``.
        tta: ``none``, ``hflip`` or ``hvflip``, as ``medseg predict --tta``.
        max_pixels: The most pixels a frame may declare in its header; the run's ``data.max_pixels`` when ``None``.
    """

    engine: str = "torch"
    onnx: Path | None = None
    tta: str = "hflip"
    max_pixels: int | None = None


@dataclass(frozen=True)
class Answer:
    """What one frame's prediction gives a client.

    Attributes:
        masks: The post-processed masks, one per structure. Shape: (C, H, W), ``bool``.
        presence: Each structure's presence probability (``nan`` without a presence head).
    """

    masks: np.ndarray
    presence: np.ndarray


def check_servable(run: Run, options: ModelOptions, on_message: Callable[[str], None]) -> None:
    """What :class:`ServedModel` would refuse, checked without putting a model on a device (the parent of worker
    processes, which load their own): the TTA, the engine, every checkpoint, the ONNX model (exported here once, not by
    each worker).

    Raises:
        UsageError: On an unknown engine or TTA, or a named ONNX file that is missing or not a model.
        CheckpointError: If a checkpoint is damaged.
    """
    check_tta(options.tta)
    if options.engine != "torch":
        load_engine(run, options.engine, options.onnx, on_message, threads=1)
        return
    for fold in run.folds:
        run.best_weights(fold)


class ServedModel:
    """A run's fold ensemble ready to answer: loaded once, warmed up, then called with batches of frames.

    Args:
        run: The trained run.
        options: Engine, TTA and pixel limit.
        on_message: Told what is loaded (an ONNX export on first use).

    Raises:
        UsageError: On an unknown engine or TTA, or a named ONNX file that is missing or not a model.
        CheckpointError: If a checkpoint is damaged.
    """

    def __init__(self, run: Run, options: ModelOptions, on_message: Callable[[str], None] = print) -> None:
        check_tta(options.tta)
        self.run = run
        self.options = options
        self.max_pixels = options.max_pixels or run.config.data.max_pixels
        self.posts = read_postprocess(run)
        if (note := untuned_note(run, self.posts)) is not None:
            on_message(note)
        self.structures = list(run.classes) or [ONE_STRUCTURE]
        self.labels = [run.plan.class_labels.get(name, name) for name in self.structures]
        self.colours = [STRUCTURE_COLOURS[index % len(STRUCTURE_COLOURS)] for index in range(len(self.structures))]
        engine = load_engine(run, options.engine, options.onnx, on_message, threads=torch.get_num_threads())
        self.prob_fn = TorchEnsemble(engine) if isinstance(engine, list) else engine
        self.run_id = run_identity(run)

    def read(self, upload: FrameBytes) -> np.ndarray:
        """The gray frame of a posted file, read as ``medseg predict`` reads a file.

        Raises:
            ImageReadError: Naming the upload, as for a file (:func:`medseg.data.io.read_image`).
        """
        return io.read_image(upload, self.run.config.data.intensity_window, max_pixels=self.max_pixels)

    def size(self, upload: FrameBytes) -> tuple[int, int]:
        """The ``(height, width)`` a posted file's header declares, checked against the pixel limit; nothing decoded.

        Raises:
            ImageReadError: Naming the upload (:func:`medseg.data.io.image_size`).
        """
        return io.image_size(upload, max_pixels=self.max_pixels)

    def predict(self, frames: Sequence[np.ndarray]) -> list[Answer]:
        """The masks and presence probabilities of frames, in one pass of the ensemble (one batch)."""
        predictions = frame_predictions(self.prob_fn, frames, self.run.config, self.options.tta, max(1, len(frames)))
        return [Answer(prediction.mask(self.posts), prediction.presence) for prediction in predictions]

    def warm_up(self) -> None:
        """Predict one blank frame at the network's size, so that the first client does not wait for the lazy set-up."""
        size = self.run.config.input
        self.predict([np.zeros((size.height, size.width), np.uint8)])

    def structures_of(self, answer: Answer, *, with_masks: bool) -> list[dict]:
        """A frame's answer by structure: present, presence probability, area, RLE and, on request, the mask as PNG.

        Each structure's mask is its own (structures may overlap), as ``predict --out`` encodes them; its ``label`` is
        the one ``predict`` writes in a long table's class column.
        """
        return [
            self._structure(index, mask, float(presence), with_masks)
            for index, (mask, presence) in enumerate(zip(answer.masks, answer.presence, strict=True))
        ]

    def _structure(self, index: int, mask: np.ndarray, presence: float, with_mask: bool) -> dict:
        entry = {
            "structure": self.structures[index],
            "label": self.labels[index],
            "colour": self.colours[index],
            "present": bool(mask.any()),
            "presence_probability": None if math.isnan(presence) else round(presence, 6),
            "area": int(np.count_nonzero(mask)),
            "rle": rle.encode(mask, dialect=self.run.config.data.dialect),
        }
        if with_mask:
            entry["mask_png"] = base64.b64encode(mask_png(mask)).decode("ascii")
        return entry

    @property
    def output_names(self) -> list[str]:
        """The KServe v2 outputs: masks, presence probabilities (with a presence head), areas and RLE."""
        return [name for name in OUTPUT_TYPES if name != "presence" or self.run.config.model.presence_head]

    def v2_outputs(self, answers: Sequence[Answer], names: Sequence[str]) -> list[dict]:
        """The answers of a v2 request's frames (all of one size) as v2 output tensors, row-major, one per name."""
        count = (len(answers), len(self.structures))
        values = {
            "mask": lambda: np.stack([answer.masks for answer in answers]).astype(np.uint8),
            "presence": lambda: np.stack([answer.presence for answer in answers]).astype(np.float32),
            "area": lambda: np.array([[int(np.count_nonzero(mask)) for mask in answer.masks] for answer in answers]).reshape(count),
            "rle": lambda: np.array(
                [[rle.encode(mask, dialect=self.run.config.data.dialect) for mask in answer.masks] for answer in answers], dtype=object
            ).reshape(count),
        }
        outputs = []
        for name in names:
            tensor = values[name]()
            outputs.append({"name": name, "datatype": OUTPUT_TYPES[name], "shape": list(tensor.shape), "data": tensor.ravel().tolist()})
        return outputs

    def metadata(self, name: str) -> dict:
        """What a client needs to know of the model: KServe v2's model metadata with medseg's own in ``parameters``."""
        config = self.run.config
        return {
            "name": name,
            "versions": [__version__],
            "platform": "onnxruntime_onnx" if self.options.engine == "onnx" else "pytorch",
            "inputs": [{"name": "image", "datatype": "UINT8", "shape": [-1, -1, -1]}],
            "outputs": [
                {"name": name, "datatype": OUTPUT_TYPES[name], "shape": [-1, len(self.structures), -1, -1][: 4 if name == "mask" else 2]}
                for name in self.output_names
            ],
            "parameters": {
                "medseg_version": __version__,
                "run": self.run.path.name,
                "run_id": self.run_id,
                "structures": self.structures,
                "labels": self.labels,
                "colours": self.colours,
                "input_datatypes": list(V2_TYPES),  # the metadata's input names one type; each of these is read
                "engine": self.options.engine,
                "device": str(getattr(self.prob_fn, "device", torch.device("cpu"))),
                "folds": len(self.run.folds),
                "tta": self.options.tta,
                "input": {
                    "height": config.input.height,
                    "width": config.input.width,
                    "channels": 1,
                    "normalisation": {"scale": 1 / 255, "mean": GRAY_MEAN, "std": GRAY_STD},
                    "intensity_window": describe_window(config.data.intensity_window),
                    "max_pixels": self.max_pixels,
                    "formats": ["TIFF", "PNG", "JPEG", "BMP", "DICOM"],
                },
                "postprocess": postprocess_record(self.run, self.posts),
                "tuned": any(rule.tuned for rule in self.posts),
                "rle": {"dialect": config.data.dialect, "convention": rle.MEANINGS[config.data.dialect]},
            },
        }
