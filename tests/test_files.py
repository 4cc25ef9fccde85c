"""engine.files.replaced_dir: whole-directory outputs replace their target only on success."""
import os
import stat

import pytest

from divgen.engine.files import replaced_dir


def test_success_replaces_whole_target_with_umask_permissions(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "stale.txt").write_text("old")
    old = os.umask(0o022)
    try:
        with replaced_dir(dest, ".x") as tmp:
            (tmp / "new.txt").write_text("new")
    finally:
        os.umask(old)
    assert sorted(p.name for p in dest.iterdir()) == ["new.txt"]
    assert stat.S_IMODE(dest.stat().st_mode) == 0o755          # mkdtemp alone would give 0700
    assert [p.name for p in tmp_path.iterdir()] == ["out"]      # no temporary directory left


def test_failure_leaves_target_and_no_temporary(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with replaced_dir(dest) as tmp:
            (tmp / "half.txt").write_text("partial")
            raise RuntimeError("disk full")
    assert (dest / "keep.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
