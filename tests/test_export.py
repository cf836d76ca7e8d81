"""ONNX export and ONNX Runtime inference against the torch engine on a tiny run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medseg.cli import main
from medseg.data import io, rle
from medseg.errors import UsageError
from medseg.infer.export import ExportRequest, OnnxEnsemble, export_onnx
from medseg.infer.predict import load_fold_model, predict_frames
from medseg.runs import open_run


def test_export_writes_a_dynamic_batch_model_and_its_settings(run_copy, capsys):
    model = run_copy / "model.onnx"
    assert main(["export", str(run_copy), "--onnx", str(model)]) == 0
    settings = json.loads(model.with_suffix(".json").read_text())
    assert settings["input"]["shape"] == ["batch", 1, 64, 96] and settings["postprocess"]["threshold"] == 0.5
    session = OnnxEnsemble(model)
    for batch in (1, 3):
        probs, presence = session(torch.zeros(batch, 1, 64, 96))
        assert probs.shape == (batch, 1, 64, 96) and presence.shape == (batch,)
    assert main(["export", str(run_copy), "--onnx", str(model)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["export", str(run_copy.with_name("nrun")), "--onnx", str(model)]) == 2
    assert "nrun" in capsys.readouterr().err  # the mistyped run first, not "exists"


def test_onnx_runtime_probabilities_match_torch_within_1e_3(run_copy, shared_data):
    run = open_run(run_copy)
    model, _ = export_onnx(ExportRequest(run_copy, run_copy / "model.onnx"))
    frames = [io.read_image(shared_data / "uns-mini" / "test" / f"{n}.tif") for n in range(1, 9)]
    torch_probs = [
        prediction.probs for prediction in predict_frames([load_fold_model(run, run.folds[0], torch.device("cpu"))], frames, run.config)
    ]
    onnx_probs = [prediction.probs for prediction in predict_frames(OnnxEnsemble(model), frames, run.config)]
    for a, b in zip(torch_probs, onnx_probs):
        assert a.shape == b.shape == (1, 420, 580)
        assert np.abs(a - b).max() < 1e-3


def test_predict_with_the_onnx_engine_writes_the_same_submission(run_copy, tmp_path, shared_data):
    (run_copy / "postprocess.json").write_text(json.dumps({"threshold": 0.3, "min_area": 0}))
    outputs = {}
    for engine in ("torch", "onnx"):
        out = tmp_path / f"{engine}.csv"
        args = ["predict", str(run_copy), str(shared_data / "uns-mini" / "test"), "--out", str(out), "--engine", engine]
        assert main([*args, "--save-probs", "--quiet", "--allow-degenerate"]) == 0
        rows = io.read_csv(out, ("img", "pixels"))
        with np.load(f"{out}.probs.npz") as saved:
            outputs[engine] = (list(rows["pixels"]), [saved[f"p{i}"].astype(np.float32) for i in range(len(rows))])
    assert (run_copy / "model.onnx").is_file()  # exported on first use
    differing = 0
    for text_t, text_o, prob_t, prob_o in zip(outputs["torch"][0], outputs["onnx"][0], outputs["torch"][1], outputs["onnx"][1]):
        mask_t, mask_o = rle.decode(text_t, (420, 580)), rle.decode(text_o, (420, 580))
        changed = mask_t != mask_o
        differing += int(changed.sum())
        assert np.all(np.abs(prob_t[changed] - 0.3) <= 2e-3)  # float16 maps: 1e-3 plus storage rounding
    assert differing < 420 * 580  # a handful of pixels at most, near the threshold


def test_a_broken_onnx_file_is_a_one_line_error(tmp_path):
    broken = tmp_path / "model.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(UsageError, match="not a loadable ONNX model"):
        OnnxEnsemble(broken)
