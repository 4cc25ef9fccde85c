"""The CPU decode step's GEMM path: weights packed once (own kernel or oneDNN), dense in and out.

A decode step multiplies [S, hidden] activations (S = a few to a few dozen slots) by every weight
matrix. Measured on this repository's machine kind (AMD EPYC with AVX-512 BF16, one thread,
torch 2.13, SmolLM2-135M shapes, interleaved, best of 5; ``benchmarks/bench_cpu_gemm.py``
reprints the comparison on any machine):

* fp32, 16 rows: oneDNN on a prepacked weight (``mkldnn._linear_pointwise``) beats ``F.linear``
  (MKL) on every shape but q|k|v, where they tie (lm_head 576 -> 49,152: 10.4 vs 44.9 ms;
  gate|up 1.2 vs 2.0 ms); at 64 rows it wins on o, gate|up and the lm_head (60 vs 113 ms) and
  loses only the down projection (1.4 vs 1.2 ms).
* bf16 (VDPBF16PS): the prepacked path wins on every shape at 16 and 64 rows (down 1536 -> 576
  at 16 rows: 0.15 vs 0.40 ms).
* The previous path (``to_mkldnn`` around every call, ``mkldnn_linear``) paid a layout
  conversion of the input and output per call and was slower than MKL on the narrow projections.

So one path won (or tied) nearly everywhere, and ``Gemm`` kept a weight packed once in oneDNN's
blocked layout and called ``_linear_pointwise`` on dense activations, with no per-call layout
conversion. That is also what vLLM's CPU backend does, and at 16 rows it ran at 62 GF/s against
~100 at 64 rows; divgen's own kernel (``cpu_gemm``: 8 × 32 register blocks over column panels, the weight
stream prefetched into L2) measured 1.29–1.43× oneDNN at 16 rows and 0.99–1.12× at 64, and ties it
at prefill sizes, so where it is built it serves fp32 and bf16 on every shape (``native``), and
oneDNN serves the rest (``packed``). ``DIVGEN_GEMM=native|packed|dense`` forces a path (A/B runs;
read once at import; ``native`` makes a failed build an error).

The packed copy is derived from the dense weights (shared with the HF model, never replaced):
``Gemm`` repacks when a source weight is changed in place (a merged LoRA adapter bumps the
tensor's version counter) or replaced. Several weights with the same input (q|k|v, gate|up) are
packed as one matrix, so one call computes the fused projection. Under ``torch.compile`` and on
other devices the dense ``F.linear`` runs (inductor does its own weight handling).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from divgen.engine.models import cpu_gemm

GEMM_PATHS = ("native", "packed", "dense")
# Row count oneDNN packs the weight for (its blocking hint; any row count runs on the packed weight).
PACK_ROWS = 16


def _forced_path() -> str | None:
    value = os.environ.get("DIVGEN_GEMM", "")
    if value and value not in GEMM_PATHS:
        raise ValueError(f"DIVGEN_GEMM={value!r} is not a GEMM path: use {' or '.join(GEMM_PATHS)}, or unset it")
    return value or None


FORCED = _forced_path()
_PATHS: dict = {}                          # dtype -> the path serving it on this CPU (found once)


def path_for(dtype: torch.dtype) -> str:
    """Which path serves a CPU weight of ``dtype``: ``native`` (``cpu_gemm``), ``packed`` (oneDNN)
    or ``dense`` (``F.linear``)."""
    if dtype not in _PATHS:
        path = "dense"
        if FORCED != "dense" and dtype in (torch.float32, torch.bfloat16):
            if FORCED in (None, "native") and cpu_gemm.supports(dtype, required=FORCED == "native"):
                path = "native"
            elif torch.backends.mkldnn.is_available() and (
                    dtype == torch.float32 or torch.ops.mkldnn._is_mkldnn_bf16_supported()):
                path = "packed"
        _PATHS[dtype] = path
    return _PATHS[dtype]


def packing_available(weight: torch.Tensor) -> bool:
    """True when ``weight``'s products run on a prepacked path (never while compiling)."""
    if torch.compiler.is_compiling() or weight.device.type != "cpu":
        return False
    return path_for(weight.dtype) != "dense"


class Gemm:
    """``x @ cat(weights)ᵀ + cat(biases)`` on a packed copy of the weights (``path_for`` picks the
    kernel), rebuilt when a source weight changes. Not a module (nothing new in ``state_dict``); a
    deepcopy drops the packed copy (oneDNN tensors are opaque) and repacks on first use."""

    def __init__(self):
        self._packed = self._bias = self._key = self._native = None
        self._out = 0

    def __deepcopy__(self, memo):
        return Gemm()

    @staticmethod
    def key(weights) -> tuple:
        # inference tensors keep no version counter (and cannot be changed outside inference mode)
        return tuple((w.data_ptr(), -1 if w.is_inference() else w._version) for w in weights)

    def __call__(self, x: torch.Tensor, weights, biases) -> torch.Tensor:
        key = Gemm.key(weights)
        if key != self._key:
            self._pack(weights, biases)
            self._key = key
        if self._native:
            return cpu_gemm.linear(x, self._packed, self._out, self._bias)
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, self._bias, "none", [], "")

    def _pack(self, weights, biases) -> None:
        with torch.no_grad():
            w = weights[0].detach() if len(weights) == 1 else torch.cat([t.detach() for t in weights])
            self._native = path_for(w.dtype) == "native"
            self._out = w.shape[0]
            self._packed = (cpu_gemm.pack(w) if self._native
                            else torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), PACK_ROWS))
            if any(b is not None for b in biases):
                self._bias = torch.cat([b.detach() if b is not None else w.new_zeros(t.shape[0])
                                        for t, b in zip(weights, biases)])
                if self._native:
                    self._bias = self._bias.float()
            else:
                self._bias = None


def fused_linear(gemm: Gemm, x: torch.Tensor, linears) -> torch.Tensor:
    """The outputs of ``linears`` (plain ``nn.Linear`` of the same input size) side by side, one
    product: [..., Σ out_features]. Dense ``F.linear`` per layer where packing does not apply."""
    weights = [m.weight for m in linears]
    if packing_available(weights[0]) and x.dtype == weights[0].dtype:
        return gemm(x, weights, [m.bias for m in linears])
    if len(linears) == 1:
        return F.linear(x, weights[0], linears[0].bias)
    return torch.cat([F.linear(x, m.weight, m.bias) for m in linears], dim=-1)
