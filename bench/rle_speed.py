"""RLE codec speed: medseg.rle against the plain-numpy recipe functions, on the real Kaggle rows.

Both sides encode and decode every row of ``../shared/data/kaggle-uns/train_masks.csv`` (5,626 masks of
420x580, 3,303 of them empty) in one run, on one core; the outputs are checked equal before anything is
timed. Prints masks/s of each side and the ratio, overall and for empty and non-empty masks apart.

Usage: ``.venv/bin/python bench/rle_speed.py [--repeats N] [--csv PATH]``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from medseg.data import io, rle

SHAPE = (420, 580)
DEFAULT_CSV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "kaggle-uns" / "train_masks.csv"


def recipe_encode(mask: np.ndarray) -> str:
    """The notebook recipe: flatten column-major, pad with zeros, ``np.where`` on the difference, join."""
    pixels = mask.flatten(order="F")
    pixels = np.concatenate([[0], pixels, [0]])
    runs = np.where(pixels[1:] != pixels[:-1])[0] + 1
    runs[1::2] -= runs[::2]
    return " ".join(str(x) for x in runs)


def recipe_decode(mask_rle: str, shape: tuple[int, int] = SHAPE) -> np.ndarray:
    """The notebook recipe: a Python loop assigning one slice per run."""
    s = mask_rle.split()
    starts, lengths = [np.asarray(x, dtype=int) for x in (s[0:][::2], s[1:][::2])]
    starts -= 1
    ends = starts + lengths
    img = np.zeros(shape[0] * shape[1], dtype=np.uint8)
    for lo, hi in zip(starts, ends):
        img[lo:hi] = 1
    return img.reshape(shape[::-1]).T


def best_rate(function: Callable, items: list, repeats: int) -> float:
    """Items per second of ``function`` over ``items``, best of ``repeats`` passes."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for item in items:
            function(item)
        best = min(best, time.perf_counter() - start)
    return len(items) / best


def check_agreement(texts: list[str], masks: list[np.ndarray]) -> None:
    """Both codecs give the same strings and masks on every row."""
    for text, mask in zip(texts, masks):
        if rle.encode(mask) != text or recipe_encode(mask) != text:
            raise SystemExit("encoders disagree with the CSV; no timing")
        if not np.array_equal(rle.decode(text, SHAPE), recipe_decode(text).astype(bool)):
            raise SystemExit("decoders disagree; no timing")


def main() -> None:
    """Time both codecs and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--csv", type=Path, default=DEFAULT_CSV)
    args = parser.parse_args()
    texts = list(io.read_csv(args.csv, ("pixels",))["pixels"])
    masks = [np.ascontiguousarray(recipe_decode(text).astype(bool)) for text in texts]
    check_agreement(texts, masks)
    groups = {
        "all": list(range(len(texts))),
        "empty": [i for i, t in enumerate(texts) if not t],
        "non-empty": [i for i, t in enumerate(texts) if t],
    }
    print(f"{len(texts)} masks of {SHAPE[1]}x{SHAPE[0]} from {args.csv.name}, best of {args.repeats}, one core")
    print(f"{'what':<8} {'masks':<10} {'recipe/s':>10} {'medseg/s':>10} {'ratio':>7}")
    for what, recipe, ours, items in (
        ("encode", recipe_encode, rle.encode, masks),
        ("decode", recipe_decode, lambda text: rle.decode(text, SHAPE), texts),
    ):
        for group, indices in groups.items():
            subset = [items[i] for i in indices]
            base, fast = best_rate(recipe, subset, args.repeats), best_rate(ours, subset, args.repeats)
            print(f"{what:<8} {group:<10} {base:>10,.0f} {fast:>10,.0f} {fast / base:>6.1f}x")


if __name__ == "__main__":
    main()
