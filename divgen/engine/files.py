"""The one output discipline of every command: what may be replaced, and how.

Rules (each refused with one DivgenError line before any slow work):

* an existing file or folder that is not this command's own earlier output is never replaced
  (``check_output_file`` / ``check_output_dir`` take an ``ours`` test);
* an output never equals an input, and an output folder never contains one;
* ``--overwrite`` never reaches outside what the command wrote: never the working folder (or a
  folder above it), never through a symbolic link, never a folder holding files it did not write;
* a name whose temporary or sidecar name would not fit the file system (255 bytes) is refused.

How outputs are written:

* ``write_file_atomic``: a temporary file beside the target, fsynced, then ``os.replace`` — a kill
  at any point leaves the old file or the new one, whole;
* ``replaced_dir``: a temporary folder beside the target, filled, then swapped in with one atomic
  ``renameat2(RENAME_EXCHANGE)`` where the kernel has it (Linux), else "rename the old aside,
  rename the new in"; the old one is deleted only after the new one is in place. A kill at any
  point leaves the old folder or the new one whole (with the fallback, a kill between the two
  renames leaves the old folder under its aside name, and the next run puts it back);
* every temporary name is ``.NAME.divgen-tmp-PID-XXXXXXXX`` (asides ``.divgen-old-``), so
  ``clean_stale`` — called before each write — removes what a killed run (a PID no longer alive)
  left, and restores an aside whose target is missing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import os
import re
import secrets
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

from divgen.engine.errors import DivgenError

NAME_MAX = 255                  # bytes in one path component (ext4, xfs, btrfs, tmpfs, APFS, NTFS)
_STEM = 80                      # bytes of the target's name kept in a temporary name
_TAG = re.compile(r"^\.(?P<stem>.*)\.divgen-(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}(\.[a-z]{1,5})?$", re.S)
LEGACY_TEMP_AGE_S = 3600        # temporaries of older divgen versions (no PID): removed after an hour


def umask() -> int:
    """The process umask (read without changing it for longer than one call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---- names -------------------------------------------------------------------------------------
def _stem(name: str) -> str:
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) <= _STEM:
        return name
    return raw[:_STEM - 9].decode("utf-8", "ignore") + "~" + hashlib.sha256(raw).hexdigest()[:8]


def temp_path(dest: Path, kind: str = "tmp") -> Path:
    """A fresh temporary (``kind="tmp"``) or aside (``"old"``) name beside ``dest``."""
    dest = Path(dest)
    return dest.parent / f".{_stem(dest.name)}.divgen-{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:           # another user's live process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except OSError:
            pass


def clean_stale(dest: Path, legacy: Iterable[str] = (), *, any_name: bool = False) -> list[Path]:
    """Remove the temporaries a killed run left beside ``dest`` (their PID is not alive); an aside
    whose ``dest`` is missing is renamed back (the old output, whole). ``legacy``: glob patterns of
    older divgen versions' temporaries (no PID), removed when older than an hour. ``any_name``:
    those of every name in ``dest``'s folder (a cache). Returns what was removed or restored."""
    dest = Path(dest)
    parent = dest.parent if str(dest.parent) else Path(".")
    stem = _stem(dest.name)
    done: list[Path] = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return done
    for p in entries:
        m = _TAG.match(p.name)
        if not m or (m["stem"] != stem and not any_name) or _alive(int(m["pid"])):
            continue
        target = parent / m["stem"]
        if m["kind"] == "old" and not os.path.lexists(target):
            if "~" in m["stem"] and m["stem"] != stem:
                continue                      # a shortened name: leave it for the run that knows the target
            try:
                os.rename(p, target if m["stem"] != stem else dest)
            except OSError:
                continue
        else:
            _remove(p)
        done.append(p)
    now = time.time()
    for pattern in legacy:
        for p in parent.glob(pattern):
            try:
                old = now - p.lstat().st_mtime > LEGACY_TEMP_AGE_S
            except OSError:
                continue
            if old:
                _remove(p)
                done.append(p)
    return done


# ---- checks before anything is written -----------------------------------------------------------
def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def _inside(child: Path, folder: Path) -> bool:
    """Is ``child`` (a path) inside ``folder`` (or equal to it), following links."""
    try:
        c, f = Path(child).resolve(), Path(folder).resolve()
    except (OSError, RuntimeError):
        return False
    return c == f or f in c.parents


def check_name_fits(path: Path, flag: str, sidecars: Iterable[str] = ()) -> None:
    """Refuse a name whose temporary or sidecar names would exceed the file system's 255 bytes."""
    path = Path(path)
    names = [path.name, *sidecars]
    for name in names:
        if len(name.encode("utf-8", "surrogateescape")) > NAME_MAX:
            extra = "" if name == path.name else f" (its companion file {name[:40]}... is longer)"
            raise DivgenError(f"{flag} {path.name[:40]}...: the name is longer than {NAME_MAX} bytes{extra}: "
                              "choose a shorter name")


def _parent(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


def check_output_file(path, flag: str, *, inputs: Iterable = (), ours: Callable[[Path], bool] | None = None,
                      what: str = "divgen", overwrite: bool | None = None, sidecars: Iterable[str] = ()) -> Path:
    """Check a file output before any slow work. ``ours(path)`` says whether an existing file is this
    command's own earlier output (None: any existing file is refused unless ``overwrite``);
    ``overwrite`` None means the command has no --overwrite flag."""
    path = Path(path)
    if str(path) in ("", ".", "..") or path.name in ("", ".", ".."):
        raise DivgenError(f"{flag} {path} is not a file name: give a file path")
    check_name_fits(path, flag, sidecars)
    if path.is_symlink():
        raise DivgenError(f"{flag} {path} is a symbolic link: give the real path (divgen never writes through a link)")
    if path.is_dir():
        raise DivgenError(f"{flag} {path} is a directory: give a file path")
    parent = _parent(path)
    if not parent.is_dir():
        raise DivgenError(f"the folder of {flag} {path} does not exist: create {parent} first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DivgenError(f"cannot write in {parent} (no permission): choose another {flag}")
    for inp in inputs:
        if inp is not None and Path(inp).exists() and _same(path, Path(inp)):
            raise DivgenError(f"{flag} {path} is the input file {inp}: write to a new {flag}")
    if path.exists():
        if not path.is_file():
            raise DivgenError(f"{flag} {path} exists and is not a regular file: choose a new {flag}")
        mine = ours(path) if ours is not None else False
        if not mine and not overwrite:
            hint = " (or pass --overwrite)" if overwrite is False else ""
            raise DivgenError(f"{flag} {path} exists and is not an output of {what}: choose a new {flag}{hint}; "
                              "it is left as it is")
        if not os.access(path, os.W_OK):
            raise DivgenError(f"{flag} {path} is not writable: fix its permissions or choose another {flag}")
    return path


def check_output_dir(dest, flag: str, *, inputs: Iterable = (), ours: Callable[[Path], bool] | None = None,
                     what: str = "divgen", overwrite: bool | None = None) -> Path:
    """Check a folder output that will be replaced whole. An existing non-empty ``dest`` needs
    ``overwrite`` (when the command has the flag) and must be ``ours``; never the working folder,
    a folder above it, a symbolic link, or a folder that holds an input."""
    dest = Path(dest)
    absdest = Path(os.path.abspath(dest))
    check_name_fits(absdest, flag)
    if dest.is_symlink():
        raise DivgenError(f"{flag} {dest} is a symbolic link: give the real folder (divgen never replaces a link)")
    if dest.exists() and not dest.is_dir():
        raise DivgenError(f"{flag} {dest} exists and is not a folder: choose a new folder")
    cwd = Path.cwd()
    if dest.exists() and (_inside(cwd, dest) or dest.resolve() == Path(dest.resolve().anchor)):
        raise DivgenError(f"{flag} {dest} is the working folder or holds it: choose a new folder "
                          "(divgen never replaces the folder it runs in)")
    for inp in inputs:
        if inp is not None and Path(inp).exists() and _inside(Path(inp), dest):
            raise DivgenError(f"{flag} {dest} would hold its own input {inp}: choose another folder")
    parent = absdest.parent
    if not parent.is_dir():
        raise DivgenError(f"the folder of {flag} {dest} does not exist: create {parent} first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DivgenError(f"cannot write in {parent} (no permission): choose another {flag}")
    if dest.is_dir() and any(dest.iterdir()):
        mine = ours(dest) if ours is not None else False
        if not mine:
            shown = ", ".join(sorted(p.name for p in dest.iterdir())[:3])
            flagged = " (--overwrite replaces only an earlier output of it)" if overwrite is not None else ""
            raise DivgenError(f"{flag} {dest} holds files that {what} did not write ({shown}...): choose a new "
                              f"folder{flagged}; it is left as it is")
        if overwrite is False:
            raise DivgenError(f"{flag} {dest} is not empty: choose a new folder or pass --overwrite to replace it")
    return dest


# ---- writing -----------------------------------------------------------------------------------
def write_file_atomic(path, data: bytes | str, flag: str = "--out", legacy: Iterable[str] = ()) -> None:
    """Replace ``path`` with ``data`` atomically (module docstring); an OSError becomes one line.
    ``legacy``: glob patterns of older divgen versions' temporaries of this file, cleaned too."""
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    clean_stale(path, legacy)
    tmp = temp_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        raise DivgenError(f"cannot write {flag} {path}: {exc.strerror or exc}: choose another path") from exc
    finally:
        if os.path.lexists(tmp):
            _remove(tmp)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False when unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def swap_in_dir(tmp: Path, dest: Path) -> None:
    """Put the finished folder ``tmp`` at ``dest``; the old ``dest`` is deleted only afterwards."""
    if not os.path.lexists(dest):
        os.rename(tmp, dest)
        return
    if _exchange(tmp, dest):          # dest is now new; tmp holds the old one
        shutil.rmtree(tmp, ignore_errors=True)
        return
    aside = temp_path(dest, "old")
    os.rename(dest, aside)
    os.rename(tmp, dest)
    shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def replaced_dir(dest: Path, tag: str = "", legacy: Iterable[str] = ()) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``dest``; when the block succeeds it replaces
    ``dest`` whole (module docstring), when it fails it is removed and ``dest`` is left as it was.
    The directory gets the umask's permissions (these are ordinary outputs). ``tag`` is kept for
    callers of the older signature; ``legacy``: glob patterns of older temporaries to clean."""
    dest = Path(os.path.abspath(dest))
    clean_stale(dest, [f".{dest.name}{tag}-*", *legacy] if tag else legacy)
    tmp = temp_path(dest)
    try:
        os.mkdir(tmp, 0o777 & ~umask())
    except OSError as exc:
        raise DivgenError(f"cannot write in {dest.parent}: {exc.strerror}: choose another folder") from exc
    try:
        try:
            yield tmp
        except OSError as exc:
            raise DivgenError(f"cannot write {dest}: {exc.strerror or exc}: choose another folder") from exc
        try:
            swap_in_dir(tmp, dest)
        except OSError as exc:
            raise DivgenError(f"cannot replace {dest}: {exc.strerror}: choose another folder") from exc
    finally:
        if os.path.lexists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
