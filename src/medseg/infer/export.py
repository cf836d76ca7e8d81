"""``medseg export``: a run's fold ensemble as one ONNX model, and ONNX Runtime inference with it.

The model takes normalised frames (``uint8 / 255``, minus the gray mean, over the gray std; the values are
in the JSON written beside it) at the run's input size and returns the mean sigmoid of the fold models:
probabilities (output ``probability``, one channel per structure), and, for models with a presence head,
the mean presence probability per frame and structure (output ``presence``). Resizing, flip TTA, resizing
back and the threshold and minimum area stay outside the graph, as in :mod:`medseg.infer.predict`, whose
code runs them for both engines.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from medseg import __version__, runs
from medseg.data import rle
from medseg.data.intensity import GRAY_MEAN, GRAY_STD
from medseg.data.intensity import describe as describe_window
from medseg.errors import UsageError
from medseg.files import Output, check_outputs
from medseg.infer.predict import PostProcess, Probabilities, load_fold_model, mean_sigmoid, read_postprocess
from medseg.runs import open_run

OPSET = 17
OUTPUTS = ("probability", "presence")


class EnsembleProbabilities(nn.Module):
    """Mean sigmoid of fold models (and of their presence logits): the graph that is exported.

    Args:
        models: The fold models.
    """

    def __init__(self, models: list[nn.Module]) -> None:
        super().__init__()
        self.models = nn.ModuleList(models)

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        probs, presence = mean_sigmoid([model(images) for model in self.models])
        return probs if presence is None else (probs, presence)


def metadata_path(onnx_path: Path) -> Path:
    """Where the settings of an exported model are written: beside it, ``.json`` for ``.onnx``."""
    return Path(onnx_path).with_suffix(".json")


@dataclass(frozen=True)
class ExportRequest:
    """What ``medseg export`` writes.

    Attributes:
        run: The run folder.
        onnx: The ``.onnx`` file; its settings go beside it as ``.json``.
        opset: ONNX opset.
    """

    run: Path
    onnx: Path
    opset: int = OPSET


def export_onnx(request: ExportRequest, *, force: bool = False) -> tuple[Path, Path]:
    """Export a run's ensemble to ONNX (dynamic batch) with its settings in JSON beside it.

    Args:
        request: The run, the file and the opset.
        force: Replace existing files.

    Returns:
        The model file and its settings file.

    Raises:
        UsageError: If the files exist and ``force`` is not given.
    """
    run, out, opset = open_run(request.run), request.onnx, request.opset  # the run first: a mistyped run is told before an existing file
    out = Path(out)
    meta_out = metadata_path(out)
    if meta_out == out:
        raise UsageError(f"--onnx {out}: its settings are written to {meta_out.name} beside it, the same file; name the model .onnx")
    check_outputs([Output("--onnx", out), Output("its settings file", meta_out)], force, inputs=[*run.inputs, run.path])
    graph = EnsembleProbabilities([load_fold_model(run, fold, torch.device("cpu")) for fold in run.folds]).eval()
    example = torch.zeros(1, 1, run.config.input.height, run.config.input.width)
    outputs = OUTPUTS if run.config.model.presence_head else OUTPUTS[:1]
    export_graph(graph, example, out, opset, outputs)
    posts = read_postprocess(run)
    channels = "C, " if run.classes else ""
    meta = {
        "medseg": __version__,
        "run": str(run.path.resolve()),
        "folds": [fold.fold for fold in run.folds],
        "classes": run.classes or None,
        "opset": opset,
        "input": {
            "name": "image",
            "shape": ["batch", 1, run.config.input.height, run.config.input.width],
            "scale": 1 / 255,
            "scale_applies_to": "uint8 frames; frames deeper than 8 bits are windowed to [0, 1] first and not scaled",
            "intensity_window": list(window) if isinstance(window := run.config.data.intensity_window, tuple) else window,
            "intensity_window_meaning": describe_window(window),
            "mean": GRAY_MEAN,
            "std": GRAY_STD,
        },
        "output": {
            "name": "probability",
            "meaning": f"mean sigmoid of the fold models, at the input size, shape [batch, {channels}H, W]"
            + (" (one channel per class, in the order of classes)" if run.classes else ""),
        },
        "presence": {
            "name": "presence",
            "meaning": f"mean presence probability of the fold models, shape [batch{', C' if run.classes else ''}]",
        }
        if len(outputs) > 1
        else None,
        "postprocess": {
            **({"classes": dict(zip(run.classes, map(_setting, posts), strict=True))} if run.classes else _setting(posts[0])),
            "area_at": "original frame size",
            "rule": "mask = probability >= threshold; empty when its area < min_area or presence <= presence_threshold (if > 0)"
            + (", for each class with its own setting" if run.classes else ""),
        },
        "tta": "not in the graph: average the probabilities of flipped inputs, flipped back",
        "rle": rle.MEANINGS[run.config.data.dialect],
    }
    runs.write_json(meta_out, meta)
    return out, meta_out


def _setting(post: PostProcess) -> dict:
    return {"threshold": post.threshold, "min_area": post.min_area, "presence_threshold": post.presence_threshold, "tuned": post.tuned}


def export_graph(graph: nn.Module, example: torch.Tensor, out: Path, opset: int = OPSET, outputs: tuple[str, ...] = OUTPUTS[:1]) -> None:
    """Export a module to ONNX with a dynamic batch axis, checked, written atomically.

    Args:
        graph: The module; it returns one tensor per name in ``outputs``.
        example: An input batch.
        out: The ``.onnx`` file.
        opset: ONNX opset.
        outputs: The output names.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(handle)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*squeeze operation on dimension 1.*")  # split_outputs keeps (N, C) for C > 1
            torch.onnx.export(
                graph,
                (example,),
                temporary,
                input_names=["image"],
                output_names=list(outputs),
                dynamic_axes={"image": {0: "batch"}, **{name: {0: "batch"} for name in outputs}},
                opset_version=opset,
                dynamo=False,
            )
        onnx.checker.check_model(temporary)
        _fsync(temporary)
        os.replace(temporary, out)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _fsync(path: str) -> None:
    """Flush a file written by another library to the disk, so that the rename after it never shows a partial file."""
    with open(path, "rb+") as stream:
        os.fsync(stream.fileno())


class OnnxEnsemble:
    """An exported ensemble in ONNX Runtime, callable like :class:`medseg.infer.predict.TorchEnsemble`.

    Args:
        path: The ``.onnx`` file.
        threads: Intra-op threads; ``None`` lets ONNX Runtime choose.
    """

    device = torch.device("cpu")

    def __init__(self, path: Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as error:
            raise UsageError(f"{path}: not a loadable ONNX model ({str(error).splitlines()[0][:160]}); export it again") from error
        self.meta = runs.read_json(metadata_path(path)) if metadata_path(path).is_file() else {}

    def __call__(self, inputs: torch.Tensor) -> Probabilities:
        names = [output.name for output in self.session.get_outputs()]
        results = self.session.run(names, {"image": np.ascontiguousarray(inputs.cpu().numpy(), dtype=np.float32)})
        by_name = dict(zip(names, results))
        presence = by_name.get(OUTPUTS[1])
        return torch.from_numpy(by_name[OUTPUTS[0]]), None if presence is None else torch.from_numpy(presence)
