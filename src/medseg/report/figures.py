"""The report's figures: training curves, tuning curves, the held-out evaluation and frame overlays, as PNGs.

Each function returns :class:`Figure` values (file name, PNG bytes, a one-line caption that says how to
read the figure); :mod:`medseg.report.page` puts them on the page.
"""

from __future__ import annotations

import io as byte_io
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from medseg.learn.metrics import DEFAULT_THRESHOLD
from medseg.runs import StructuresTuning, Tuning

TRUTH_COLOUR = "#22c55e"
PREDICTION_COLOUR = "#f43f5e"
STRUCTURE_COLOURS = ("#22c55e", "#3b82f6", "#f59e0b", "#ec4899", "#14b8a6", "#a855f7")  # one per structure, in channel order


@dataclass
class Figure:
    """One figure of the page: its file name, its PNG bytes and its caption."""

    name: str
    png: bytes
    caption: str


def png(figure: plt.Figure) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    buffer = byte_io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def training_figures(fold_metrics: dict[int, list[dict]], max_epochs: int) -> list[Figure]:
    """Loss, learning rate, validation score and throughput per epoch, one figure per fold.

    Args:
        fold_metrics: The ``metrics.csv`` rows of each fold.
        max_epochs: The epoch budget (a fold that trained fewer stopped early).
    """
    figures = []
    for fold, rows in fold_metrics.items():
        if not rows:
            continue
        epochs = [int(row["epoch"]) for row in rows]
        column = {name: [float(row[name]) for row in rows] for name in ("train_loss", "val_loss", "val_score", "lr", "images_per_s")}
        best = epochs[int(np.argmin(column["val_loss"]))]
        figure, axes = plt.subplots(1, 4, figsize=(15, 3.2))
        axes[0].plot(epochs, column["train_loss"], label="train", marker=".")
        axes[0].plot(epochs, column["val_loss"], label="validation", marker=".")
        axes[0].axvline(best, color="#16a34a", linestyle="--", label=f"best (epoch {best})")
        if len(epochs) < max_epochs:
            axes[0].axvline(epochs[-1], color="#dc2626", linestyle=":", label="early stop")
        axes[0].set_title("loss")
        axes[0].legend(fontsize=8)
        axes[1].semilogy(epochs, column["lr"], marker=".")
        axes[1].set_title("learning rate (log)")
        axes[2].plot(epochs, column["val_score"], marker=".", color="#7c3aed")
        axes[2].set_title(f"validation score (threshold {DEFAULT_THRESHOLD})")
        axes[3].plot(epochs, column["images_per_s"], marker=".", color="#0891b2")
        axes[3].set_title("training images/s")
        for axis in axes:
            axis.set_xlabel("epoch")
            axis.grid(alpha=0.3)
        caption = (
            f"Fold {fold}: training and validation loss per epoch (lower is better; the dashed line is the kept checkpoint), "
            "the learning rate (each step down is a halving on a plateau), "
            f"the validation score at threshold {DEFAULT_THRESHOLD} before tuning, "
            "and throughput."
        )
        figures.append(Figure(f"training_fold_{fold}.png", png(figure), caption))
    return figures


def tuning_figures(tuned: Tuning | StructuresTuning | None) -> list[Figure]:
    """Score against threshold, minimum area and (with a presence head) presence threshold, the choice marked;
    one figure per structure for a run of several."""
    if isinstance(tuned, StructuresTuning):
        return [figure for name, block in tuned.classes.items() for figure in _tuning_figure(block, name)]
    return _tuning_figure(tuned)


def _tuning_figure(tuned: Tuning | None, structure: str | None = None) -> list[Figure]:
    if tuned is None or not tuned.searched:
        return []
    thresholds, areas, scores = np.array(tuned.thresholds), np.array(tuned.min_areas), np.array(tuned.scores)
    row = int(np.argmin(np.abs(thresholds - tuned.threshold)))
    column = int(np.flatnonzero(areas == tuned.min_area)[0])
    presence = tuned.presence_head
    figure, axes = plt.subplots(1, 3 if presence else 2, figsize=(16 if presence else 11, 3.4))
    axes[0].plot(thresholds, scores[:, column], marker=".")
    axes[0].plot([thresholds[row]], [scores[row, column]], "o", color="#dc2626", markersize=10, label="chosen")
    axes[0].set_xlabel("probability threshold")
    axes[0].set_title(f"score vs threshold (min area {tuned.min_area} px)")
    axes[1].plot(areas, scores[row], marker=".")
    axes[1].plot([areas[column]], [scores[row, column]], "o", color="#dc2626", markersize=10, label="chosen")
    axes[1].set_xlabel("minimum mask area (px, original size)")
    axes[1].set_title(f"score vs minimum area (threshold {tuned.threshold:.2f})")
    if presence:
        levels, best = np.array(tuned.presence_thresholds), np.array(tuned.presence_scores)
        chosen = int(np.argmin(np.abs(levels - tuned.presence_threshold)))
        axes[2].plot(levels, best, marker=".")
        axes[2].plot([levels[chosen]], [best[chosen]], "o", color="#dc2626", markersize=10, label="chosen")
        axes[2].set_xlabel("presence threshold (0: off, 1: every mask empty)")
        axes[2].set_title("best score vs presence threshold")
    for axis in axes:
        axis.set_ylabel("competition score")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    caption = (
        f"Tuning on {tuned.frames} {'out-of-fold' if tuned.out_of_fold else 'validation'} frames: the score for each threshold at the "
        f"chosen minimum area (left) and for each minimum area at the chosen threshold (middle)"
        f"{', the best score at each presence threshold (right)' if presence else ''}; the red point is the choice. "
        f"Score before tuning {tuned.score_before:.3f}, after {tuned.score_after:.3f}."
    )
    if structure is not None:
        figure.suptitle(structure, fontsize=11)
        return [Figure(f"tuning_{structure}.png", png(figure), f"{structure}: {caption}")]
    return [Figure("tuning.png", png(figure), caption)]


def evaluation_figures(rows: list[dict]) -> list[Figure]:
    """Histogram of per-frame scores, presence confusion, Dice against true mask area."""
    if not rows:
        return []
    dice = np.array([float(row["dice"]) for row in rows])
    truth_area = np.array([int(row["truth_area"]) for row in rows])
    truth_empty = np.array([bool(row["truth_empty"]) for row in rows])
    pred_empty = np.array([bool(row["pred_empty"]) for row in rows])
    figure, axes = plt.subplots(1, 3, figsize=(15, 3.6))
    axes[0].hist(dice, bins=np.linspace(0, 1, 21), color="#2563eb", edgecolor="white")
    axes[0].set_xlabel("per-frame score (Dice; 1 for an empty frame predicted empty)")
    axes[0].set_ylabel("frames")
    confusion = np.array(
        [
            [np.sum(~truth_empty & ~pred_empty), np.sum(~truth_empty & pred_empty)],
            [np.sum(truth_empty & ~pred_empty), np.sum(truth_empty & pred_empty)],
        ]
    )
    axes[1].imshow(confusion, cmap="Blues")
    for (i, j), value in np.ndenumerate(confusion):
        axes[1].text(j, i, str(value), ha="center", va="center", fontsize=14, color="black" if value < confusion.max() / 2 else "white")
    axes[1].set_xticks([0, 1], ["predicted: mask", "predicted: empty"])
    axes[1].set_yticks([0, 1], ["truth: mask", "truth: empty"])
    axes[1].set_title("presence")
    axes[2].scatter(truth_area[~truth_empty], dice[~truth_empty], s=12, color="#2563eb", label="frames with a mask")
    axes[2].scatter(np.zeros(np.sum(truth_empty)), dice[truth_empty], s=12, color="#f97316", label="empty frames (area 0)")
    axes[2].set_xlabel("true mask area (px)")
    axes[2].set_ylabel("score")
    axes[2].legend(fontsize=8)
    for axis in (axes[0], axes[2]):
        axis.grid(alpha=0.3)
    caption = (
        "Held-out frames, each predicted by the model that did not train on it, after the post-processing: the spread of per-frame "
        "scores (a pile at 0 is frames the model gets entirely wrong), "
        "whether a structure was found where there is one (diagonal = right), "
        "and whether small structures are harder."
    )
    return [Figure("evaluation.png", png(figure), caption)]


def overlay(frame: np.ndarray, truth: np.ndarray, probs: np.ndarray, prediction: np.ndarray) -> plt.Figure:
    """The frame with the true (green) and predicted (red) outlines, beside the heat map of the highest probability.

    With several structures each has its colour (:data:`STRUCTURE_COLOURS`): its true outline solid, its predicted
    outline dashed.

    Shape:
        frame: (H, W). truth, probs, prediction: (C, H, W).
    """
    figure, axes = plt.subplots(1, 2, figsize=(6.4, 2.5))
    for axis in axes:
        axis.imshow(frame, cmap="gray", vmin=0, vmax=255 if frame.dtype == np.uint8 else 1.0)
        axis.set_axis_off()
    for (true_colour, predicted_colour, style), true, predicted in zip(_outline_styles(len(truth)), truth, prediction, strict=True):
        if true.any():
            axes[0].contour(true, levels=[0.5], colors=[true_colour], linewidths=1.5)
        if predicted.any():
            axes[0].contour(predicted, levels=[0.5], colors=[predicted_colour], linewidths=1.5, linestyles=style)
    probs = probs.max(axis=0)
    heat = axes[1].imshow(np.ma.masked_less(probs, 0.05), cmap="inferno", vmin=0, vmax=1, alpha=0.75)
    figure.colorbar(heat, ax=axes[1], fraction=0.04, pad=0.02)
    figure.subplots_adjust(wspace=0.02)
    return figure


def _outline_styles(structures: int) -> list[tuple[str, str, str]]:
    """Each structure's true and predicted outline colours and the predicted outline's line style."""
    if structures == 1:
        return [(TRUTH_COLOUR, PREDICTION_COLOUR, "solid")]
    colours = [STRUCTURE_COLOURS[index % len(STRUCTURE_COLOURS)] for index in range(structures)]
    return [(colour, colour, "dashed") for colour in colours]
