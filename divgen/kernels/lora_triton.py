"""Multi-LoRA shrink / expand (BGMV/SGMV style): every row of a batch with its own adapter.

Derivation
----------
For row i with adapter j = indices[i] (-1 = none), a LoRA linear layer adds

    y[i] += scales[j] · B_j (A_j x[i])        A_j = lora_a[j] [R, H_in],  B_j = lora_b[j] [H_out, R]

Computed as two thin matmuls through the rank-R bottleneck (R ≪ H): shrink t = scale · x Aᵀ
([N, H_in] -> [N, R], fp32) and expand y += t Bᵀ ([N, R] -> [N, H_out]). Rows that share an
adapter share its weights, so rows are grouped by adapter and each program multiplies a block
of same-adapter rows by one adapter's weight tile with ``tl.dot``.

Grouping, once per batch composition: ``build_lora_plan(indices, L)`` (host side; the engine's
multi-LoRA wrapper builds it in ``set_batch``, not in every layer call) sorts the rows by adapter
(stable) and lists the launch tiles: each ≤ BLOCK_M rows of one adapter's segment of that order.
The grid is ``(tiles, …)``: every program has rows, so a batch that uses 2 of 64 adapters
launches 2 + N / BLOCK_M programs, not 64 · cdiv(N, BLOCK_M) mostly empty ones. The per-layer
call reads no value back to the host, so it can be captured in a CUDA graph. Rows with index -1
fall in no tile and are never touched. A call without a plan builds one first (a host sync).

Bytes (the floor; both halves are memory-bound for R ≪ H): shrink reads x once per segment
block and A_j once per block of its segment, writes N·R fp32; expand reads t, B_j per block and
reads + writes y. For decode (N small) the adapter weights dominate: ≈ (adapters used)·R·
(H_in + H_out) elements; for prefill the activations dominate: ≈ N·(H_in + 2·H_out).

Split-K (decode): with few rows there are only (adapters used) shrink programs, each reading
all of A_j [R, H_in]. ``add_lora`` then splits H_in over SPLIT_K programs that write fp32
partials t_s [SPLIT_K, N, R]; the expand kernel sums the partials as it loads t, so there are
no atomics, the result is deterministic, and it is still one launch pair.

Precision: products accumulate in fp32 (bf16/fp16 operands go to ``tl.dot`` as they are;
fp32 operands use ``input_precision="ieee"``, not tf32). t stays fp32; y is loaded, the delta
added in fp32, and rounded to y's dtype once — the same arithmetic as ``reference.add_lora``
up to summation order. The Triton interpreter (TRITON_INTERPRET=1, CPU tests) computes
``tl.dot`` on bf16 inputs wrongly, so under it the operands are cast to fp32 first.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from divgen.kernels import reference
from divgen.kernels.reference import LoraPlan, check_add_lora_args, check_lora_expand_args, check_lora_shrink_args

__all__ = ["lora_shrink", "lora_expand", "add_lora", "build_lora_plan"]


@triton.jit
def _lora_shrink_kernel(
    x_ptr, a_ptr, t_ptr, scales_ptr, order_ptr, tile_adapter_ptr, tile_start_ptr, tile_end_ptr,
    H_in, R, K_PER_SPLIT,
    stride_xn, stride_xh,
    stride_al, stride_ar, stride_ah,
    stride_ts, stride_tn, stride_tr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Program (tile, s): t_s[rows] = scales[j] · x[rows, K_s] @ A_j[:, K_s]ᵀ for the tile's
    block of adapter j's rows and the s-th slice K_s of H_in (every program has rows)."""
    tile = tl.program_id(0)
    pid_k = tl.program_id(1)
    lora = tl.load(tile_adapter_ptr + tile)
    first = tl.load(tile_start_ptr + tile)
    seg_hi = tl.load(tile_end_ptr + tile)

    offs_m = first + tl.arange(0, BLOCK_M)
    mask_m = offs_m < seg_hi
    rows = tl.load(order_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)      # [BLOCK_M]
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, H_in)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None] * stride_xn + (k_lo + offs_k)[None, :] * stride_xh  # [BLOCK_M, BLOCK_K]
    a_ptrs = (a_ptr + lora.to(tl.int64) * stride_al
              + offs_r[None, :] * stride_ar + (k_lo + offs_k)[:, None] * stride_ah)    # [BLOCK_K, BLOCK_R] = A_jᵀ

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        mask_k = offs_k < k_hi - k0
        xt = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        at = tl.load(a_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        if DOT_IN_FP32:
            xt = xt.to(tl.float32)
            at = at.to(tl.float32)
        acc = tl.dot(xt, at, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xh
        a_ptrs += BLOCK_K * stride_ah

    acc = acc * tl.load(scales_ptr + lora).to(tl.float32)
    t_ptrs = t_ptr + pid_k * stride_ts + rows[:, None] * stride_tn + offs_r[None, :] * stride_tr
    tl.store(t_ptrs, acc, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _lora_expand_kernel(
    t_ptr, b_ptr, y_ptr, order_ptr, tile_adapter_ptr, tile_start_ptr, tile_end_ptr,
    H_out, R, SPLIT_K,
    stride_ts, stride_tn, stride_tr,
    stride_bl, stride_bh, stride_br,
    stride_yn, stride_yh,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Program (tile, n): y[rows, cols] += (Σ_s t_s[rows]) @ B_j[cols]ᵀ for the tile's block of
    adapter j's rows and the n-th block of H_out."""
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    lora = tl.load(tile_adapter_ptr + tile)
    first = tl.load(tile_start_ptr + tile)
    seg_hi = tl.load(tile_end_ptr + tile)

    offs_m = first + tl.arange(0, BLOCK_M)
    mask_m = offs_m < seg_hi
    rows = tl.load(order_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)      # [BLOCK_M]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < H_out
    b_base = b_ptr + lora.to(tl.int64) * stride_bl

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        t_ptrs = t_ptr + rows[:, None] * stride_tn + offs_r[None, :] * stride_tr   # [BLOCK_M, BLOCK_R]
        tt = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for s in range(0, SPLIT_K):  # sum shrink's split-K partials (SPLIT_K = 1: plain t)
            tt += tl.load(t_ptrs + s * stride_ts, mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        bt = tl.load(b_base + offs_n[None, :] * stride_bh + offs_r[:, None] * stride_br,
                     mask=mask_r[:, None] & mask_n[None, :], other=0.0).to(tl.float32)  # [BLOCK_R, BLOCK_N] = B_jᵀ
        acc = tl.dot(tt, bt, acc, input_precision="ieee")

    y_ptrs = y_ptr + rows[:, None] * stride_yn + offs_n[None, :] * stride_yh
    mask = mask_m[:, None] & mask_n[None, :]
    y_old = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y_old + acc).to(y_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Wrappers: check, group rows by adapter on the device, launch.
# ---------------------------------------------------------------------------------------------

_BLOCK_K = 128          # shrink: H_in tile (64 for fp32: 3 pipeline stages of fp32 x and A tiles
                        # at rank 128 would need 192 KB of shared memory, over sm_80's 163 KB)
_BLOCK_N = 128          # expand: H_out tile
_MIN_DOT = 16           # tl.dot needs every block dimension >= 16
_MAX_BLOCK_R = 64       # rank tile; larger ranks loop over it
_SPLIT_K_MIN_SLICE = 512  # split-K: no slice of H_in shorter than this


# Read once: TRITON_INTERPRET only has an effect when set before triton is imported.
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _block_m(rows: int) -> int:
    """Rows per program: small for decode (segments are a few rows), larger for prefill."""
    if rows <= 256:
        return 16
    return 32 if rows <= 2048 else 64


def shrink_config(block_m: int, rank: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_K, BLOCK_R, num_warps) of the shrink kernel. Prefill tiles (BLOCK_M 64) take
    BLOCK_K 64 (half of it at rank 128) and 8 warps, ranks from 64 take 8 warps, fp32 halves BLOCK_K:
    with 128 / 4 warps the shrink at BLOCK_M 64
    spilled 96 B (rank 8) to 3.5 KB (rank 128) a thread on sm_90, and fp32 at rank 128 needed
    192 KB of shared memory, over sm_80's 163 KB (tests/test_kernels_compile.py)."""
    block_r = max(_MIN_DOT, triton.next_power_of_2(rank))
    block_k = _BLOCK_K if block_m < 64 else _BLOCK_K // 2
    if block_m * block_r >= 8192 or block_r >= 128:
        block_k //= 2
    if dtype == torch.float32:
        block_k //= 2
    warps = 8 if block_m >= 64 or block_r >= 64 else 4
    return block_k, block_r, warps


def expand_config(block_m: int, rank: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_R, num_warps) of the expand kernel: prefill tiles (BLOCK_M 64) take
    BLOCK_N 64 and rank steps of 32 (with 128 / 64 the rank-64+ expand spilled 0.7-3.9 KB a
    thread on sm_80)."""
    if block_m < 64:
        return _BLOCK_N, _block_r(rank), 8 if block_m * _BLOCK_N >= 2048 else 4
    return _BLOCK_N // 2, min(_block_r(rank), 32), 8


def _block_r(rank: int) -> int:
    return min(max(_MIN_DOT, triton.next_power_of_2(rank)), _MAX_BLOCK_R)


def _default_split_k(rows: int, h_in: int) -> int:
    """Split H_in across programs only in decode, where few row blocks leave the GPU idle."""
    if rows > 64:
        return 1
    return max(1, min(8, h_in // _SPLIT_K_MIN_SLICE))


@dataclass(frozen=True)
class LoraTiles:
    """Launch tiles of a LoRA plan: tile t is order[start[t]:end[t]] (≤ block_m rows of one adapter)."""
    block_m: int
    adapter: torch.Tensor     # [T] int32
    start: torch.Tensor       # [T] int32
    end: torch.Tensor         # [T] int32

    @property
    def count(self) -> int:
        return self.adapter.shape[0]


def build_lora_plan(indices: torch.Tensor, num_adapters: int) -> LoraPlan:
    """Rows grouped by adapter plus the launch tiles, on the host once per batch composition.

    Only blocks that hold rows are launched: (used adapters + rows / BLOCK_M) programs at most,
    none of which exits at once (the plan-less grid was L · cdiv(N, BLOCK_M), mostly empty)."""
    plan = reference.build_lora_plan(indices, num_adapters)
    block_m = _block_m(plan.rows)
    adapter, start, end = [], [], []
    for j in plan.used:
        lo, hi = plan.bounds[j], plan.bounds[j + 1]
        for first in range(lo, hi, block_m):
            adapter.append(j)
            start.append(first)
            end.append(hi)
    dev = indices.device
    as_tensor = lambda v: torch.tensor(v, dtype=torch.int32, device=dev)  # noqa: E731
    tiles = LoraTiles(block_m=block_m, adapter=as_tensor(adapter), start=as_tensor(start), end=as_tensor(end))
    return LoraPlan(**{**plan.__dict__, "tiles": tiles})


def _plan_for(plan: LoraPlan | None, indices: torch.Tensor, num_adapters: int) -> LoraPlan:
    """The caller's plan (checked against the call), or one built now (a host sync)."""
    if plan is None:
        return build_lora_plan(indices, num_adapters)
    reference._check_plan(plan, indices, num_adapters)
    if plan.tiles is None:
        raise ValueError("this LoRA plan has no Triton launch tiles: build it with "
                         "divgen.kernels.build_lora_plan on the device that runs the kernels")
    return plan


def _shrink_partials(x, lora_a, scales, plan: LoraPlan, split_k: int) -> torch.Tensor:
    """Launch the shrink kernel; returns fp32 partials [split_k, N, R] (rows with -1 are 0)."""
    rows, h_in = x.shape
    num_adapters, rank, _ = lora_a.shape
    t = torch.zeros(split_k, rows, rank, dtype=torch.float32, device=x.device)    # [S, N, R]
    tiles = plan.tiles
    if rows == 0 or num_adapters == 0 or rank == 0 or tiles.count == 0:
        return t
    if rank > 128:
        raise ValueError(f"lora_shrink supports ranks up to 128 (one tile), got R = {rank}")
    block_k, block_r, warps = shrink_config(tiles.block_m, rank, x.dtype)
    k_tiles = triton.cdiv(h_in, block_k)
    split_k = max(1, min(split_k, k_tiles))
    k_per_split = triton.cdiv(k_tiles, split_k) * block_k
    grid = (tiles.count, triton.cdiv(h_in, k_per_split))
    fp32 = x.dtype == torch.float32
    _lora_shrink_kernel[grid](
        x, lora_a, t, scales, plan.order, tiles.adapter, tiles.start, tiles.end,
        h_in, rank, k_per_split,
        x.stride(0), x.stride(1),
        lora_a.stride(0), lora_a.stride(1), lora_a.stride(2),
        t.stride(0), t.stride(1), t.stride(2),
        BLOCK_M=tiles.block_m, BLOCK_K=block_k, BLOCK_R=block_r,
        DOT_IN_FP32=fp32 or _INTERPRETING,
        DOT_PRECISION="ieee" if fp32 or _INTERPRETING else "tf32",
        num_warps=warps,
    )
    return t


def _expand_from_partials(y, t_parts, lora_b, plan: LoraPlan) -> torch.Tensor:
    """Launch the expand kernel: y[i] += lora_b[j] @ Σ_s t_parts[s, i], in place."""
    rows, h_out = y.shape
    num_adapters, _, rank = lora_b.shape
    tiles = plan.tiles
    if rows == 0 or num_adapters == 0 or rank == 0 or h_out == 0 or tiles.count == 0:
        return y
    block_n, block_r, warps = expand_config(tiles.block_m, rank)
    grid = (tiles.count, triton.cdiv(h_out, block_n))
    _lora_expand_kernel[grid](
        t_parts, lora_b, y, plan.order, tiles.adapter, tiles.start, tiles.end,
        h_out, rank, t_parts.shape[0],
        t_parts.stride(0), t_parts.stride(1), t_parts.stride(2),
        lora_b.stride(0), lora_b.stride(1), lora_b.stride(2),
        y.stride(0), y.stride(1),
        BLOCK_M=tiles.block_m, BLOCK_N=block_n, BLOCK_R=block_r, num_warps=warps,
    )
    return y


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, indices: torch.Tensor, scales: torch.Tensor,
                plan: LoraPlan | None = None) -> torch.Tensor:
    """Per-row adapter down-projection, scaled (Triton).

    Semantics:
        t = zeros(N, R, fp32)
        for i in range(N):
            j = indices[i]
            if j >= 0:
                t[i] = scales[j] * (lora_a[j] @ x[i])

    Args:
        x:       [N, H_in]     fp32 / bf16 / fp16
        lora_a:  [L, R, H_in]  same dtype as x (stacked lora_A.weight, rank zero-padded to R ≤ 128)
        indices: [N] int64     adapter slot per row, -1 = no adapter (checked to be < L except on CUDA)
        scales:  [L] fp32      lora_alpha / r per adapter
    Returns:
        t: [N, R] fp32, new tensor (rows with index -1 are 0). Nothing is modified in place.
    """
    check_lora_shrink_args(x, lora_a, indices, scales)
    plan = _plan_for(plan, indices, lora_a.shape[0])
    return _shrink_partials(x, lora_a, scales, plan, split_k=1)[0]


def lora_expand(y: torch.Tensor, t: torch.Tensor, lora_b: torch.Tensor, indices: torch.Tensor,
                plan: LoraPlan | None = None) -> torch.Tensor:
    """Per-row adapter up-projection, added into y in place (Triton).

    Semantics:
        for i in range(N):
            j = indices[i]
            if j >= 0:
                y[i] += lora_b[j] @ t[i]          # in fp32, rounded to y's dtype once

    Args:
        y:       [N, H_out]     fp32 / bf16 / fp16, modified IN PLACE (any strides)
        t:       [N, R] fp32    output of ``lora_shrink``
        lora_b:  [L, H_out, R]  same dtype as y (stacked lora_B.weight, rank zero-padded to R)
        indices: [N] int64      adapter slot per row, -1 = no adapter (row left untouched)
    Returns:
        y (the same tensor).
    """
    check_lora_expand_args(y, t, lora_b, indices)
    plan = _plan_for(plan, indices, lora_b.shape[0])
    return _expand_from_partials(y, t.unsqueeze(0), lora_b, plan)


def add_lora(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
             indices: torch.Tensor, scales: torch.Tensor, plan: LoraPlan | None = None) -> torch.Tensor:
    """Multi-LoRA delta of one linear layer, every row with its own adapter or none (Triton).

    One sort + one shrink launch + one expand launch; no host sync on CUDA.

    Semantics:
        for i in range(N):
            j = indices[i]
            if j >= 0:
                y[i] += scales[j] * (lora_b[j] @ (lora_a[j] @ x[i]))

    Args:
        y:       [N, H_out]     same dtype as x, modified IN PLACE (any strides)
        x:       [N, H_in]      fp32 / bf16 / fp16 (N = rows x new positions, flattened)
        lora_a:  [L, R, H_in]   stacked lora_A.weight, rank zero-padded to the max rank R ≤ 128
        lora_b:  [L, H_out, R]  stacked lora_B.weight
        indices: [N] int64      adapter slot per row, -1 = no adapter (row left untouched)
        scales:  [L] fp32       lora_alpha / r per adapter
    Returns:
        y (the same tensor). The intermediate x @ Aᵀ stays in fp32; y is rounded once.
    """
    return _add_lora(y, x, lora_a, lora_b, indices, scales, split_k=None, plan=plan)


def _add_lora(y, x, lora_a, lora_b, indices, scales, *, split_k: int | None, plan: LoraPlan | None = None):
    """``add_lora`` with the split-K choice exposed (None: the decode/prefill heuristic)."""
    check_add_lora_args(y, x, lora_a, lora_b, indices, scales)
    plan = _plan_for(plan, indices, lora_a.shape[0])
    if split_k is None:
        split_k = _default_split_k(x.shape[0], x.shape[1])
    t_parts = _shrink_partials(x, lora_a, scales, plan, split_k)      # [S, N, R]
    return _expand_from_partials(y, t_parts, lora_b, plan)
