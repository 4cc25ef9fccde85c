"""Compiling the CPU kernels written in C++ (``cpu_attention.cpp``, ``cpu_gemm.cpp``,
``kernels/cpu_sample.cpp``) on first use.

Each source is compiled with the C++ compiler and ninja that ``torch.utils.cpp_extension`` uses
(``-O3 -march=native``: the kernels are written for the vector width of the machine they run on)
into a library of torch ops, once per machine, source, flags, torch and Python version, and cached
under torch's extensions folder (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``);
a ``built`` marker is written only after a whole build, so a killed build is never loaded.
"""
from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
from pathlib import Path

import torch


def flags() -> list[str]:
    # fp-contract: the ISO dialect torch builds in turns a*b+c -> FMA off; 512-bit vectors where the CPU
    # has them (GCC prefers 256-bit ones on some AVX-512 parts)
    out = ["-O3", "-fopenmp", "-ffp-contract=fast"]
    if platform.machine() in ("x86_64", "AMD64"):
        out += ["-march=native", "-mprefer-vector-width=512"]
    return out


def build_dir(name: str, source: Path) -> Path:
    """Where ``source`` with these flags, this torch and this Python builds to: one folder each, so
    virtual environments with other torch versions never load each other's builds."""
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    key = hashlib.sha256("\0".join([source.read_text(), *flags(), torch.__version__, sys.version,
                                     platform.machine()]).encode()).hexdigest()[:16]
    return root / "divgen" / f"{name}-{key}"


def load(name: str, source: Path, what: str) -> None:
    """Load the library built from ``source`` (its ops land in ``torch.ops``), compiling it first
    with one line on stderr (``what`` names the kernel) when no finished build exists."""
    folder = build_dir(name, source)
    library = f"divgen_{name}"
    if (folder / "built").exists():
        torch.ops.load_library(str(folder / f"{library}.so"))
        return
    from torch.utils import cpp_extension

    print(f"divgen: compiling {what} (once per machine and torch version, about half a minute)",
          file=sys.stderr, flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(name=library, sources=[str(source)], extra_cflags=flags(), extra_ldflags=["-fopenmp"],
                       build_directory=str(folder), is_python_module=False, verbose=False)
    (folder / "built").write_text("ok\n")


def first_error_line(e: Exception) -> str:
    """The line of a failed build that says why (the compiler's ``error:`` line), else the last."""
    lines = str(e).strip().splitlines() or [type(e).__name__]
    return next((ln.strip() for ln in lines if "error:" in ln), lines[-1])


class Loader:
    """One native library (``cpu_gemm``, ``cpu_attention``, ``cpu_sample``), built on the first
    ``get`` and loaded once per process (thread-safe).

    ``get()`` returns the library's ``torch.ops`` namespace, or None where it cannot be had: the
    first failure prints one line on stderr (``what`` failed to build, ``fallback`` says what runs
    instead) and is not retried. ``get(required=True)`` raises instead, naming ``required_by``."""

    def __init__(self, name: str, source: Path, what: str, fallback: str, required_by: str,
                 namespace: str | None = None):
        self.name, self.source, self.what = name, source, what
        self.namespace = namespace or f"divgen_{name}"          # the source's TORCH_LIBRARY name
        self.fallback, self.required_by = fallback, required_by
        self._lock = threading.Lock()
        self.state: dict = {}             # "ops": the namespace or None; "error": why it is None

    def build(self):
        load(self.name, self.source, self.what)
        return getattr(torch.ops, self.namespace)

    def get(self, required: bool = False):
        if "ops" in self.state and not (required and self.state["ops"] is None):
            return self.state["ops"]
        with self._lock:
            if "ops" not in self.state:
                try:
                    self.state.update(ops=self.build(), error=None)
                except Exception as e:       # noqa: BLE001 (no compiler, no ninja, a failed build)
                    self.state.update(ops=None, error=first_error_line(e))
                    if not required:
                        print(f"divgen: {self.what} did not build ({self.state['error'][:200]}); {self.fallback}",
                              file=sys.stderr)
            if required and self.state["ops"] is None:
                raise RuntimeError(f"{self.required_by} but {self.what} did not build: {self.state['error']}")
            return self.state["ops"]
