"""Device helpers of the guided sampler (``divgen.kernels.guided_sample_triton``): its constants,
the noise, the order-preserving keys, the logits load, a tile's rows and the guidance mix.

The mix. For a row m of a guidance group G(m) (rows that ``mix`` couples, see ``kernels/plan.py``), with
W the group's block of ``mix``:

    ℓ_n(v)  = l_n(v) − lse_n,   lse_n = max_n + log Σ_u exp(l_n(u) − max_n)     log_softmax
    s_m(v)  = Σ_{n ∈ G(m)} W[m, n] · g_{m,n}(v),  g = ℓ_n(v), or l_m(v) − lse_n where ℓ_n(v) = −inf (a mask)
    ŝ_m(v)  = s_m(v) + c_m = W·L + L_m ⊙ (W_off·Mk)                           (``_mix``)
    z_m(v)  = ŝ_m(v) · (1 / T_m)   if l_m(v) finite and l_m(v) ≥ max_m + log α_m,   else −inf
            and −inf where z_m(v) < max_u z_m(u) + log min_p_m                   (min-p, tempered)
    x_m     = argmax_v z'_m(v) + G_m(v)     (T_m < 1e-6: no G; z' = z after top-k / top-p)

ŝ is the reference's (``reference.guided_scores``): raw logits L (−inf read as 0) mixed, plus the
mask rule's term (Mk = [l = −inf], W_off = W off the diagonal), a constant c_m = Σ_n W[m, n] lse_n
per row away from s, so the same tokens, cuts and log-probs; a row without guidance
compares its raw logits.

Tiles. A program owns a tile (up to M rows of one group) × a vocabulary chunk. Groups of ≤ 16 rows
are one tile: below 16 rows W mixes the group's rows one at a time (a multiply-add per row, each
re-read from L1), at 16 one fp32 ``tl.dot`` mixes the tile's 2-D load; both sum in an order the
tile's layout does not change. Larger groups (up to 256) are split
into M = 32-row tiles, each its own program, and the mixing loops over K = 32-row blocks of
the group (load, clamp, ``tl.dot`` into an fp32 accumulator), so registers and shared memory
do not grow with the group and a 256-row group spreads over 8 × chunks programs.
Cost g·V multiply-adds per row; no R·R·V work.

Noise. u = (2·(h >> 9) + 1) / 2^24 with h = fmix32(fmix32(v ^ k1) ^ k2), in uint32; the row
keys (k1, k2) = f(seed, step) are computed in the kernel from the device-side seeds and per-row
step counters, so the bits equal ``reference.uniform_noise`` and a replayed CUDA graph draws
fresh noise at every step.
"""
from __future__ import annotations

import triton
import triton.language as tl

NUM_PIVOTS = 16            # measure columns per counting pass: 0 = total, 1..15 = pivots
PIVOT_BITS = 4             # log2(NUM_PIVOTS)
THRESHOLD_PASSES = 8       # 32 key bits / PIVOT_BITS bits per pass
SAMPLE_ROUNDS = 4          # sample / verify rounds before the exact bisection (``rounds``)
STATE_OPEN, STATE_REFINE, STATE_BISECT, STATE_ACCEPTED = 0, 1, 2, 3   # per-row state (``rounds``)
KEY_BELOW_ALL = -(2**31) - 1   # an int64 below every int32 key: the bisection's first lower end
KEY_FLOOR: tl.constexpr = tl.constexpr(-(2**31) - 1)   # the same, inside kernels
REFINE_FLOOR_NATS: tl.constexpr = tl.constexpr(32.0)   # refine bracket's depth when no level has C ≥ k
NUM_LEVELS = 8             # probe levels of the verify pass (``_probe_levels``)
GUMBEL_MAX = 17.0              # > −log(−log(1 − 2^-24)) = 16.64, the largest Gumbel of the noise
MAX_CHUNKS = 64            # vocabulary chunks per row (later kernels combine them in one tile)
# Rows per program (M) and contracted rows per mixing step (K): a group of up to 16 rows is one
# tile (M = K = group block); larger groups are split into M-row blocks, each its own program,
# and the mixing loops over K-row blocks of the group (tl.dot, fp32 "ieee"), so neither registers
# nor shared memory grow with the group: G = 256 runs as 8 programs a chunk, each 8 K steps.
CUDA_ROW_BLOCK = 32
CUDA_K_BLOCK = 32
SINGLE_TILE_MAX = 16
# (BLOCK_V, num_warps) by rows per program on a GPU (tests/test_kernels_compile.py checks every
# entry for registers, spills and shared memory on sm_90 and sm_80).
CUDA_TILES = {1: (2048, 8), 2: (1024, 8), 4: (512, 8), 8: (256, 8), 16: (128, 8), 32: (32, 8)}
CUDA_STATS_BLOCK_V = 2048
CPU_TILE_ELEMS = 1024      # M · BLOCK_V under TRITON_INTERPRET=1 (the interpreter is per-op)
CPU_ROW_BLOCK = 64


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
def _noise_keys(seed, step):
    """int64 seeds and step counters -> the uint32 row keys (k1, k2) of ``reference.noise_keys``."""
    lo = (seed & 0xFFFFFFFF).to(tl.uint32)
    hi = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    s = (step & 0xFFFFFFFF).to(tl.uint32)
    k1 = _fmix32(lo ^ _fmix32(s * 0x9E3779B9 + hi))
    k2 = _fmix32((k1 + 0x9E3779B9) ^ hi)
    return k1, k2


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
def _load_logits(logits_ptr, row_offsets, row_mask, cols, col_mask):
    """Logits [rows, BLOCK_V] fp32, −inf where masked, +inf read as LOGIT_MAX = 65504 (reference)."""
    x = tl.load(logits_ptr + row_offsets[:, None] + cols[None, :],
                mask=row_mask[:, None] & col_mask[None, :], other=float("-inf")).to(tl.float32)
    return tl.minimum(x, 65504.0)


@triton.jit
def _tile_rows(tile_group_ptr, tile_row0_ptr, order_ptr, group_start_ptr, w_offset_ptr, tile,
               M_BLOCK: tl.constexpr):
    """The output rows of a tile: (positions in the group [M], their mask, row ids, group start,
    group size, the group's weight offset)."""
    group = tl.load(tile_group_ptr + tile)
    row0 = tl.load(tile_row0_ptr + tile)
    start = tl.load(group_start_ptr + group)
    size = tl.load(group_start_ptr + group + 1) - start
    pos = row0 + tl.arange(0, M_BLOCK)
    pos_mask = pos < size
    rows = tl.load(order_ptr + start + pos, mask=pos_mask, other=0)
    w_off = tl.load(w_offset_ptr + group)
    return pos, pos_mask, rows, start, size, w_off


@triton.jit
def _mask_terms(s, own, lse_own, pos, pos_mask, weights_ptr, w_off, start, size, order_ptr, lse_ptr,
                logits_ptr, stride_logits, cols, col_mask):
    """s + the mask rule's term: Σ_{n ≠ m, l_n(v) = −inf} W[m, n] · L_m(v) (row n read as agreeing
    with row m on v; lse_own and lse_ptr are unused, kept for the call sites' shape).

    One contrasting row at a time (its logits re-read from L1/L2, its column of W), so only
    [M, BLOCK_V] values stay live; it runs only for a tile where some row of the group is masked."""
    for n in range(0, size):
        row_n = tl.load(order_ptr + start + n)
        xn = tl.load(logits_ptr + row_n.to(tl.int64) * stride_logits + cols, mask=col_mask, other=0.0)
        masked_n = (xn.to(tl.float32) == float("-inf")) & col_mask                  # [BLOCK_V]
        w_n = tl.load(weights_ptr + w_off + pos * size + n, mask=pos_mask & (pos != n), other=0.0)   # [M]
        s += tl.where(masked_n[None, :], w_n[:, None] * own, 0.0)
    return s


@triton.jit
def _mix_rows(pos, pos_mask, weights_ptr, w_off, start, size, order_ptr, logits_ptr, stride_logits, cols, col_mask,
              M_BLOCK: tl.constexpr, BLOCK_V: tl.constexpr):
    """W · L for a group of < 16 rows, one contrasting row at a time in group order (its logits
    re-read from L1, its column of W): s = (((w_0 x_0) + w_1 x_1) + ...), the same sum order in
    every kernel whatever its tile width. (A broadcast multiply-sum, tl.sum(w[:, :, None] ·
    L[None], axis=1), is reduced in a layout-dependent order: within a thread at 256 tokens a
    tile, across warps at 32, so the sample, counting and verify passes computed the same score
    with different rounding and disagreed on where a row's own candidate stands.)"""
    s = tl.zeros([M_BLOCK, BLOCK_V], dtype=tl.float32)
    for n in tl.static_range(M_BLOCK):      # unrolled; rows past the group's size add 0 · x = +0
        row_n = tl.load(order_ptr + start + tl.minimum(n, size - 1))
        xn = tl.load(logits_ptr + row_n.to(tl.int64) * stride_logits + cols, mask=col_mask,
                     other=float("-inf")).to(tl.float32)
        xn = tl.where(xn > float("-inf"), tl.minimum(xn, 65504.0), 0.0)
        w_n = tl.load(weights_ptr + w_off + pos * size + n, mask=pos_mask & ((pos * 0 + n) < size),
                      other=0.0)                                                           # [M]
        s += w_n[:, None] * xn[None, :]
    return s


@triton.jit
def _mix(x_own, lse_own, pos, pos_mask, weights_ptr, w_off, start, size, order_ptr, lse_ptr,
         logits_ptr, stride_logits, cols, col_mask,
         M_BLOCK: tl.constexpr, K_BLOCK: tl.constexpr, G_BLOCK: tl.constexpr, BLOCK_V: tl.constexpr,
         MASKS: tl.constexpr):
    """Guided scores ŝ [M, BLOCK_V] over the group's rows at ``cols`` (``reference.guided_scores``):

        ŝ = W · L + L_own ⊙ (W_off · Mk)

    L = the logits, −inf read as 0; Mk = [logit = −inf] (a mask: that row is read as agreeing
    with the own row there); W_off = W off the diagonal. Not log-probs: a row without
    guidance compares its own logits exactly. The mask terms (``_mask_terms``) are compiled in
    only with MASKS (a plan's ``masks``: contrasting rows may hold −inf) and run only for a tile
    where a row of the group has a −inf logit.

    G_BLOCK = 1: a scale. One tile (M = K = G_BLOCK ≤ 16): the tile's own rows are the whole group,
    mixed row by row in group order (< 16 rows, ``_mix_rows``) or by one tl.dot. Larger groups: a
    loop over K-row blocks of the group, each loaded and multiplied into an fp32 accumulator (tl.dot,
    "ieee"). Every path sums in an order the tile's layout does not change: a row's score must round
    the same in the sample, counting and verify passes, which run different tile widths.
    """
    own = tl.where(x_own > float("-inf"), x_own, 0.0)                       # [M, BLOCK_V] L_own
    if G_BLOCK == 1:
        w = tl.load(weights_ptr + w_off)
        s = w * own
    else:
        if M_BLOCK == G_BLOCK:
            if G_BLOCK >= 16:
                w = tl.load(weights_ptr + w_off + pos[:, None] * size + pos[None, :],
                            mask=pos_mask[:, None] & pos_mask[None, :], other=0.0)      # [G, G]
                s = tl.dot(w, own, input_precision="ieee")
            else:
                s = _mix_rows(pos, pos_mask, weights_ptr, w_off, start, size, order_ptr, logits_ptr,
                              stride_logits, cols, col_mask, M_BLOCK, BLOCK_V)
            if MASKS:
                masks = tl.max((pos_mask[:, None] & col_mask[None, :] & (x_own == float("-inf"))).to(tl.int32))
        else:
            s = tl.zeros([M_BLOCK, BLOCK_V], dtype=tl.float32)
            masks = tl.zeros([], dtype=tl.int32)
            for k0 in range(0, size, K_BLOCK):
                kpos = k0 + tl.arange(0, K_BLOCK)
                kmask = kpos < size
                krows = tl.load(order_ptr + start + kpos, mask=kmask, other=0)
                xk = _load_logits(logits_ptr, krows.to(tl.int64) * stride_logits, kmask, cols, col_mask)
                w = tl.load(weights_ptr + w_off + pos[:, None] * size + kpos[None, :],
                            mask=pos_mask[:, None] & kmask[None, :], other=0.0)         # [M, K]
                s = tl.dot(w, tl.where(xk > float("-inf"), xk, 0.0), s, input_precision="ieee")
                if MASKS:
                    masks = tl.maximum(masks, tl.max((kmask[:, None] & col_mask[None, :]
                                                      & (xk == float("-inf"))).to(tl.int32)))
        if MASKS and masks > 0:
            s = _mask_terms(s, own, lse_own, pos, pos_mask, weights_ptr, w_off, start, size, order_ptr, lse_ptr,
                            logits_ptr, stride_logits, cols, col_mask)
    return s
