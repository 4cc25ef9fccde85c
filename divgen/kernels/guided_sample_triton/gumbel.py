"""The sample pass (Gumbel-max over the mixed, cut scores) and the select pass that reduces its
chunk winners; also the noise exposed for tests.

Gumbel-max needs no softmax: the sample pass keeps a running (best score, smallest token id)
per lane, reduced per (row, chunk) at the end; ``_select_kernel`` reduces the chunks (ties →
smallest token id, as torch.argmax). The log-prob of the choice needs log Σ exp z', online in
the same pass. Two exact shortcuts: a tile with no token in any row's α set is skipped after
its load, and a tile whose max z + 16.64 (the largest Gumbel of 24-bit uniforms) cannot reach
any row's best so far skips the noise.
"""
from __future__ import annotations

import triton
import triton.language as tl

from divgen.kernels.guided_sample_triton.bisect import _narrow_rows
from divgen.kernels.guided_sample_triton.device import (
    _load_logits, _mix, _noise_keys, _ordered_key, _tile_rows, _uniform,
)
from divgen.kernels.guided_sample_triton.rounds import _decide_rows
from divgen.kernels.guided_sample_triton.stats import _combine_stats


@triton.jit(do_not_specialize=["skip_from"])
def _sample_kernel(
    logits_ptr, stride_logits,
    noise,                 # HAS_NOISE: (noise [R, V], its row stride), injected uniforms; else None
    plan,                  # (tile_group, tile_row0, order, group_start, w_offset, weights): ``_tile_rows``
    row_params,            # (lse, cut, inv_t, zcut) [R] fp32
    draw,                  # (greedy [R] i32, seed [R] i64, step [R] i64)
    winners,               # out: (best_score, best_token, best_z, z_max, z_sum) [R, num_chunks]
    vocab, chunk_len, num_chunks,
    top,                   # TOP_K_TOP_P: (top_k, top_p, lo_top_k, lo_top_p); else None
    state_ptr, skip_from,  # TOP_K_TOP_P: rows whose state is ≥ skip_from are left alone; else None, 0
    decide,                # DECIDE (rounds ≥ 2): the previous round's verify partials and candidates,
    # this round's state / lo / bracket (out, chunk 0), the rounds counter: (part, cand_z,
    # cand_z_max, state_out, lo_out, rounds, center, spacing, center_out, spacing_out); else None
    narrow,                # NARROW_P (the final sample after the bisection): the last top-p counting
    # pass's partials (measure, measure_max); else None
    stats,                 # FUSE_STATS: the stats pass's chunk partials (part_max, part_sum, cutoff); else None
    M_BLOCK: tl.constexpr, K_BLOCK: tl.constexpr, G_BLOCK: tl.constexpr, BLOCK_V: tl.constexpr,
    HAS_NOISE: tl.constexpr, TOP_K_TOP_P: tl.constexpr, RETURN_LOGPROBS: tl.constexpr,
    CANDIDATE: tl.constexpr, GUMBEL_MAX: tl.constexpr, DECIDE: tl.constexpr, NARROW_P: tl.constexpr,
    NUM_LEVELS: tl.constexpr, NUM_PIVOTS: tl.constexpr, FUSE_STATS: tl.constexpr, C_BLOCK: tl.constexpr,
    MASKS: tl.constexpr,
):
    """Pass 2: per (tile row, chunk) the Gumbel-max winner (score, token) and log-prob partials.

    The noise keys come from the device-side seeds and per-row step counters, so a replayed CUDA
    graph draws fresh noise every step. Each lane keeps its own running winner (strict >: its
    earlier, smaller token keeps a tie); the lanes are reduced once at the end of the chunk. Two
    exact shortcuts: a tile with no token in any row's α set is skipped after its load, and the
    noise of a tile is not computed when no z + max-noise of it reaches a row's best so far.

    TOP_K_TOP_P: only tokens with key ≥ both lower bounds + 1 compete, and rows whose state is
    ≥ skip_from are left alone (a program with none left loops over nothing). CANDIDATE: also
    the winner's z and the chunk max of z (a round of the sample / verify scheme, module
    docstring) without the log-prob sum. DECIDE: the rows' state and lo come from the previous
    round's decision (``_decide_rows``, here: no decide launch; chunk 0 stores them for this
    round). NARROW_P: the top-p lo is the last counting pass's narrowing (``_narrow_rows``).
    FUSE_STATS (the first pass after the stats pass, tiles that are whole groups: the mixing
    reads no other row's lse): the rows' lse and α cut are combined here from the chunk
    partials (``_combine_stats``; no row-stats launch), chunk 0 storing them for later passes.
    """
    tile = tl.program_id(0)
    chunk = tl.program_id(1)
    tile_group_ptr, tile_row0_ptr, order_ptr, group_start_ptr, w_offset_ptr, weights_ptr = plan
    lse_ptr, cut_ptr, inv_t_ptr, zcut_ptr = row_params
    greedy_ptr, seed_ptr, step_ptr = draw
    best_score_ptr, best_token_ptr, best_z_ptr, z_max_ptr, z_sum_ptr = winners
    pos, pos_mask, rows, start, size, w_off = _tile_rows(
        tile_group_ptr, tile_row0_ptr, order_ptr, group_start_ptr, w_offset_ptr, tile, M_BLOCK)
    row_offsets = rows.to(tl.int64) * stride_logits
    if FUSE_STATS:
        part_max_ptr, part_sum_ptr, cutoff_ptr = stats
        lse, cut = _combine_stats(rows, pos_mask, part_max_ptr, part_sum_ptr, cutoff_ptr, num_chunks, C_BLOCK)
        first = pos_mask & ((pos * 0 + chunk) == 0)
        tl.store(lse_ptr + rows, lse, mask=first)
        tl.store(cut_ptr + rows, cut, mask=first)
    else:
        lse = tl.load(lse_ptr + rows, mask=pos_mask, other=0.0)
        cut = tl.load(cut_ptr + rows, mask=pos_mask, other=0.0)
    inv_t = tl.load(inv_t_ptr + rows, mask=pos_mask, other=1.0)
    zcut = tl.load(zcut_ptr + rows, mask=pos_mask, other=float("-inf"))     # min-p threshold on z
    greedy = tl.load(greedy_ptr + rows, mask=pos_mask, other=1) != 0
    key1, key2 = _noise_keys(tl.load(seed_ptr + rows, mask=pos_mask, other=0),
                             tl.load(step_ptr + rows, mask=pos_mask, other=0))
    active = pos_mask
    if TOP_K_TOP_P:
        top_k_ptr, top_p_ptr, lo_top_k_ptr, lo_top_p_ptr = top
        if DECIDE:
            (part_ptr, cand_z_ptr, cand_z_max_ptr, state_out_ptr, lo_out_ptr, rounds_ptr, center_ptr, spacing_ptr,
             center_out_ptr, spacing_out_ptr) = decide
            writer = pos_mask & ((pos * 0 + chunk) == 0)
            state, lo_r, center, spacing, live = _decide_rows(
                rows, pos_mask, tl.load(state_ptr + rows, mask=pos_mask, other=3), part_ptr, top_k_ptr,
                top_p_ptr, cand_z_ptr, cand_z_max_ptr, lo_top_k_ptr, center_ptr, spacing_ptr, vocab,
                num_chunks, M_BLOCK, NUM_LEVELS, False)
            tl.store(state_out_ptr + rows, state, mask=writer)
            tl.store(lo_out_ptr + rows, lo_r, mask=writer)
            tl.store(center_out_ptr + rows, center, mask=writer)
            tl.store(spacing_out_ptr + rows, spacing, mask=writer)
            tl.store(rounds_ptr + rows, tl.load(rounds_ptr + rows, mask=writer & live, other=0) + 1,
                     mask=writer & live)
            key_top_k = lo_r + 1
            key_top_p = key_top_k
        else:
            state = tl.load(state_ptr + rows, mask=pos_mask, other=0)
            key_top_k = tl.load(lo_top_k_ptr + rows, mask=pos_mask, other=0) + 1
            if NARROW_P:
                measure_ptr, measure_max_ptr = narrow
                lo_p = _narrow_rows(rows, tile * M_BLOCK + tl.arange(0, M_BLOCK), pos_mask & (state < skip_from),
                                    measure_ptr, measure_max_ptr,
                                    tl.load(lo_top_p_ptr + rows, mask=pos_mask & (state < skip_from), other=0),
                                    0, num_chunks, vocab, top_k_ptr, top_p_ptr, M_BLOCK, NUM_PIVOTS, True)
                key_top_p = lo_p + 1
            else:
                key_top_p = tl.load(lo_top_p_ptr + rows, mask=pos_mask, other=0) + 1
        active = pos_mask & (state < skip_from)
    lane_best = tl.full([M_BLOCK, BLOCK_V], float("-inf"), dtype=tl.float32)
    lane_token = tl.zeros([M_BLOCK, BLOCK_V], dtype=tl.int32) + vocab
    if RETURN_LOGPROBS or CANDIDATE:
        lane_z = tl.full([M_BLOCK, BLOCK_V], float("-inf"), dtype=tl.float32)
    z_max = tl.full([M_BLOCK], float("-inf"), dtype=tl.float32)
    z_sum = tl.zeros([M_BLOCK], dtype=tl.float32)
    v_begin = chunk * chunk_len
    v_end = tl.minimum(v_begin + chunk_len, vocab)
    if TOP_K_TOP_P:   # every row of the tile settled: loop over nothing
        v_end = tl.where(tl.max(active.to(tl.int32), axis=0) > 0, v_end, v_begin)
    row_best = tl.full([M_BLOCK], float("-inf"), dtype=tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        x = _load_logits(logits_ptr, row_offsets, pos_mask, cols, col_mask)
        keep = (x > float("-inf")) & (x >= cut[:, None])
        if tl.max(keep.to(tl.int32)) > 0:          # else every z of the tile is −inf: nothing to do
            s = _mix(x, lse, pos, pos_mask, weights_ptr, w_off, start, size, order_ptr, lse_ptr,
                     logits_ptr, stride_logits, cols, col_mask, M_BLOCK, K_BLOCK, G_BLOCK, BLOCK_V, MASKS)
            z = tl.where(keep, s * inv_t[:, None], float("-inf"))
            z = tl.where(z >= zcut[:, None], z, float("-inf"))          # min-p (−inf: off)
            if TOP_K_TOP_P:
                key = _ordered_key(z).to(tl.int64)
                z = tl.where((key >= key_top_k[:, None]) & (key >= key_top_p[:, None]), z, float("-inf"))
            tile_max = tl.max(z, axis=1)
            if RETURN_LOGPROBS:
                new_max = tl.maximum(z_max, tile_max)
                ref = tl.where(new_max == float("-inf"), 0.0, new_max)
                z_sum = z_sum * tl.exp(z_max - ref) + tl.sum(tl.exp(z - ref[:, None]), axis=1)
                z_max = new_max
            elif CANDIDATE:
                z_max = tl.maximum(z_max, tile_max)
            # a row's winner can change only if z + noise can beat its best so far (noise ≤ 16.64)
            can_win = (tile_max > float("-inf")) & (tile_max + GUMBEL_MAX > row_best)
            if tl.max(can_win.to(tl.int32)) > 0:
                if HAS_NOISE:
                    noise_ptr, stride_noise = noise
                    u = tl.load(noise_ptr + rows.to(tl.int64)[:, None] * stride_noise + cols[None, :],
                                mask=pos_mask[:, None] & col_mask[None, :], other=0.5).to(tl.float32)
                else:
                    u = _uniform(key1[:, None], key2[:, None], cols.to(tl.uint32)[None, :])
                score = tl.where(greedy[:, None], z, z - tl.log(-tl.log(u)))
                better = score > lane_best
                lane_best = tl.where(better, score, lane_best)
                lane_token = tl.where(better, cols[None, :], lane_token)
                if RETURN_LOGPROBS or CANDIDATE:
                    lane_z = tl.where(better, z, lane_z)
                row_best = tl.max(lane_best, axis=1)
    best = tl.max(lane_best, axis=1)
    is_best = lane_best == best[:, None]
    best_token = tl.min(tl.where(is_best, lane_token, vocab), axis=1)       # ties: smallest id
    out = rows * num_chunks + chunk
    tl.store(best_score_ptr + out, best, mask=active)
    tl.store(best_token_ptr + out, best_token, mask=active)
    if RETURN_LOGPROBS or CANDIDATE:
        best_z = tl.max(tl.where(lane_token == best_token[:, None], lane_z, float("-inf")), axis=1)
        tl.store(best_z_ptr + out, best_z, mask=active)
        tl.store(z_max_ptr + out, z_max, mask=active)
    if RETURN_LOGPROBS:
        tl.store(z_sum_ptr + out, z_sum, mask=active)


@triton.jit(do_not_specialize=["skip_from"])
def _select_kernel(
    best_score_ptr, best_token_ptr, best_z_ptr, z_max_ptr, z_sum_ptr,
    state_ptr, skip_from,
    tokens_ptr, logprobs_ptr,                                        # out: [R] int64, [R] fp32
    rows_total, vocab, num_chunks,
    BLOCK_R: tl.constexpr, C_BLOCK: tl.constexpr, RETURN_LOGPROBS: tl.constexpr,
    SKIP_SETTLED: tl.constexpr,
):
    """Reduce the chunk winners of BLOCK_R rows: max score, ties → smallest token id; a row with
    no candidate at all (every logit −inf: a slot not in use) gets token 0, as torch.argmax.
    SKIP_SETTLED: rows whose state is ≥ skip_from keep their token. (A round's candidate is
    reduced by its verify pass itself, ``_pick_candidate``.)"""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, C_BLOCK)
    rmask = r < rows_total
    if SKIP_SETTLED:
        rmask = rmask & (tl.load(state_ptr + r, mask=rmask, other=0) < skip_from)
    mask = rmask[:, None] & (c < num_chunks)[None, :]
    offs = r[:, None] * num_chunks + c[None, :]
    score = tl.load(best_score_ptr + offs, mask=mask, other=float("-inf"))        # [BLOCK_R, C]
    token = tl.load(best_token_ptr + offs, mask=mask, other=vocab)
    top = tl.max(score, axis=1)
    is_top = score == top[:, None]
    chosen = tl.min(tl.where(is_top, token, vocab), axis=1)
    chosen = tl.where(chosen >= vocab, 0, chosen)
    tl.store(tokens_ptr + r, chosen.to(tl.int64), mask=rmask)
    if RETURN_LOGPROBS:
        z_chosen = tl.max(tl.where(is_top & (token == chosen[:, None]),
                                   tl.load(best_z_ptr + offs, mask=mask, other=float("-inf")),
                                   float("-inf")), axis=1)
        cmax = tl.load(z_max_ptr + offs, mask=mask, other=float("-inf"))
        csum = tl.load(z_sum_ptr + offs, mask=mask, other=0.0)
        zmax = tl.max(cmax, axis=1)
        ref = tl.where(zmax == float("-inf"), 0.0, zmax)
        total = tl.sum(csum * tl.exp(cmax - ref[:, None]), axis=1)
        # relative to the max first: z may be huge (+inf logits read as 65504) and log(total) small
        tl.store(logprobs_ptr + r, (z_chosen - ref) - tl.log(total), mask=rmask)


@triton.jit
def _uniform_noise_kernel(seed_ptr, step_ptr, out_ptr, vocab, BLOCK_V: tl.constexpr):
    """u[r, v] for a [R, vocab] output: the in-kernel noise, exposed for tests and tools."""
    r = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    key1, key2 = _noise_keys(tl.load(seed_ptr + r), tl.load(step_ptr + r))
    u = _uniform(key1, key2, cols.to(tl.uint32))
    tl.store(out_ptr + r.to(tl.int64) * vocab + cols, u, mask=cols < vocab)
