"""keel.files: a file is replaced whole or not at all, with a plain file mode."""
from __future__ import annotations

import csv
import os
import stat

import numpy as np
import pytest

from keel.files import atomic_write, atomic_write_text, atomic_write_with


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_write_replaces_completely(tmp_path):
    target = tmp_path / "sub" / "file.bin"      # the folder is created
    atomic_write(target, lambda tmp: open(tmp, "wb").write(b"first"))
    atomic_write(target, lambda tmp: open(tmp, "wb").write(b"second"))
    assert target.read_bytes() == b"second"
    assert os.listdir(target.parent) == ["file.bin"]
    # a plain file mode (umask applied), not tempfile's 0600
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~_umask()


def test_atomic_write_failure_keeps_previous_file(tmp_path):
    target = tmp_path / "last.pt"
    target.write_bytes(b"the good checkpoint")
    before = target.stat().st_mtime_ns

    def half_then_crash(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half of a new checkp")
            f.flush()
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_then_crash)
    assert target.read_bytes() == b"the good checkpoint"
    assert target.stat().st_mtime_ns == before
    assert os.listdir(tmp_path) == ["last.pt"]     # no temp file left behind


def test_atomic_write_failure_without_previous_file(tmp_path):
    def crash(tmp):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "new.pt", crash)
    assert os.listdir(tmp_path) == []


def test_text_and_handle_writers(tmp_path):
    atomic_write_text(tmp_path / "a.json", "{\"x\": \"é\"}")
    assert (tmp_path / "a.json").read_text(encoding="utf-8") == "{\"x\": \"é\"}"
    atomic_write_with(tmp_path / "rows.csv", lambda fh: csv.writer(fh).writerows([["a", "b,c"], ["1", "2"]]))
    assert (tmp_path / "rows.csv").read_bytes() == b'a,"b,c"\r\n1,2\r\n'      # csv's own line ends kept
    atomic_write_with(tmp_path / "x.npy", lambda fh: np.save(fh, np.arange(3)), binary=True)
    assert np.load(tmp_path / "x.npy").tolist() == [0, 1, 2]
    assert sorted(os.listdir(tmp_path)) == ["a.json", "rows.csv", "x.npy"]
    with pytest.raises(ZeroDivisionError):
        atomic_write_with(tmp_path / "rows.csv", lambda fh: fh.write("half") and 1 / 0)
    assert (tmp_path / "rows.csv").read_bytes().startswith(b"a,")
