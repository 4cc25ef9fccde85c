"""Whole-directory outputs written atomically (adapter folders, exported datasets)."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def umask() -> int:
    """The process umask (read without changing it for longer than one call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def replaced_dir(dest: Path, tag: str = "") -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``dest``; when the block succeeds it replaces
    ``dest`` whole (an old ``dest`` is removed), when it fails it is removed and ``dest`` is left
    as it was. The directory gets the umask's permissions: mkdtemp makes it 0700, but these are
    ordinary outputs."""
    dest = Path(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}{tag}-", dir=dest.parent))
    try:
        os.chmod(tmp, 0o777 & ~umask())
        yield tmp
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
