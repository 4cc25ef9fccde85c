"""The exact bisection of the top-k and top-p thresholds: counting passes and their narrowing.

Rows still open after the last round, and every row of a step that returns
log-probs (the normaliser needs the whole of K), take the exact bisection: the int32 key of
each threshold is pinned without sorting by 8 counting passes, each measuring 15 pivots at
once (interval narrowed 16×; each pass starts by narrowing the previous pass's interval from
its double-buffered partials, ``_narrow_rows``, so there is no narrowing launch): each token
gets its bucket (how many pivots lie below its key:
one subtract, shift and clamp) and adds its weight into a per-lane [M, BLOCK_V, 16]
accumulator, reduced once per chunk (mass with an online max, rescaled only when a row's max
grows); settled rows are skipped there too, and a final sample over key ≥ both thresholds
serves the bisected rows. Exactness never depends on the rounds: a row settles only when
x ∈ K is proven, otherwise the bisection decides.
"""
from __future__ import annotations

import triton
import triton.language as tl

from divgen.kernels.guided_sample_triton.device import KEY_FLOOR, _load_logits, _mix, _ordered_key, _tile_rows
from divgen.kernels.guided_sample_triton.rounds import _decide_rows


@triton.jit
def _narrow_rows(rows, slots, live, measure_ptr, measure_max_ptr, lo_prev, shift, num_chunks, vocab,
                 top_k_ptr, top_p_ptr,
                 M_BLOCK: tl.constexpr, NUM_PIVOTS: tl.constexpr, MASS: tl.constexpr):
    """The narrowing after a counting pass, for the rows ``live`` of a program (partials at their
    tile slots, ``slots`` = tile · M + position): with F(pivot j) the
    measure above pivot j (chunk partials summed in chunk order), lo = lo_prev + 2^shift ·
    #{j ≥ 1 : F(j) ≥ bound}, bound = k (top-k) or top_p · total mass (top-p), ∞ without the cut.

    F is non-increasing in j (sums of the same terms, fewer of them), so this moves lo to the last
    pivot that still fails "F < bound": the threshold stays in (lo, lo + 2^shift]. Every program
    of the next launch computes it for its own rows from the same partials in the same order (the
    same result everywhere: no narrowing launch)."""
    j = tl.arange(0, NUM_PIVOTS)
    mask = live[:, None] & (j < NUM_PIVOTS)[None, :]
    above = tl.zeros([M_BLOCK, NUM_PIVOTS], dtype=tl.float32)
    if MASS:
        top = tl.full([M_BLOCK], float("-inf"), dtype=tl.float32)
        for c in range(0, num_chunks):
            top = tl.maximum(top, tl.load(measure_max_ptr + slots * num_chunks + c, mask=live,
                                          other=float("-inf")))
        ref = tl.where(top == float("-inf"), 0.0, top)
        for c in range(0, num_chunks):
            cmax = tl.load(measure_max_ptr + slots * num_chunks + c, mask=live, other=float("-inf"))
            meas = tl.load(measure_ptr + (slots * num_chunks + c)[:, None] * NUM_PIVOTS + j[None, :],
                           mask=mask, other=0.0)
            above += meas * tl.exp(cmax - ref)[:, None]
        top_p = tl.load(top_p_ptr + rows, mask=live, other=1.0)
        total = tl.sum(tl.where(j[None, :] == 0, above, 0.0), axis=1)
        bound = tl.where(top_p < 1.0, top_p * total, float("inf"))
    else:
        for c in range(0, num_chunks):
            above += tl.load(measure_ptr + (slots * num_chunks + c)[:, None] * NUM_PIVOTS + j[None, :],
                             mask=mask, other=0.0)
        top_k = tl.load(top_k_ptr + rows, mask=live, other=0)
        bound = tl.where(top_k > 0, tl.minimum(top_k, vocab).to(tl.float32), float("inf"))
    fails = tl.sum(tl.where((j[None, :] > 0) & (above >= bound[:, None]), 1, 0), axis=1)
    return lo_prev + (fails.to(tl.int64) << shift)


@triton.jit(do_not_specialize=["pivot_shift", "prev_shift"])
def _threshold_count_kernel(
    logits_ptr, stride_logits,
    plan,                  # (tile_group, tile_row0, order, group_start, w_offset, weights): ``_tile_rows``
    row_params,            # (lse, cut, inv_t, zcut) [R] fp32
    cuts,                  # (top_k [R] i64, top_p [R] fp32)
    lo_top_k_ptr,          # [R] i64: the top-k threshold's lo (APPLY_TOP_K; out with FINISH_TOP_K)
    lo_prev_ptr, lo_ptr,   # [R] i64: lo of the previous counting pass (in), of this one (out)
    pivot_shift, prev_shift,
    state_ptr,             # [R] i32
    measure_in,            # the previous pass's (measure [T·M, num_chunks, NUM_PIVOTS], max [T·M, num_chunks])
    measure_out,           # out: this pass's
    decide,                # DECIDE: (part, cand_z, cand_z_max, lo_r, rounds, center, spacing, state_out); else None
    vocab, chunk_len, num_chunks,
    M_BLOCK: tl.constexpr, K_BLOCK: tl.constexpr, G_BLOCK: tl.constexpr, BLOCK_V: tl.constexpr,
    NUM_PIVOTS: tl.constexpr, MASS: tl.constexpr, APPLY_TOP_K: tl.constexpr, FIRST: tl.constexpr,
    DECIDE: tl.constexpr, FINISH_TOP_K: tl.constexpr, NUM_LEVELS: tl.constexpr, MASKS: tl.constexpr,
):
    """A counting pass of the threshold bisection, per (tile row, chunk).

    The pass's lo comes first: KEY_FLOOR for the FIRST pass of a threshold, else the narrowing of
    the previous pass (``_narrow_rows``) from its partials (double-buffered: this pass writes the
    other buffer); chunk 0 stores it for the next pass. DECIDE (the first pass after the rounds):
    the last round's decision (``_decide_rows``) first, chunk 0 storing the final states.
    FINISH_TOP_K (the first top-p pass): the top-k threshold's last narrowing, stored at
    lo_top_k. Rows settled by a round (state ≥ STATE_ACCEPTED) are skipped; a program with none
    left loops over nothing.

    Pivot j of row r is lo[r] + j · 2^pivot_shift. Column 0 measures every token, column j the
    tokens whose key is > pivot j. MASS: the measure is Σ exp(z − chunk max) over z after the
    top-k cut (top-p), with the chunk max written beside it; otherwise it is a count (top-k).
    Only finite z are measured; a tile with no token in any row's α set is skipped after its
    load. Per-lane accumulation: each token's bucket b = #{pivots j ≥ 1 below its key} (one
    shift and clamp), and its weight is added into a [M, BLOCK_V, NUM_PIVOTS] accumulator at the
    columns j ≤ b; the lanes are reduced once per chunk, not once per pivot and tile.
    """
    tile = tl.program_id(0)
    chunk = tl.program_id(1)
    tile_group_ptr, tile_row0_ptr, order_ptr, group_start_ptr, w_offset_ptr, weights_ptr = plan
    lse_ptr, cut_ptr, inv_t_ptr, zcut_ptr = row_params
    top_k_ptr, top_p_ptr = cuts
    measure_in_ptr, measure_max_in_ptr = measure_in
    measure_ptr, measure_max_ptr = measure_out
    pos, pos_mask, rows, start, size, w_off = _tile_rows(
        tile_group_ptr, tile_row0_ptr, order_ptr, group_start_ptr, w_offset_ptr, tile, M_BLOCK)
    writer = pos_mask & ((pos * 0 + chunk) == 0)   # chunk 0 stores the per-row results (a tensor:
    # the interpreter cannot mask with "tensor & scalar")
    if DECIDE:
        part_ptr, cand_z_ptr, cand_z_max_ptr, lo_r_ptr, rounds_ptr, center_ptr, spacing_ptr, state_out_ptr = decide
        state_prev = tl.load(state_ptr + rows, mask=pos_mask, other=3)
        state, lo_r, center, spacing, live = _decide_rows(
            rows, pos_mask, state_prev, part_ptr, top_k_ptr, top_p_ptr, cand_z_ptr, cand_z_max_ptr,
            lo_r_ptr, center_ptr, spacing_ptr, vocab, num_chunks, M_BLOCK, NUM_LEVELS, True)
        tl.store(state_out_ptr + rows, state, mask=writer)
        tl.store(rounds_ptr + rows, tl.load(rounds_ptr + rows, mask=writer & live, other=0) + 1,
                 mask=writer & live)
    else:
        state = tl.load(state_ptr + rows, mask=pos_mask, other=3)
    active = pos_mask & (state < 3)                              # STATE_BISECT rows (or open: log-probs)
    slots = tile * M_BLOCK + tl.arange(0, M_BLOCK)               # the tile's partials (``_narrow_rows``)
    if FIRST:
        lo = tl.full([M_BLOCK], KEY_FLOOR, dtype=tl.int64)
    else:
        lo = _narrow_rows(rows, slots, active, measure_in_ptr, measure_max_in_ptr,
                          tl.load(lo_prev_ptr + rows, mask=active, other=0), prev_shift, num_chunks, vocab,
                          top_k_ptr, top_p_ptr, M_BLOCK, NUM_PIVOTS, MASS)
    tl.store(lo_ptr + rows, lo, mask=writer & active)
    row_offsets = rows.to(tl.int64) * stride_logits
    lse = tl.load(lse_ptr + rows, mask=pos_mask, other=0.0)
    cut = tl.load(cut_ptr + rows, mask=pos_mask, other=0.0)
    inv_t = tl.load(inv_t_ptr + rows, mask=pos_mask, other=1.0)
    zcut = tl.load(zcut_ptr + rows, mask=pos_mask, other=float("-inf"))     # min-p threshold on z
    if APPLY_TOP_K:
        if FINISH_TOP_K:
            lo_k = _narrow_rows(rows, slots, active, measure_in_ptr, measure_max_in_ptr,
                                tl.load(lo_prev_ptr + rows, mask=active, other=0), 0, num_chunks, vocab,
                                top_k_ptr, top_p_ptr, M_BLOCK, NUM_PIVOTS, False)
            tl.store(lo_top_k_ptr + rows, lo_k, mask=writer & active)
        else:
            lo_k = tl.load(lo_top_k_ptr + rows, mask=pos_mask, other=0)
        key_top_k = lo_k + 1
    j = tl.arange(0, NUM_PIVOTS)
    acc = tl.zeros([M_BLOCK, BLOCK_V, NUM_PIVOTS], dtype=tl.float32)
    run_max = tl.full([M_BLOCK], float("-inf"), dtype=tl.float32)
    v_begin = chunk * chunk_len
    v_end = tl.minimum(v_begin + chunk_len, vocab)
    v_end = tl.where(tl.max(active.to(tl.int32), axis=0) > 0, v_end, v_begin)   # all settled: no loop
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        x = _load_logits(logits_ptr, row_offsets, pos_mask, cols, col_mask)
        keep = (x > float("-inf")) & (x >= cut[:, None])
        if tl.max(keep.to(tl.int32)) > 0:
            s = _mix(x, lse, pos, pos_mask, weights_ptr, w_off, start, size, order_ptr, lse_ptr,
                     logits_ptr, stride_logits, cols, col_mask, M_BLOCK, K_BLOCK, G_BLOCK, BLOCK_V, MASKS)
            z = tl.where(keep, s * inv_t[:, None], float("-inf"))
            z = tl.where(z >= zcut[:, None], z, float("-inf"))          # min-p (−inf: off)
            key = _ordered_key(z).to(tl.int64)
            if APPLY_TOP_K:
                z = tl.where(key >= key_top_k[:, None], z, float("-inf"))
                key = _ordered_key(z).to(tl.int64)
            if MASS:
                new_max = tl.maximum(run_max, tl.max(z, axis=1))
                if tl.max((new_max > run_max).to(tl.int32)) > 0:          # rare after a few tiles
                    scale = tl.exp(run_max - tl.where(new_max == float("-inf"), 0.0, new_max))
                    acc = acc * scale[:, None, None]
                    run_max = new_max
                ref = tl.where(run_max == float("-inf"), 0.0, run_max)
                w = tl.exp(z - ref[:, None])                                 # 0 where z = −inf
            else:
                w = tl.where(z > float("-inf"), 1.0, 0.0)
            # key > pivot j  <=>  (key − lo − 1) >> shift >= j; column 0 (j = 0) takes every token
            bucket = tl.minimum(tl.maximum((key - lo[:, None] - 1) >> pivot_shift, 0), NUM_PIVOTS - 1)
            acc += tl.where(j[None, None, :] <= bucket.to(tl.int32)[:, :, None], w[:, :, None], 0.0)
    measure = tl.sum(acc, axis=1)                                           # [M, NUM_PIVOTS]
    # partials by tile slot (tile · M + position), not by row: nothing of the rows stays live
    # over the loop for the stores (it spilled), and padding slots hold zeros
    tl.store(measure_ptr + (slots[:, None] * num_chunks + chunk) * NUM_PIVOTS + j[None, :], measure)
    if MASS:
        tl.store(measure_max_ptr + slots * num_chunks + chunk, run_max)
