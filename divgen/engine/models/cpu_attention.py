"""The CPU decode step's attention as one native kernel (``cpu_attention.cpp``), built on first use.

A decode step's attention on CPU was two batched products per layer over a view of the cache
(``DecodeIndex.attend``'s torch path): each (slot, KV head) is a [G × hd] · [hd × span] product
(G = 3 query rows for SmolLM2), too thin for a GEMM micro-kernel, so K and V streamed at about a
third of a plain read, and bf16's oneDNN products copied the live slice first. With few-shot
prompts that was most of the step (~90 of ~143 ms at 32 slots × 400 positions, fp32). The kernel
reads each slot's K and V rows once, only the positions that slot attends to (its own length, its
sliding window), with the G query rows of a head sharing every row read, and keeps the softmax in
fp32 (bf16 / fp16 caches are widened as they are read).

It is compiled with the C++ compiler and ninja that ``torch.utils.cpp_extension`` uses (``-O3
-march=native``; about half a minute, once per machine, source and torch version, cached in
torch's extensions folder: ``native_build``). Without them, or when the build fails, the step keeps the torch path and says so once on
stderr. ``DIVGEN_CPU_ATTENTION=torch`` forces the torch path (A/B runs; no build);
``DIVGEN_CPU_ATTENTION=native`` makes a failed build an error instead of a fallback.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from divgen.engine.models import native_build

SOURCE = Path(__file__).with_name("cpu_attention.cpp")
CHOICES = ("auto", "native", "torch")
LIBRARY = native_build.Loader(
    "cpu_attention", SOURCE, "the CPU decode-attention kernel", namespace="divgen_cpu",
    required_by="DIVGEN_CPU_ATTENTION=native",
    fallback="using torch's batched products (slower with long prompts). Install g++ and ninja, or set "
             "DIVGEN_CPU_ATTENTION=torch to skip the build")


def choice() -> str:
    value = os.environ.get("DIVGEN_CPU_ATTENTION", "auto") or "auto"
    if value not in CHOICES:
        raise ValueError(f"DIVGEN_CPU_ATTENTION={value!r} is not one of {', '.join(CHOICES)}: unset it or pick one")
    return value


def native_op():
    """The native kernel's op, building it on the first call; None where it cannot be had
    (DIVGEN_CPU_ATTENTION=torch, or a failed build: one line on stderr; =native raises instead)."""
    mode = choice()
    if mode == "torch":
        return None
    lib = LIBRARY.get(required=mode == "native")
    return None if lib is None else lib.decode_attention


def usable(q: torch.Tensor) -> bool:
    """True when a decode step on ``q`` takes the native kernel (CPU, eager, a float dtype)."""
    if q.device.type != "cpu" or q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if torch.compiler.is_compiling() or q.requires_grad and torch.is_grad_enabled():
        return False
    return native_op() is not None


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                     window: int | None, scale: float) -> torch.Tensor:
    """softmax(scale · q kᵀ) v over each slot's positions [lo, pos[s]] (lo = pos - window + 1 with a
    sliding window, else 0): q [S, KVH, G, hd], k/v_cache [S, KVH, L, hd] -> [S, KVH, G, hd]."""
    return native_op()(q, k_cache, v_cache, pos, int(window or 0), float(scale))
