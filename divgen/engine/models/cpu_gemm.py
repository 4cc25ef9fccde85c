"""The CPU decode step's weight products as one native kernel (``cpu_gemm.cpp``), built on first use.

A decode step multiplies a few dozen activation rows by every weight matrix. oneDNN's kernels on a
prepacked weight (``mkldnn._linear_pointwise``, the path vLLM's CPU backend also takes) ran a
SmolLM2 step's products at 62 GF/s at 16 rows in fp32, where the same products reach ~100 GF/s
at 64 rows; this kernel walks column panels of 32 outputs with an
8-row × 32-column register block and prefetches the weight stream into L2, and on this
repository's machine kind (AMD EPYC with AVX-512 BF16, one thread, SmolLM2-135M shapes) it
measured 1.29–1.43× oneDNN at 16 rows in fp32 (1.13–1.59× in bf16), 0.99–1.12× at 64 rows, and
ties it at prefill sizes (0.88–1.16× at 512) (``benchmarks/bench_cpu_gemm.py`` reprints the table on any machine).

Kernels exist for fp32 (AVX-512F) and bf16 (AVX-512 BF16's VDPBF16PS); ``supports(dtype)`` says
which this build has. It is compiled like the attention kernel (``native_build``); without a
compiler, or on a CPU without AVX-512, the step keeps oneDNN (``models.packed``) and says so once.
"""
from __future__ import annotations

from pathlib import Path

import torch

from divgen.engine.models import native_build

SOURCE = Path(__file__).with_name("cpu_gemm.cpp")
LIBRARY = native_build.Loader(
    "cpu_gemm", SOURCE, "the CPU GEMM kernel", namespace="divgen_gemm", required_by="DIVGEN_GEMM=native",
    fallback="using oneDNN's. Install g++ and ninja, or set DIVGEN_GEMM=packed to skip the build")


def ops(required: bool = False):
    """The kernel's ops (``supports``, ``pack``, ``linear``, ``rms_norm``), building them on the
    first call; None where they cannot be had (one line on stderr), or an error when ``required``."""
    return LIBRARY.get(required)


def supports(dtype: torch.dtype, required: bool = False) -> bool:
    """True when this machine's build has a kernel for ``dtype``."""
    lib = ops(required)
    return lib is not None and bool(lib.supports(dtype))


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [out, in] in the kernel's panel layout (a plain tensor, about the weight's size)."""
    return ops().pack(weight)


def linear(x: torch.Tensor, packed: torch.Tensor, out_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weightᵀ + bias`` for the weight ``packed`` came from: [..., in] -> [..., out_features]."""
    return ops().linear(x, packed, out_features, bias)


def norm_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when ``rms_norm`` serves ``x`` (CPU, eager, no autograd, fp32 or bf16, the kernel built)."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or torch.compiler.is_compiling():
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    return ops() is not None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool) -> torch.Tensor:
    """The model's RMSNorm (``llama.RMSNorm``) in one native pass over each row."""
    return ops().rms_norm(x, weight, float(eps), bool(unit_offset))
