"""unigendet.checkpoint.atomic.atomic_path: the project's one atomic writer (checkpoints, exports, tokenizer copies,
caches)."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from unigendet.checkpoint.atomic import atomic_path


def test_a_failed_write_keeps_the_old_file_and_names_it(tmp_path):
    target = tmp_path / "config.json"
    target.write_text("old")
    with pytest.raises(OSError, match=r"could not write config file .*config\.json .*previous config file there is "
                                      r"unchanged") as info:
        with atomic_path(target, what="config file") as partial:
            partial.write_text("half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert info.value.errno == errno.ENOSPC
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]  # no partial file left behind


def test_a_write_replaces_the_file_with_its_mode(tmp_path):
    target = tmp_path / "sub" / "weights.bin"
    with atomic_path(target, mode=0o644) as partial:
        assert partial.parent == target.parent and partial.name == ".weights.bin.partial"
        partial.write_bytes(b"new")
    assert target.read_bytes() == b"new" and stat.S_IMODE(target.stat().st_mode) == 0o644
    assert sorted(p.name for p in target.parent.iterdir()) == ["weights.bin"]


def test_per_process_partial_names_do_not_collide(tmp_path):
    with atomic_path(tmp_path / "cache.pth", per_process=True) as partial:
        assert partial.name == f".cache.pth.{os.getpid()}.partial"
        partial.write_bytes(b"x")
    assert (tmp_path / "cache.pth").read_bytes() == b"x"
