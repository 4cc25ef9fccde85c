"""top-k and top-p by sample / verify rounds: the verify pass and the decision that settles a row.

top-k and top-p: K (top-k, then top-p over the top-k set) is a threshold set, upward closed
in z (v ∈ K and z(u) ≥ z(v) ⇒ u ∈ K). So Gumbel-max over any S ⊇ K whose winner x lies in K
is the reference's token (x beats every token of K), and a token surely outside K puts every
token at or below its z outside K. Sample / verify rounds (SAMPLE_ROUNDS = 4, a fixed launch
list) use both; each row carries a state (open, refining, bisect, settled) and a lower key
bound lo (all of K has key > lo):
a. sample pass over S = {key(z) > lo} (``_sample_kernel`` with CANDIDATE): per-chunk
   winners; only open rows.
b. verify pass (``_verify_kernel``): each program first reduces its rows' chunk winners to
   the candidate x, its z (zx) and the row's max z (zmax) (chunk 0 stores the token), then
   per-lane sums, one reduction per chunk, of #{z > zx},
   #{z finite}, M(z > zx), M(all) and the count C(L) / mass M(L) of z ≥ L at 8 probe levels L
   (zx − 0, 1, 2, 4, 8 and zx + 1, 2, 4 nats; spread over its bracket for a refining row),
   with M the mass Σ e^(z − zmax) (every weight ≤ 1: no rescaling).
c. decide (``_decide_rows``, computed by every program of the next launch for its own rows:
   the next round's sample pass, or the first counting pass after the last round): x ∈ K iff
   #{z > zx} < k and M(z > zx) < top_p · M_k, M_k the mass of the top-k set (= M(all) without
   top-k: exact). With both cuts M_k is bracketed from
   the probes: C(L) ≤ k ⇒ M_k ≥ M(L); C(L) ≥ k ⇒ every token below L is out, M_k ≤ M(L); else
   M_k ≤ M(L) + (k − C(L)) e^(L − zmax); and x in the top-k set gives M_k ≥ M(z ≥ zx)
   (level 0 is zx, ties included). x ∈ K for sure: settled (its token stays). x surely
   out (#{z > zx} ≥ k, or M(z > zx) ≥ top_p · upper bound): lo ≥ key(zx), and lo ≥ key(L) − 1
   for every level L with everything below it surely out; the row resamples next round.
   Neither (the bracket is too wide): the row refines, no new sample (same noise, same x),
   and the next verify probes 8 levels spread over its bracket of the top-k threshold
   ([highest level with C ≥ k, lowest with C ≤ k]).
A program whose rows are all settled loops over nothing, so the rounds after acceptance cost
launches only.
"""
from __future__ import annotations

import triton
import triton.language as tl

from divgen.kernels.guided_sample_triton.device import (
    KEY_FLOOR, REFINE_FLOOR_NATS, _load_logits, _mix, _ordered_key, _tile_rows,
)


@triton.jit
def _probe_levels(zx, refine, center, spacing, NUM_LEVELS: tl.constexpr):
    """The verify pass's probe levels [R, NUM_LEVELS]. Level 0 is zx. An open row: zx − depth,
    depths 1, 2, 4, 8 below the candidate's z and 1, 2, 4 above it (nats of z); a refining row:
    center − (j − 1) · spacing, j = 1..7 (its bracket of the top-k threshold). The same fp32 ops
    wherever they are computed."""
    j = tl.arange(0, NUM_LEVELS)
    depth = tl.where(j == 0, 0.0, tl.where(j <= 4, tl.exp2((j - 1).to(tl.float32)),
                                            -tl.exp2((j - 5).to(tl.float32))))
    levels = tl.where(refine[:, None] & (j > 0)[None, :],
                      center[:, None] - spacing[:, None] * (j - 1).to(tl.float32)[None, :],
                      zx[:, None] - depth[None, :])
    return tl.maximum(levels, -3.4028234663852886e38)     # finite: a −inf z is below every level


@triton.jit
def _pick_candidate(rows, live, best_score_ptr, best_token_ptr, best_z_ptr, z_max_ptr, vocab, num_chunks,
                    C_BLOCK: tl.constexpr):
    """A round's candidate of each live row from the sample pass's chunk winners (as
    ``_select_kernel``: max score, ties → smallest token id, none → token 0): (token, its z, the
    row's max z)."""
    c = tl.arange(0, C_BLOCK)
    mask = live[:, None] & (c < num_chunks)[None, :]
    offs = rows[:, None] * num_chunks + c[None, :]
    score = tl.load(best_score_ptr + offs, mask=mask, other=float("-inf"))
    token = tl.load(best_token_ptr + offs, mask=mask, other=vocab)
    top = tl.max(score, axis=1)
    is_top = score == top[:, None]
    chosen = tl.min(tl.where(is_top, token, vocab), axis=1)
    chosen = tl.where(chosen >= vocab, 0, chosen)
    zx = tl.max(tl.where(is_top & (token == chosen[:, None]),
                         tl.load(best_z_ptr + offs, mask=mask, other=float("-inf")), float("-inf")), axis=1)
    zmax = tl.max(tl.load(z_max_ptr + offs, mask=mask, other=float("-inf")), axis=1)
    return chosen, zx, zmax


@triton.jit
def _verify_kernel(
    logits_ptr, stride_logits,
    plan,                  # (tile_group, tile_row0, order, group_start, w_offset, weights): ``_tile_rows``
    row_params,            # (lse, cut, inv_t, zcut) [R] fp32
    cuts,                  # (top_k [R] i64, top_p [R] fp32)
    state_ptr,
    winners,               # the round's sample partials (best_score, best_token, best_z, z_max) [R, num_chunks]
    tokens_ptr,            # out (chunk 0): [R] i64
    candidate,             # out (chunk 0): (cand_z, cand_z_max) [R] fp32
    bracket,               # (center, spacing) [R] fp32: a refining row's probe levels
    part_ptr,              # out: [R, num_chunks, 3, NUM_LEVELS] fp32
    vocab, chunk_len, num_chunks,
    M_BLOCK: tl.constexpr, K_BLOCK: tl.constexpr, G_BLOCK: tl.constexpr, BLOCK_V: tl.constexpr,
    NUM_LEVELS: tl.constexpr, C_BLOCK: tl.constexpr, MASKS: tl.constexpr,
):
    """Measure a round's candidate x (z = zx) per (tile row, chunk), weights e^(z − zmax) ≤ 1
    (zmax the row's max z: no rescaling): plane 0 / 1 = count / mass of z ≥ level_j at the probe
    levels (``_probe_levels``), plane 2 = #{z > zx}, #{z finite}, M(z > zx), M(all). Float
    comparison of z is the order of the int32 keys (−0 = +0). Per-lane sums, reduced once per
    chunk; rows settled (state ≥ 2) or with neither cut are skipped (a program with none left
    loops over nothing).

    The candidate comes first (no select launch): every program reduces its rows' chunk winners
    (``_pick_candidate``); chunk 0 stores the token of each row sampled this round (state 0, also
    rows without a cut: their token is final) and (zx, zmax) for the next launch's decision."""
    tile = tl.program_id(0)
    chunk = tl.program_id(1)
    tile_group_ptr, tile_row0_ptr, order_ptr, group_start_ptr, w_offset_ptr, weights_ptr = plan
    lse_ptr, cut_ptr, inv_t_ptr, zcut_ptr = row_params
    top_k_ptr, top_p_ptr = cuts
    best_score_ptr, best_token_ptr, best_z_ptr, z_max_ptr = winners
    cand_z_ptr, cand_z_max_ptr = candidate
    center_ptr, spacing_ptr = bracket
    pos, pos_mask, rows, start, size, w_off = _tile_rows(
        tile_group_ptr, tile_row0_ptr, order_ptr, group_start_ptr, w_offset_ptr, tile, M_BLOCK)
    state = tl.load(state_ptr + rows, mask=pos_mask, other=2)
    live = pos_mask & (state <= 1)                                    # open or refining
    chosen, zx, zmax = _pick_candidate(rows, live, best_score_ptr, best_token_ptr, best_z_ptr, z_max_ptr,
                                       vocab, num_chunks, C_BLOCK)
    writer = live & ((pos * 0 + chunk) == 0)
    tl.store(tokens_ptr + rows, chosen.to(tl.int64), mask=writer & (state == 0))
    tl.store(cand_z_ptr + rows, zx, mask=writer)
    tl.store(cand_z_max_ptr + rows, zmax, mask=writer)
    row_offsets = rows.to(tl.int64) * stride_logits
    lse = tl.load(lse_ptr + rows, mask=pos_mask, other=0.0)
    cut = tl.load(cut_ptr + rows, mask=pos_mask, other=0.0)
    inv_t = tl.load(inv_t_ptr + rows, mask=pos_mask, other=1.0)
    zcut = tl.load(zcut_ptr + rows, mask=pos_mask, other=float("-inf"))     # min-p threshold on z
    needs = (tl.load(top_k_ptr + rows, mask=pos_mask, other=0) > 0) | \
        (tl.load(top_p_ptr + rows, mask=pos_mask, other=1.0) < 1.0)
    active = live & needs
    ref = tl.where(zmax == float("-inf"), 0.0, zmax)
    levels = _probe_levels(zx, state == 1, tl.load(center_ptr + rows, mask=pos_mask, other=0.0),
                           tl.load(spacing_ptr + rows, mask=pos_mask, other=0.0), NUM_LEVELS)   # [M, L]
    cnt_lv = tl.zeros([M_BLOCK, BLOCK_V, NUM_LEVELS], dtype=tl.float32)
    mass_lv = tl.zeros([M_BLOCK, BLOCK_V, NUM_LEVELS], dtype=tl.float32)
    cnt_gt = tl.zeros([M_BLOCK, BLOCK_V], dtype=tl.float32)
    cnt_all = tl.zeros([M_BLOCK, BLOCK_V], dtype=tl.float32)
    mass_gt = tl.zeros([M_BLOCK, BLOCK_V], dtype=tl.float32)
    mass_all = tl.zeros([M_BLOCK, BLOCK_V], dtype=tl.float32)
    v_begin = chunk * chunk_len
    v_end = tl.minimum(v_begin + chunk_len, vocab)
    v_end = tl.where(tl.max(active.to(tl.int32), axis=0) > 0, v_end, v_begin)
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
            finite = (z > float("-inf")).to(tl.float32)
            w = tl.exp(z - ref[:, None])                      # 0 where z = −inf
            gt = (z > zx[:, None]).to(tl.float32)
            cnt_gt += gt
            cnt_all += finite
            mass_gt += gt * w
            mass_all += w
            ge = (z[:, :, None] >= levels[:, None, :]).to(tl.float32)   # 0/1: sums by fma
            cnt_lv += ge
            mass_lv += ge * w[:, :, None]
    j = tl.arange(0, NUM_LEVELS)
    out = ((rows * num_chunks + chunk) * 3)[:, None] * NUM_LEVELS + j[None, :]          # [M, L]
    amask = active[:, None] & (j[None, :] < NUM_LEVELS)
    tl.store(part_ptr + out, tl.sum(cnt_lv, axis=1), mask=amask)
    tl.store(part_ptr + out + NUM_LEVELS, tl.sum(mass_lv, axis=1), mask=amask)
    scal = tl.where(j[None, :] == 0, tl.sum(cnt_gt, axis=1)[:, None],
                    tl.where(j[None, :] == 1, tl.sum(cnt_all, axis=1)[:, None],
                             tl.where(j[None, :] == 2, tl.sum(mass_gt, axis=1)[:, None],
                                      tl.sum(mass_all, axis=1)[:, None])))
    tl.store(part_ptr + out + 2 * NUM_LEVELS, scal, mask=amask & (j[None, :] < 4))


@triton.jit
def _decide_rows(
    rows, valid, state, part_ptr, top_k_ptr, top_p_ptr, cand_z_ptr, cand_z_max_ptr,
    lo_ptr, center_ptr, spacing_ptr, vocab, num_chunks,
    M_BLOCK: tl.constexpr, NUM_LEVELS: tl.constexpr, LAST: tl.constexpr,
):
    """Accept or reject each live row's candidate x (valid, state ≤ 1) from the verify sums of
    the last round; returns (state, lo, center, spacing, live) for the rows, unchanged where not
    live. Computed by every program of the launch after the verify pass (the next round's sample
    pass, or the first counting pass after the last round), the same for all.

    x ∈ K iff #{z > zx} < k and (top-p) M(z > zx) < top_p · M_k, M_k the mass of the top-k set
    (M(all) without top-k). With top-k, M_k is bracketed from the probes (count C, mass M of
    z ≥ L): C(L) ≤ k puts every such token in the top-k set (M_k ≥ M(L)); C(L) ≥ k puts every
    token below L out (M_k ≤ M(L)); else at most k − C(L) tokens below L are in, each of weight
    ≤ e^(L − zmax) (M_k ≤ M(L) + (k − C(L)) e^(L − zmax)); x in the top-k set puts every z ≥ zx
    in it (M_k ≥ M(z ≥ zx), level 0). Accept (state 3, the token stays) when
    x ∈ K for sure. Every level known to have all tokens below it outside K (C(L) ≥ k, or
    M(L) ≥ top_p · M_k upper bound) raises lo to key(L) − 1, and x itself when surely outside
    (lo ≥ key(zx)); the row stays open (state 0, a new sample). An ambiguous row refines (state
    1: no new sample, the next verify probes 8 levels spread over its bracket of the top-k
    threshold, [highest level with C ≥ k, lowest with C ≤ k]). LAST: rows not accepted go to the
    exact bisection (state 2). Rows with neither cut are accepted.
    """
    j = tl.arange(0, NUM_LEVELS)
    rmask = valid & (state <= 1)
    mask = rmask[:, None] & (j < NUM_LEVELS)[None, :]
    cnt_lv = tl.zeros([M_BLOCK, NUM_LEVELS], dtype=tl.float32)
    mass_lv = tl.zeros([M_BLOCK, NUM_LEVELS], dtype=tl.float32)
    scal = tl.zeros([M_BLOCK, NUM_LEVELS], dtype=tl.float32)
    for c in range(0, num_chunks):          # chunk partials, one [M, L] block at a time
        base = ((rows * num_chunks + c) * 3)[:, None] * NUM_LEVELS + j[None, :]
        cnt_lv += tl.load(part_ptr + base, mask=mask, other=0.0)
        mass_lv += tl.load(part_ptr + base + NUM_LEVELS, mask=mask, other=0.0)
        scal += tl.load(part_ptr + base + 2 * NUM_LEVELS, mask=mask & (j < 4)[None, :], other=0.0)
    cnt_gt = tl.sum(tl.where(j[None, :] == 0, scal, 0.0), axis=1)
    cnt_all = tl.sum(tl.where(j[None, :] == 1, scal, 0.0), axis=1)
    mass_gt = tl.sum(tl.where(j[None, :] == 2, scal, 0.0), axis=1)
    mass_all = tl.sum(tl.where(j[None, :] == 3, scal, 0.0), axis=1)
    top_k = tl.load(top_k_ptr + rows, mask=rmask, other=0)
    top_p = tl.load(top_p_ptr + rows, mask=rmask, other=1.0)
    has_k = top_k > 0
    has_p = top_p < 1.0
    k = tl.minimum(top_k, vocab).to(tl.float32)
    zx = tl.load(cand_z_ptr + rows, mask=rmask, other=0.0)
    zmax = tl.load(cand_z_max_ptr + rows, mask=rmask, other=0.0)
    center_old = tl.load(center_ptr + rows, mask=valid, other=0.0)
    spacing_old = tl.load(spacing_ptr + rows, mask=valid, other=0.0)
    levels = _probe_levels(zx, state == 1, center_old, spacing_old, NUM_LEVELS)
    w_level = tl.exp(levels - tl.where(zmax == float("-inf"), 0.0, zmax)[:, None])
    in_k = (cnt_gt < k) | (~has_k)
    m_lo = tl.maximum(tl.where(cnt_all <= k, mass_all, 0.0),
                      tl.max(tl.where(cnt_lv <= k[:, None], mass_lv, 0.0), axis=1))
    # x in the top-k set: so is every z ≥ zx (ties included), level 0 is zx
    m_lo = tl.maximum(m_lo, tl.where(in_k, tl.sum(tl.where(j[None, :] == 0, mass_lv, 0.0), axis=1), 0.0))
    m_hi = tl.minimum(mass_all, tl.min(tl.where(cnt_lv >= k[:, None], mass_lv,
                                                 mass_lv + (k[:, None] - cnt_lv) * w_level), axis=1))
    m_lo = tl.where(has_k, m_lo, mass_all)
    m_hi = tl.where(has_k, m_hi, mass_all)
    in_p = (mass_gt < top_p * m_lo) | (~has_p)
    accept = in_k & in_p
    reject = (~in_k) | (has_p & (mass_gt >= top_p * m_hi))
    below_out = (has_k[:, None] & (cnt_lv >= k[:, None])) | \
        (has_p[:, None] & (mass_lv >= (top_p * m_hi)[:, None]))                             # [M, L]
    level_lo = tl.max(tl.where(below_out, _ordered_key(levels).to(tl.int64) - 1, KEY_FLOOR), axis=1)
    lo_old = tl.load(lo_ptr + rows, mask=valid, other=0)
    lo = tl.maximum(lo_old, level_lo)
    lo = tl.where(reject, tl.maximum(lo, _ordered_key(zx).to(tl.int64)), lo)
    # the refine bracket: [highest level with C ≥ k, lowest level with C ≤ k]
    upper = tl.min(tl.where(cnt_lv <= k[:, None], levels, float("inf")), axis=1)
    upper = tl.where(upper == float("inf"), tl.max(levels, axis=1), upper)
    lower = tl.max(tl.where(cnt_lv >= k[:, None], levels, float("-inf")), axis=1)
    lower = tl.where(lower == float("-inf"), upper - REFINE_FLOOR_NATS, lower)
    if LAST:
        new_state = tl.where(accept, 3, 2)
    else:
        new_state = tl.where(accept, 3, tl.where(reject, 0, 1))
    return (tl.where(rmask, new_state, state), tl.where(rmask, lo, lo_old),
            tl.where(rmask, upper, center_old),
            tl.where(rmask, (upper - lower) * (1.0 / (NUM_LEVELS - 2)), spacing_old), rmask)
