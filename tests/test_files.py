"""Atomic writes: a file appears whole when its block ends, or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from medseg.files import atomic_write


def test_atomic_write_appears_after_block(tmp_path: Path) -> None:
    path = tmp_path / "out" / "submission.csv"
    with atomic_write(path) as stream:
        stream.write("img,pixels\n")
        assert not path.exists()
        stream.write("1,\n")
        assert not path.exists()
    assert path.read_text(encoding="utf-8") == "img,pixels\n1,\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["submission.csv"]


def test_atomic_write_binary(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    with atomic_write(path, "wb") as stream:
        stream.write(b"\x00\xff")
    assert path.read_bytes() == b"\x00\xff"


def test_atomic_write_failure_keeps_old_content(tmp_path: Path) -> None:
    path = tmp_path / "submission.csv"
    path.write_text("old\n", encoding="utf-8")
    with pytest.raises(RuntimeError, match="disk full"), atomic_write(path) as stream:
        stream.write("new, partial")
        raise RuntimeError("disk full")
    assert path.read_text(encoding="utf-8") == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["submission.csv"]


def test_atomic_write_failure_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "fresh.csv"
    with pytest.raises(KeyboardInterrupt), atomic_write(path) as stream:
        stream.write("partial")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
