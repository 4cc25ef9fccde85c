"""Fused guided sampling (CorrSynth, CFG, plain) from logits, in Triton.

Same signature and same tokens as ``divgen.kernels.reference.guided_sample`` (DESIGN.md, "The
math"); the reference's docstring is the contract. Layout of this file: derivation → kernels →
host side (block form of ``mix``, launch plan, wrapper).

Derivation
----------
For a row m of a guidance group G(m) (the rows that ``mix`` couples to m, found as connected
components of its non-zero pattern), with W the group's block of ``mix``:

    ℓ_n(v)  = l_n(v) − lse_n,   lse_n = max_n + log Σ_u exp(l_n(u) − max_n)     log_softmax
    s_m(v)  = Σ_{n ∈ G(m)} W[m, n] · max(ℓ_n(v), FLOOR)                        guided scores
    z_m(v)  = s_m(v) · (1 / T_m)   if l_m(v) finite and l_m(v) ≥ max_m + log α_m,   else −inf
    x_m     = argmax_v z'_m(v) + G_m(v)     (T_m = 0: no G; z' = z after top-k / top-p)

FLOOR is ``LOGP_FLOOR`` when a ``mix`` is given and −inf when ``mix`` is None (the reference
clamps only when it mixes; −inf then changes nothing).

1. Before z can be formed only two numbers per row are needed, (max_n, lse_n): pass 1 reads the
   logits once and keeps an online (max, Σ exp) per (row, vocabulary chunk). Every later kernel
   combines the ≤ 64 chunk partials of its rows itself (no extra launch).
2. z of all rows of a group at token v needs the group's g logits at v. A program owns a
   (group, vocabulary chunk): one 2-D load per tile reads the g rows, and W mixes them in
   registers (broadcast multiply-sum below 16 rows, an fp32 ``tl.dot`` from 16 on). Cost g·V
   multiply-adds per row; entries of ``mix`` across groups are zero and never touched, so there
   is no R·R·V work. The α test reads the same tile (a row's own logits).
3. Gumbel-max needs no softmax: pass 2 keeps a running (best score, smallest token id) per lane,
   reduced per (row, chunk) at the end; a tiny kernel reduces the chunks (ties → smallest token
   id, as torch.argmax). The log-prob of the choice needs log Σ exp z', accumulated online in the
   same pass. Two exact shortcuts: a tile with no token in any row's α set is skipped after its
   load, and a tile whose max z plus the largest possible noise (16.64 for 24-bit uniforms)
   cannot reach any row's best so far skips the noise. With α > 0 most tiles are skipped.
4. top-k and top-p are thresholds on z: keep v iff the measure of tokens strictly above z(v) is
   below a bound (count < k; probability mass < top_p · total). The exact threshold is found
   without sorting, by bisection over the order-preserving int32 keys of fp32 values: a counting
   pass measures 15 pivots at once and narrows the key interval 16×, so 8 passes pin it. Mass is
   accumulated with an online max (like softmax), so its normaliser needs no extra pass.
5. Noise: u = (2·(h >> 9) + 1) / 2^24 with h = fmix32(fmix32(v ^ k1) ^ k2), in uint32 inside
   the kernel; the row keys (k1, k2) come from ``reference.noise_keys`` on the host, so the bits
   equal ``reference.uniform_noise`` exactly (``uniform_noise`` below exposes them).

Passes over the logits (each reads the group's rows once):
    basic path (guidance, α, temperature, greedy rows, log-probs)     2   (stats, sample)
    + top-k on any row                                              + 8   counting passes
    + top-p on any row                                              + 8   counting passes
Launches: 3, plus 2 per counting pass (count, narrow); no host syncs between them, so
``launch_guided_sample`` can be captured in a CUDA graph. The host side of ``guided_sample``
syncs a few times (argument checks incl. a NaN scan, the block form of ``mix``).

Cost (sm_90 PTX, counted): pass 1 ~20 instructions a logit; pass 2 ~20 for a greedy or skipped
logit, ~110 for a sampled one (the hash and two libdevice-accurate logs, kept accurate so that
−log(u) stays exact near u = 1). Pass 2 over fully sampled rows (α = 0, flat z) is therefore
compute-bound, not memory-bound.

Equality with the reference: with the same noise the tokens are those of the reference except
where two scores lie within float rounding (~1e-6 relative) of each other: s is summed in another
order, 1/T multiplies instead of dividing, and the GPU's log differs from torch's in the last bit.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from divgen.kernels.reference import LOGP_FLOOR, check_guided_sample_args, noise_keys

NUM_PIVOTS = 16            # measure columns per counting pass: 0 = total, 1..15 = pivots
THRESHOLD_PASSES = 8       # 32 key bits / log2(NUM_PIVOTS) bits per pass
KEY_BELOW_ALL = -(2**31) - 1   # an int64 below every int32 key: the bisection's first lower end
GUMBEL_MAX = 17.0              # > −log(−log(1 − 2^-24)) = 16.64, the largest Gumbel of the noise
MAX_CHUNKS = 64            # vocabulary chunks per group (later kernels combine them in one tile)
MAX_GROUP_ROWS = 256       # rows in one guidance group
# (BLOCK_V, num_warps) by G_BLOCK on a GPU. Compiled for sm_90, the sample pass needs 40 (1 row),
# 48-80 (2-8 rows), ~110 (16 rows), ~155 (32 rows) registers a thread without spills; from 64
# rows it spills. The top-k/top-p counting pass is heavier (up to 255 registers, 15 pivots a tile).
CUDA_TILES = {1: (2048, 8), 2: (512, 8), 4: (256, 8), 8: (64, 8), 16: (64, 8), 32: (32, 8)}
CUDA_TILE_LARGE_GROUPS = (16, 16)
TILE_ELEMS_CPU = 1024      # G_BLOCK · BLOCK_V under TRITON_INTERPRET=1 (the interpreter is per-op)


# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _fmix32(h):
    """murmur3's finaliser on uint32: shifts are logical, products wrap modulo 2^32."""
    h = h ^ (h >> 16)
    h = h * 0x85EBCA6B
    h = h ^ (h >> 13)
    h = h * 0xC2B2AE35
    h = h ^ (h >> 16)
    return h


@triton.jit
def _uniform(key1, key2, token):
    """uint32 row keys and token ids -> the uniforms of ``reference.uniform_noise``, fp32."""
    h = _fmix32(_fmix32(token ^ key1) ^ key2)
    return ((h >> 9) * 2 + 1).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit
def _ordered_key(z):
    """fp32 -> int32 with the same order (−0.0 first made +0.0 so that equal values share a key)."""
    z = tl.where(z == 0.0, 0.0, z)
    bits = z.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _group_rows(group_rows_ptr, group_size_ptr, group, G_BLOCK: tl.constexpr):
    """Row ids [G_BLOCK] of a group (0 where padded), the mask of real rows, and the group size."""
    gi = tl.arange(0, G_BLOCK)
    size = tl.load(group_size_ptr + group)
    row_mask = gi < size
    rows = tl.load(group_rows_ptr + group * G_BLOCK + gi, mask=row_mask, other=0)
    return rows, row_mask, size


@triton.jit
def _row_stats(part_max_ptr, part_sum_ptr, rows, row_mask, num_chunks, C_BLOCK: tl.constexpr):
    """Combine pass-1 chunk partials into per-row (max logit, lse), each [G_BLOCK] (0 if padded)."""
    c = tl.arange(0, C_BLOCK)
    offs = rows[:, None] * num_chunks + c[None, :]
    mask = row_mask[:, None] & (c < num_chunks)[None, :]
    pmax = tl.load(part_max_ptr + offs, mask=mask, other=float("-inf"))     # [G_BLOCK, C_BLOCK]
    psum = tl.load(part_sum_ptr + offs, mask=mask, other=0.0)
    row_max = tl.where(row_mask, tl.max(pmax, axis=1), 0.0)
    total = tl.sum(psum * tl.exp(pmax - row_max[:, None]), axis=1)
    lse = row_max + tl.log(tl.where(row_mask, total, 1.0))
    return row_max, lse


@triton.jit
def _group_setup(
    group_rows_ptr, group_size_ptr, weights_ptr, part_max_ptr, part_sum_ptr, cutoff_ptr, inv_t_ptr,
    group, num_chunks, stride_logits, G_BLOCK: tl.constexpr, C_BLOCK: tl.constexpr,
):
    """Per-program constants of a group: rows, row offsets, W block, lse, α threshold, 1/T."""
    rows, row_mask, size = _group_rows(group_rows_ptr, group_size_ptr, group, G_BLOCK)
    row_max, lse = _row_stats(part_max_ptr, part_sum_ptr, rows, row_mask, num_chunks, C_BLOCK)
    gi = tl.arange(0, G_BLOCK)
    weights = tl.load(weights_ptr + (group * G_BLOCK + gi[:, None]) * G_BLOCK + gi[None, :])   # [G, G]
    cut_at = row_max + tl.load(cutoff_ptr + rows, mask=row_mask, other=0.0)    # max + log α
    inv_t = tl.load(inv_t_ptr + rows, mask=row_mask, other=1.0)
    return rows, row_mask, rows.to(tl.int64) * stride_logits, weights, lse, cut_at, inv_t


@triton.jit
def _load_tile(logits_ptr, row_offsets, row_mask, cols, col_mask):
    """The group's logits at ``cols``, [G_BLOCK, BLOCK_V] fp32 (−inf where masked): one 2-D load."""
    mask = row_mask[:, None] & col_mask[None, :]
    return tl.load(logits_ptr + row_offsets[:, None] + cols[None, :], mask=mask,
                   other=float("-inf")).to(tl.float32)


@triton.jit
def _alpha_keep(x, cut_at):
    """The α set on the rows' own logits: finite and ≥ max + log α."""
    return (x > float("-inf")) & (x < float("inf")) & (x >= cut_at[:, None])


@triton.jit
def _guided_scores(x, keep, row_mask, weights, lse, inv_t, logp_floor, G_BLOCK: tl.constexpr):
    """z [G_BLOCK, BLOCK_V] of a group's rows from their logits x: guided, α-cut, tempered.

    W [G, G] mixes the rows' clamped log-probs: a broadcast multiply-sum for small groups, an fp32
    ``tl.dot`` from 16 rows on, a scale for one row.
    """
    logp = tl.maximum(x - lse[:, None], logp_floor)
    logp = tl.where(row_mask[:, None], logp, 0.0)           # padded rows: 0, so 0-weights give 0
    if G_BLOCK == 1:
        s = weights * logp
    elif G_BLOCK >= 16:
        s = tl.dot(weights, logp, input_precision="ieee")
    else:
        s = tl.sum(weights[:, :, None] * logp[None, :, :], axis=1)
    return tl.where(keep, s * inv_t[:, None], float("-inf"))


# ----------------------------------------------------------------------------------------------
# Kernels. Grid of the per-tile kernels: (groups, vocabulary chunks).
# ----------------------------------------------------------------------------------------------
@triton.jit
def _stats_kernel(
    logits_ptr, stride_logits,
    group_rows_ptr, group_size_ptr,
    part_max_ptr, part_sum_ptr,                                   # out: [R, num_chunks] fp32
    vocab, chunk_len, num_chunks,
    G_BLOCK: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Pass 1: per (row, chunk) max logit and Σ exp(l − max), online over the chunk's tiles."""
    group = tl.program_id(0)
    chunk = tl.program_id(1)
    rows, row_mask, size = _group_rows(group_rows_ptr, group_size_ptr, group, G_BLOCK)
    row_base = rows.to(tl.int64) * stride_logits
    run_max = tl.full([G_BLOCK], float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros([G_BLOCK], dtype=tl.float32)
    v_begin = chunk * chunk_len
    v_end = tl.minimum(v_begin + chunk_len, vocab)
    for start in range(v_begin, v_end, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = row_mask[:, None] & (cols < v_end)[None, :]
        x = tl.load(logits_ptr + row_base[:, None] + cols[None, :], mask=mask,
                    other=float("-inf")).to(tl.float32)                       # [G_BLOCK, BLOCK_V]
        new_max = tl.maximum(run_max, tl.max(x, axis=1))
        ref = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - ref) + tl.sum(tl.exp(x - ref[:, None]), axis=1)
        run_max = new_max
    tl.store(part_max_ptr + rows * num_chunks + chunk, run_max, mask=row_mask)
    tl.store(part_sum_ptr + rows * num_chunks + chunk, run_sum, mask=row_mask)


@triton.jit(do_not_specialize=["pivot_step"])
def _threshold_count_kernel(
    logits_ptr, stride_logits,
    group_rows_ptr, group_size_ptr, weights_ptr,
    part_max_ptr, part_sum_ptr,
    cutoff_ptr, inv_t_ptr, lo_top_k_ptr,
    lo_ptr, pivot_step,
    measure_ptr, measure_max_ptr,        # out: [R, num_chunks, NUM_PIVOTS], [R, num_chunks]
    vocab, chunk_len, num_chunks, logp_floor,
    G_BLOCK: tl.constexpr, BLOCK_V: tl.constexpr, C_BLOCK: tl.constexpr,
    NUM_PIVOTS: tl.constexpr, MASS: tl.constexpr, APPLY_TOP_K: tl.constexpr,
):
    """A counting pass of the threshold bisection, per (row, chunk).

    Pivot j of row r is lo[r] + j · pivot_step. Column 0 measures every token, column j the tokens
    whose key is > pivot j. MASS: the measure is Σ exp(z − chunk max) over z after the top-k cut
    (top-p), with the chunk max written beside it; otherwise it is a count of tokens (top-k).
    Only finite z are measured, so a tile with no token in any row's α set is skipped after its
    load. (Counting the −inf tokens too, as the reference's sort does, would only move a threshold
    that lies at or below −inf, which keeps every finite z either way.)
    """
    group = tl.program_id(0)
    chunk = tl.program_id(1)
    rows, row_mask, row_offsets, weights, lse, cut_at, inv_t = _group_setup(
        group_rows_ptr, group_size_ptr, weights_ptr, part_max_ptr, part_sum_ptr, cutoff_ptr, inv_t_ptr,
        group, num_chunks, stride_logits, G_BLOCK, C_BLOCK)
    lo = tl.load(lo_ptr + rows, mask=row_mask, other=0)                          # [G_BLOCK] int64
    if APPLY_TOP_K:
        key_top_k = tl.load(lo_top_k_ptr + rows, mask=row_mask, other=0) + 1
    j = tl.arange(0, NUM_PIVOTS)
    acc = tl.zeros([G_BLOCK, NUM_PIVOTS], dtype=tl.float32)
    run_max = tl.full([G_BLOCK], float("-inf"), dtype=tl.float32)
    v_begin = chunk * chunk_len
    v_end = tl.minimum(v_begin + chunk_len, vocab)
    for start in range(v_begin, v_end, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        x = _load_tile(logits_ptr, row_offsets, row_mask, cols, col_mask)
        keep = _alpha_keep(x, cut_at)
        if tl.max(keep.to(tl.int32)) > 0:
            z = _guided_scores(x, keep, row_mask, weights, lse, inv_t, logp_floor, G_BLOCK)
            key = _ordered_key(z).to(tl.int64)
            if APPLY_TOP_K:
                z = tl.where(key >= key_top_k[:, None], z, float("-inf"))
                key = _ordered_key(z).to(tl.int64)
            if MASS:
                new_max = tl.maximum(run_max, tl.max(z, axis=1))
                ref = tl.where(new_max == float("-inf"), 0.0, new_max)
                acc = acc * tl.exp(run_max - ref)[:, None]
                run_max = new_max
                w = tl.exp(z - ref[:, None])                                 # 0 where z = −inf
            else:
                w = tl.where(z > float("-inf"), 1.0, 0.0)
            acc += tl.where(j[None, :] == 0, tl.sum(w, axis=1)[:, None], 0.0)
            for p in tl.static_range(1, NUM_PIVOTS):
                pivot = lo + pivot_step.to(tl.int64) * p
                above = tl.sum(tl.where(key > pivot[:, None], w, 0.0), axis=1)
                acc += tl.where(j[None, :] == p, above[:, None], 0.0)
    offs = (rows[:, None] * num_chunks + chunk) * NUM_PIVOTS + j[None, :]
    tl.store(measure_ptr + offs, acc, mask=row_mask[:, None])
    if MASS:
        tl.store(measure_max_ptr + rows * num_chunks + chunk, run_max, mask=row_mask)


@triton.jit(do_not_specialize=["pivot_step"])
def _threshold_narrow_kernel(
    measure_ptr, measure_max_ptr, bound_ptr, lo_ptr, pivot_step, num_chunks,
    C_BLOCK: tl.constexpr, NUM_PIVOTS: tl.constexpr, MASS: tl.constexpr,
):
    """Per row: F(pivot j) = measure above pivot j; lo += pivot_step · #{j ≥ 1 : F(j) ≥ bound}.

    F is non-increasing in j (sums of the same terms in the same order, fewer of them), so this
    moves lo to the last pivot that still fails "F < bound": the threshold stays in (lo, lo + step].
    """
    r = tl.program_id(0)
    c = tl.arange(0, C_BLOCK)
    j = tl.arange(0, NUM_PIVOTS)
    cmask = c < num_chunks
    meas = tl.load(measure_ptr + (r * num_chunks + c[:, None]) * NUM_PIVOTS + j[None, :],
                   mask=cmask[:, None], other=0.0)                                # [C_BLOCK, NP]
    bound = tl.load(bound_ptr + r)
    if MASS:
        cmax = tl.load(measure_max_ptr + r * num_chunks + c, mask=cmask, other=float("-inf"))
        top = tl.max(cmax, axis=0)
        meas = meas * tl.exp(cmax - top)[:, None]
        above = tl.sum(meas, axis=0)                                              # [NP]
        bound = bound * tl.sum(tl.where(j == 0, above, 0.0), axis=0)             # top_p · total
    else:
        above = tl.sum(meas, axis=0)
    fails = tl.sum(tl.where((j > 0) & (above >= bound), 1, 0), axis=0)
    lo = tl.load(lo_ptr + r)
    tl.store(lo_ptr + r, lo + fails.to(tl.int64) * pivot_step.to(tl.int64))


@triton.jit
def _sample_kernel(
    logits_ptr, stride_logits, noise_ptr, stride_noise,
    group_rows_ptr, group_size_ptr, weights_ptr,
    part_max_ptr, part_sum_ptr,
    cutoff_ptr, inv_t_ptr, greedy_ptr, key1_ptr, key2_ptr, lo_top_k_ptr, lo_top_p_ptr,
    best_score_ptr, best_token_ptr, best_z_ptr, z_max_ptr, z_sum_ptr,   # out: [R, num_chunks]
    vocab, chunk_len, num_chunks, logp_floor,
    G_BLOCK: tl.constexpr, BLOCK_V: tl.constexpr, C_BLOCK: tl.constexpr,
    HAS_NOISE: tl.constexpr, ANY_SAMPLED: tl.constexpr, HAS_TOP_K: tl.constexpr,
    HAS_TOP_P: tl.constexpr, RETURN_LOGPROBS: tl.constexpr, GUMBEL_MAX: tl.constexpr,
):
    """Pass 2: per (row, chunk) the Gumbel-max winner (score, token) and the log-prob partials.

    Each lane keeps its own running winner (strict >: its earlier, smaller token keeps a tie);
    the lanes are reduced once at the end of the chunk. Two exact shortcuts: a tile with no token
    in any row's α set is skipped after its load, and the noise of a tile is not computed when no
    z + max-noise of it reaches a row's best score so far (both common with α > 0 or peaked z).
    """
    group = tl.program_id(0)
    chunk = tl.program_id(1)
    rows, row_mask, row_offsets, weights, lse, cut_at, inv_t = _group_setup(
        group_rows_ptr, group_size_ptr, weights_ptr, part_max_ptr, part_sum_ptr, cutoff_ptr, inv_t_ptr,
        group, num_chunks, stride_logits, G_BLOCK, C_BLOCK)
    greedy = tl.load(greedy_ptr + rows, mask=row_mask, other=1) != 0
    key1 = tl.load(key1_ptr + rows, mask=row_mask, other=0).to(tl.uint32, bitcast=True)
    key2 = tl.load(key2_ptr + rows, mask=row_mask, other=0).to(tl.uint32, bitcast=True)
    if HAS_TOP_K:
        key_top_k = tl.load(lo_top_k_ptr + rows, mask=row_mask, other=0) + 1
    if HAS_TOP_P:
        key_top_p = tl.load(lo_top_p_ptr + rows, mask=row_mask, other=0) + 1
    lane_best = tl.full([G_BLOCK, BLOCK_V], float("-inf"), dtype=tl.float32)
    lane_token = tl.zeros([G_BLOCK, BLOCK_V], dtype=tl.int32) + vocab
    lane_z = tl.full([G_BLOCK, BLOCK_V], float("-inf"), dtype=tl.float32)
    z_max = tl.full([G_BLOCK], float("-inf"), dtype=tl.float32)
    z_sum = tl.zeros([G_BLOCK], dtype=tl.float32)
    v_begin = chunk * chunk_len
    v_end = tl.minimum(v_begin + chunk_len, vocab)
    row_best = tl.full([G_BLOCK], float("-inf"), dtype=tl.float32)
    for start in range(v_begin, v_end, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        x = _load_tile(logits_ptr, row_offsets, row_mask, cols, col_mask)
        keep = _alpha_keep(x, cut_at)
        if tl.max(keep.to(tl.int32)) > 0:          # else every z of the tile is −inf: nothing to do
            z = _guided_scores(x, keep, row_mask, weights, lse, inv_t, logp_floor, G_BLOCK)
            if HAS_TOP_K:
                z = tl.where(_ordered_key(z).to(tl.int64) >= key_top_k[:, None], z, float("-inf"))
            if HAS_TOP_P:
                z = tl.where(_ordered_key(z).to(tl.int64) >= key_top_p[:, None], z, float("-inf"))
            tile_max = tl.max(z, axis=1)
            if RETURN_LOGPROBS:
                new_max = tl.maximum(z_max, tile_max)
                ref = tl.where(new_max == float("-inf"), 0.0, new_max)
                z_sum = z_sum * tl.exp(z_max - ref) + tl.sum(tl.exp(z - ref[:, None]), axis=1)
                z_max = new_max
            # a row's winner can change only if z + noise can beat its best so far (noise ≤ 16.64)
            if ANY_SAMPLED:
                can_win = (tile_max > float("-inf")) & (tile_max + GUMBEL_MAX > row_best)
            else:
                can_win = (tile_max > float("-inf")) & (tile_max > row_best)
            if tl.max(can_win.to(tl.int32)) > 0:
                if ANY_SAMPLED:
                    if HAS_NOISE:
                        u = tl.load(noise_ptr + rows.to(tl.int64)[:, None] * stride_noise + cols[None, :],
                                    mask=row_mask[:, None] & col_mask[None, :], other=0.5).to(tl.float32)
                    else:
                        u = _uniform(key1[:, None], key2[:, None], cols.to(tl.uint32)[None, :])
                    score = tl.where(greedy[:, None], z, z - tl.log(-tl.log(u)))
                else:
                    score = z
                better = score > lane_best
                lane_best = tl.where(better, score, lane_best)
                lane_token = tl.where(better, cols[None, :], lane_token)
                if RETURN_LOGPROBS:
                    lane_z = tl.where(better, z, lane_z)
                row_best = tl.max(lane_best, axis=1)
    best = tl.max(lane_best, axis=1)
    is_best = lane_best == best[:, None]
    best_token = tl.min(tl.where(is_best, lane_token, vocab), axis=1)       # ties: smallest id
    out = rows * num_chunks + chunk
    tl.store(best_score_ptr + out, best, mask=row_mask)
    tl.store(best_token_ptr + out, best_token, mask=row_mask)
    if RETURN_LOGPROBS:
        best_z = tl.max(tl.where(lane_token == best_token[:, None], lane_z, float("-inf")), axis=1)
        tl.store(best_z_ptr + out, best_z, mask=row_mask)
        tl.store(z_max_ptr + out, z_max, mask=row_mask)
        tl.store(z_sum_ptr + out, z_sum, mask=row_mask)


@triton.jit
def _select_kernel(
    best_score_ptr, best_token_ptr, best_z_ptr, z_max_ptr, z_sum_ptr,
    tokens_ptr, logprobs_ptr,                                        # out: [R] int64, [R] fp32
    rows_total, vocab, num_chunks,
    BLOCK_R: tl.constexpr, C_BLOCK: tl.constexpr, RETURN_LOGPROBS: tl.constexpr,
):
    """Reduce the chunk winners of BLOCK_R rows: max score, ties → smallest token id."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, C_BLOCK)
    rmask = r < rows_total
    mask = rmask[:, None] & (c < num_chunks)[None, :]
    offs = r[:, None] * num_chunks + c[None, :]
    score = tl.load(best_score_ptr + offs, mask=mask, other=float("-inf"))        # [BLOCK_R, C]
    token = tl.load(best_token_ptr + offs, mask=mask, other=vocab)
    top = tl.max(score, axis=1)
    is_top = score == top[:, None]
    chosen = tl.min(tl.where(is_top, token, vocab), axis=1)
    tl.store(tokens_ptr + r, chosen.to(tl.int64), mask=rmask)
    if RETURN_LOGPROBS:
        z_chosen = tl.max(tl.where(is_top & (token == chosen[:, None]),
                                   tl.load(best_z_ptr + offs, mask=mask, other=float("-inf")),
                                   float("-inf")), axis=1)
        cmax = tl.load(z_max_ptr + offs, mask=mask, other=float("-inf"))
        csum = tl.load(z_sum_ptr + offs, mask=mask, other=0.0)
        zmax = tl.where(rmask, tl.max(cmax, axis=1), 0.0)           # padded rows: 0, not −inf
        total = tl.sum(csum * tl.exp(cmax - zmax[:, None]), axis=1)
        lse = zmax + tl.log(tl.where(rmask, total, 1.0))
        tl.store(logprobs_ptr + r, z_chosen - lse, mask=rmask)


@triton.jit
def _uniform_noise_kernel(key1_ptr, key2_ptr, out_ptr, vocab, BLOCK_V: tl.constexpr):
    """u[r, v] for a [R, vocab] output: the in-kernel noise, exposed for tests and tools."""
    r = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    key1 = tl.load(key1_ptr + r).to(tl.uint32, bitcast=True)
    key2 = tl.load(key2_ptr + r).to(tl.uint32, bitcast=True)
    u = _uniform(key1, key2, cols.to(tl.uint32))
    tl.store(out_ptr + r.to(tl.int64) * vocab + cols, u, mask=cols < vocab)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockMix:
    """Block form of the dense ``mix``: groups of coupled rows and each group's block of weights."""
    group_rows: torch.Tensor    # [NG, G_BLOCK] int32, a group's row ids (ascending), 0-padded
    group_size: torch.Tensor    # [NG] int32
    weights: torch.Tensor       # [NG, G_BLOCK, G_BLOCK] fp32, weights[g, i, j] = mix[row i, row j]
    g_block: int                # next power of two >= the largest group
    logp_floor: float           # LOGP_FLOOR when mixing, −inf for mix None (as the reference)

    @property
    def num_groups(self) -> int:
        return self.group_size.shape[0]


def block_form(mix: torch.Tensor | None, rows: int, device: torch.device | str) -> BlockMix:
    """Split ``mix`` [R, R] into groups: the connected components of its non-zero pattern.

    Rows of a group need not be contiguous (a CFG shadow row may sit anywhere); the kernels
    gather them by id. mix None: R groups of one row with weight 1. Reads ``mix`` on the host.
    """
    if mix is None:
        groups = [[r] for r in range(rows)]
        dense = None
    else:
        dense = mix.detach().to("cpu", torch.float32)                      # [R, R]
        coupled = (dense != 0) | (dense != 0).T
        coupled |= torch.eye(rows, dtype=torch.bool)
        label = torch.arange(rows)
        while True:   # every row takes the smallest row id it reaches: its component's first row
            reached = torch.where(coupled, label[None, :], rows).min(dim=1).values
            new = torch.minimum(label, reached)
            new = new[new]                                                 # pointer jumping
            if torch.equal(new, label):
                break
            label = new
        groups = [torch.nonzero(label == first).flatten().tolist() for first in label.unique().tolist()]
    largest = max(len(g) for g in groups)
    if largest > MAX_GROUP_ROWS:
        raise ValueError(f"mix couples {largest} rows into one guidance group; the kernel handles up to "
                         f"{MAX_GROUP_ROWS} (split the batch into smaller groups)")
    g_block = triton.next_power_of_2(largest)
    group_rows = torch.zeros(len(groups), g_block, dtype=torch.int32)
    group_size = torch.tensor([len(g) for g in groups], dtype=torch.int32)
    weights = torch.zeros(len(groups), g_block, g_block, dtype=torch.float32)
    for i, g in enumerate(groups):
        idx = torch.tensor(g)
        group_rows[i, : len(g)] = idx.to(torch.int32)
        weights[i, : len(g), : len(g)] = 1.0 if dense is None else dense[idx[:, None], idx[None, :]]
    return BlockMix(
        group_rows=group_rows.to(device), group_size=group_size.to(device), weights=weights.to(device),
        g_block=g_block, logp_floor=float("-inf") if mix is None else LOGP_FLOOR,
    )


@dataclass(frozen=True)
class LaunchConfig:
    block_v: int       # tokens per tile (power of two)
    chunk_len: int     # tokens per program (a multiple of block_v)
    num_chunks: int    # programs per group along the vocabulary (≤ MAX_CHUNKS)
    num_warps: int


def launch_config(vocab: int, num_groups: int, g_block: int, device: torch.device,
                  block_v: int | None = None, num_chunks: int | None = None) -> LaunchConfig:
    """Tile and vocabulary split. On a GPU: enough (group, chunk) programs to fill the SMs ~4×."""
    on_cuda = device.type == "cuda"
    tile_v, num_warps = CUDA_TILES.get(g_block, CUDA_TILE_LARGE_GROUPS) if on_cuda else \
        (max(16, TILE_ELEMS_CPU // g_block), 4)
    if block_v is None:
        block_v = min(tile_v, max(16, triton.next_power_of_2(vocab)))
    if block_v < 1 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two, got {block_v}")
    tiles = triton.cdiv(vocab, block_v)
    if num_chunks is None:
        if on_cuda:
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            num_chunks = triton.cdiv(4 * sms, num_groups)
        else:
            num_chunks = 1
    num_chunks = max(1, min(num_chunks, tiles, MAX_CHUNKS))
    chunk_len = triton.cdiv(tiles, num_chunks) * block_v
    return LaunchConfig(block_v=block_v, chunk_len=chunk_len, num_chunks=triton.cdiv(vocab, chunk_len),
                        num_warps=num_warps)


@dataclass(frozen=True)
class GuidedSamplePlan:
    """Everything the kernels read, prepared (checked, converted, on the device) once."""
    logits: torch.Tensor        # [R, V] fp32/fp16/bf16, unit stride along V
    noise: torch.Tensor | None  # [R, V] fp32 injected uniforms, or None for the counter noise
    block: BlockMix
    config: LaunchConfig
    cutoff: torch.Tensor        # [R] fp32, log α (−inf for α = 0)
    inv_t: torch.Tensor         # [R] fp32, 1 / T (1 for greedy rows)
    greedy: torch.Tensor        # [R] int32, T == 0
    key1: torch.Tensor          # [R] int32 bits of the uint32 noise keys
    key2: torch.Tensor
    k_bound: torch.Tensor       # [R] fp32, min(k, V), +inf where top-k is off
    p_bound: torch.Tensor       # [R] fp32, top_p, +inf where top-p is off
    any_sampled: bool
    has_top_k: bool
    has_top_p: bool


def _uint32_as_int32(k: torch.Tensor) -> torch.Tensor:
    return torch.where(k >= 2**31, k - 2**32, k).to(torch.int32)


def plan_guided_sample(logits, mix, *, seeds, step, temperature=1.0, alpha=0.0, top_k=0, top_p=1.0,
                       noise=None, block_v: int | None = None,
                       num_chunks: int | None = None) -> GuidedSamplePlan:
    """Check the arguments (as the reference does) and prepare the kernels' inputs."""
    temperature, alpha, top_k, top_p = check_guided_sample_args(
        logits, mix, seeds, temperature, alpha, top_k, top_p, noise
    )
    rows, vocab = logits.shape
    device = logits.device
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    block = block_form(mix, rows, device)
    config = launch_config(vocab, block.num_groups, block.g_block, device, block_v, num_chunks)
    key1, key2 = noise_keys(seeds.to(device), step)
    greedy = temperature == 0
    inf = torch.full_like(temperature, float("inf"))
    return GuidedSamplePlan(
        logits=logits,
        noise=None if noise is None else noise.to(device=device, dtype=torch.float32).contiguous(),
        block=block,
        config=config,
        cutoff=torch.log(alpha).contiguous(),
        inv_t=(1.0 / torch.where(greedy, torch.ones_like(temperature), temperature)).contiguous(),
        greedy=greedy.to(torch.int32).contiguous(),
        key1=_uint32_as_int32(key1).contiguous(),
        key2=_uint32_as_int32(key2).contiguous(),
        k_bound=torch.where(top_k > 0, top_k.clamp(max=vocab).to(torch.float32), inf).contiguous(),
        p_bound=torch.where(top_p < 1, top_p, inf).contiguous(),
        any_sampled=bool((~greedy).any()),
        has_top_k=bool((top_k > 0).any()),
        has_top_p=bool((top_p < 1).any()),
    )


def _find_threshold(plan: GuidedSamplePlan, row_stats, bound: torch.Tensor, *, mass: bool,
                    lo_top_k: torch.Tensor | None) -> torch.Tensor:
    """Bisect the int32 key of a row's top-k (mass=False) or top-p threshold; returns lo [R] int64.

    The rows keep token v iff key(z(v)) ≥ lo + 1.
    """
    logits, block, cfg = plan.logits, plan.block, plan.config
    rows, vocab = logits.shape
    part_max, part_sum = row_stats
    c_block = triton.next_power_of_2(cfg.num_chunks)
    lo = torch.full((rows,), KEY_BELOW_ALL, dtype=torch.int64, device=logits.device)
    measure = torch.empty(rows, cfg.num_chunks, NUM_PIVOTS, dtype=torch.float32, device=logits.device)
    measure_max = torch.empty(rows, cfg.num_chunks, dtype=torch.float32, device=logits.device)
    bits_per_pass = NUM_PIVOTS.bit_length() - 1
    for p in range(THRESHOLD_PASSES):
        pivot_step = 1 << (32 - bits_per_pass * (p + 1))
        _threshold_count_kernel[(block.num_groups, cfg.num_chunks)](
            logits, logits.stride(0),
            block.group_rows, block.group_size, block.weights,
            part_max, part_sum,
            plan.cutoff, plan.inv_t, lo if lo_top_k is None else lo_top_k,
            lo, pivot_step,
            measure, measure_max,
            vocab, cfg.chunk_len, cfg.num_chunks, block.logp_floor,
            G_BLOCK=block.g_block, BLOCK_V=cfg.block_v, C_BLOCK=c_block,
            NUM_PIVOTS=NUM_PIVOTS, MASS=mass, APPLY_TOP_K=lo_top_k is not None, num_warps=cfg.num_warps,
        )
        _threshold_narrow_kernel[(rows,)](
            measure, measure_max, bound, lo, pivot_step, cfg.num_chunks,
            C_BLOCK=c_block, NUM_PIVOTS=NUM_PIVOTS, MASS=mass,
        )
    return lo


def launch_guided_sample(plan: GuidedSamplePlan, return_logprobs: bool = False):
    """Run the kernels of a prepared plan (no host syncs, no checks). Returns as guided_sample."""
    logits, block, cfg = plan.logits, plan.block, plan.config
    rows, vocab = logits.shape
    dev = logits.device
    grid = (block.num_groups, cfg.num_chunks)
    c_block = triton.next_power_of_2(cfg.num_chunks)

    part_max = torch.empty(rows, cfg.num_chunks, dtype=torch.float32, device=dev)
    part_sum = torch.empty_like(part_max)
    _stats_kernel[grid](
        logits, logits.stride(0), block.group_rows, block.group_size, part_max, part_sum,
        vocab, cfg.chunk_len, cfg.num_chunks, G_BLOCK=block.g_block, BLOCK_V=cfg.block_v,
        num_warps=cfg.num_warps,
    )
    lo_top_k = lo_top_p = None
    if plan.has_top_k:
        lo_top_k = _find_threshold(plan, (part_max, part_sum), plan.k_bound, mass=False, lo_top_k=None)
    if plan.has_top_p:
        lo_top_p = _find_threshold(plan, (part_max, part_sum), plan.p_bound, mass=True, lo_top_k=lo_top_k)

    best_score = torch.empty(rows, cfg.num_chunks, dtype=torch.float32, device=dev)
    best_token = torch.empty(rows, cfg.num_chunks, dtype=torch.int32, device=dev)
    best_z, z_max, z_sum = (torch.empty_like(best_score) for _ in range(3))
    noise = plan.noise
    _sample_kernel[grid](
        logits, logits.stride(0), logits if noise is None else noise, 0 if noise is None else noise.stride(0),
        block.group_rows, block.group_size, block.weights,
        part_max, part_sum,
        plan.cutoff, plan.inv_t, plan.greedy, plan.key1, plan.key2,
        part_max if lo_top_k is None else lo_top_k, part_max if lo_top_p is None else lo_top_p,
        best_score, best_token, best_z, z_max, z_sum,
        vocab, cfg.chunk_len, cfg.num_chunks, block.logp_floor,
        G_BLOCK=block.g_block, BLOCK_V=cfg.block_v, C_BLOCK=c_block,
        HAS_NOISE=noise is not None, ANY_SAMPLED=plan.any_sampled, HAS_TOP_K=plan.has_top_k,
        HAS_TOP_P=plan.has_top_p, RETURN_LOGPROBS=return_logprobs, GUMBEL_MAX=GUMBEL_MAX,
        num_warps=cfg.num_warps,
    )
    tokens = torch.empty(rows, dtype=torch.int64, device=dev)
    logprobs = torch.empty(rows, dtype=torch.float32, device=dev)
    block_r = max(1, min(triton.next_power_of_2(rows), 4096 // c_block, 64))
    _select_kernel[(triton.cdiv(rows, block_r),)](
        best_score, best_token, best_z, z_max, z_sum, tokens, logprobs,
        rows, vocab, cfg.num_chunks,
        BLOCK_R=block_r, C_BLOCK=c_block, RETURN_LOGPROBS=return_logprobs,
    )
    return (tokens, logprobs) if return_logprobs else tokens


def guided_sample(
    logits: torch.Tensor,
    mix: torch.Tensor | None,
    *,
    seeds: torch.Tensor,
    step: int,
    temperature=1.0,
    alpha=0.0,
    top_k=0,
    top_p=1.0,
    noise: torch.Tensor | None = None,
    return_logprobs: bool = False,
):
    """Guided sampling from logits, fused (the twin of ``reference.guided_sample``).

    Semantics:
        lp = log_softmax(logits.float())                      # [R, V]
        s = mix @ lp.clamp(min=LOGP_FLOOR)                    # [R, V]; mix None: s = lp
        keep = isfinite(logits) & (logits >= logits.max(-1) + log(alpha))
        keep &= top_k/top_p masks of softmax(s / T) over keep
        tokens = argmax(where(keep, s / T - log(-log(u)), -inf))   # T == 0: argmax(where(keep, s))
        u = uniform_noise(seeds, step, V) unless noise is given
    Args:
        logits: [R, V] fp32/fp16/bf16 next-token logits.
        mix: [R, R] guidance mixing matrix or None. Read as blocks: the connected components of its
            non-zero pattern (rows of a group may be anywhere in the batch, up to 256 a group).
        seeds: [R] int64 per-row seeds; step: decode step (the noise counter).
        temperature, alpha, top_k, top_p: scalar or [R] tensors (0 temperature = greedy row).
        noise: optional [R, V] uniforms in (0, 1) replacing the counter-based noise.
        return_logprobs: also return [R] fp32, log-prob of each chosen token under the tempered,
            cut distribution (for greedy rows, under the cut distribution at T = 1).
    Returns: tokens [R] int64 (and logprobs [R] fp32). Nothing is modified in place.
    Raises: ValueError for the reference's bad arguments and for a guidance group over 256 rows.
    """
    plan = plan_guided_sample(logits, mix, seeds=seeds, step=step, temperature=temperature, alpha=alpha,
                              top_k=top_k, top_p=top_p, noise=noise)
    return launch_guided_sample(plan, return_logprobs)


def uniform_noise(seeds: torch.Tensor, step: int, vocab_size: int) -> torch.Tensor:
    """The kernels' uniforms u [R, V] fp32, computed on the device by the same code as the sampler.

    Equal bit for bit to ``reference.uniform_noise`` (a test checks it).
    """
    key1, key2 = noise_keys(seeds, step)
    rows = seeds.shape[0]
    out = torch.empty(rows, vocab_size, dtype=torch.float32, device=seeds.device)
    block_v = min(1024, triton.next_power_of_2(vocab_size))
    _uniform_noise_kernel[(rows, triton.cdiv(vocab_size, block_v))](
        _uint32_as_int32(key1), _uint32_as_int32(key2), out, vocab_size, BLOCK_V=block_v
    )
    return out
