"""Pass 1: each row's log-normaliser lse and α threshold, from its logits.

Pass 1 (``_stats_kernel``, one program per (row, chunk)) keeps an online (max, Σ exp) per
lane and reduces once; ``_row_stats_kernel`` combines the ≤ 64 chunk partials into lse [R]
and the α threshold cut = max + log α [R].
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _stats_kernel(
    logits_ptr, stride_logits,
    part_max_ptr, part_sum_ptr,                                   # out: [R, num_chunks] fp32
    vocab, chunk_len, num_chunks,
    BLOCK_V: tl.constexpr,
):
    """Pass 1, per (row, chunk): max logit and Σ exp(l − max), online over the chunk's tiles."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    base = logits_ptr + row.to(tl.int64) * stride_logits
    run_max = tl.full([BLOCK_V], float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros([BLOCK_V], dtype=tl.float32)
    v_begin = chunk * chunk_len
    v_end = tl.minimum(v_begin + chunk_len, vocab)
    for start in range(v_begin, v_end, BLOCK_V):       # per-lane online (max, sum): no reduction
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < v_end, other=float("-inf")).to(tl.float32)
        x = tl.minimum(x, 65504.0)                   # reference.LOGIT_MAX
        new_max = tl.maximum(run_max, x)
        ref = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - ref) + tl.exp(x - ref)
        run_max = new_max
    top = tl.max(run_max, axis=0)
    ref = tl.where(top == float("-inf"), 0.0, top)
    total = tl.sum(run_sum * tl.exp(run_max - ref), axis=0)
    tl.store(part_max_ptr + row * num_chunks + chunk, top)
    tl.store(part_sum_ptr + row * num_chunks + chunk, total)


@triton.jit
def _row_stats_kernel(
    part_max_ptr, part_sum_ptr, cutoff_ptr,
    lse_ptr, cut_ptr,                                             # out: [R] fp32
    rows_total, num_chunks,
    BLOCK_R: tl.constexpr, C_BLOCK: tl.constexpr,
):
    """Combine the chunk partials: lse = max + log Σ, cut = max + log α (the α threshold).

    A row with no finite logit (a slot not in use) gets lse 0: its logits stay −inf, masked
    everywhere when mixed (the reference's rule), never NaN."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < rows_total
    lse, cut = _combine_stats(r, rmask, part_max_ptr, part_sum_ptr, cutoff_ptr, num_chunks, C_BLOCK)
    tl.store(lse_ptr + r, lse, mask=rmask)
    tl.store(cut_ptr + r, cut, mask=rmask)


@triton.jit
def _combine_stats(rows, valid, part_max_ptr, part_sum_ptr, cutoff_ptr, num_chunks, C_BLOCK: tl.constexpr):
    """The rows' (lse, cut) from their chunk partials, for ``_row_stats_kernel`` and for the first
    sample pass that combines the stats itself (the same ops wherever it runs)."""
    c = tl.arange(0, C_BLOCK)
    mask = valid[:, None] & (c < num_chunks)[None, :]
    offs = rows[:, None] * num_chunks + c[None, :]
    pmax = tl.load(part_max_ptr + offs, mask=mask, other=float("-inf"))
    psum = tl.load(part_sum_ptr + offs, mask=mask, other=0.0)
    row_max = tl.max(pmax, axis=1)
    ref = tl.where(row_max == float("-inf"), 0.0, row_max)
    total = tl.sum(psum * tl.exp(pmax - ref[:, None]), axis=1)
    lse = tl.where(row_max == float("-inf"), 0.0, ref + tl.log(tl.where(total > 0, total, 1.0)))
    return lse, row_max + tl.load(cutoff_ptr + rows, mask=valid, other=0.0)
