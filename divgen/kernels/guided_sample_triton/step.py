"""The host side of the guided sampler: launch tiles (once per plan), launch configuration (once
per vocabulary) and the step, a fixed list of launches with no host sync.

Launches (``launch_count``), a fixed list per plan: a plain step 3 (stats, sample, select; the
sample pass combines the stats itself, ``_combine_stats``, when its tiles are whole groups, i.e.
groups of ≤ 16 rows; 4 with larger groups, whose mixing reads other tiles' rows' lse). With
``any_top_k_top_p``: stats + 4 rounds · 2 (sample, verify) + 2 · 8 counting passes + final
sample + select = 27 (28 with groups > 16 rows; 20 with log-probs, which skip the rounds and
keep the row-stats launch), against 52 before the fusions below (20 before the rounds). Most of
them, once rows settle, run programs that read their rows' state and exit (a fixed cost, ~1–2 µs
each in a CUDA graph, not measured without a GPU); a few elementwise torch ops set up the per-row
parameters and buffers. No launch has a reduction of its own: a round's candidate is reduced by
the verify programs (``_pick_candidate``), its decision by the next launch's programs
(``_decide_rows``), each narrowing by the next counting pass's (``_narrow_rows``), the stats by
the first sample pass's (``_combine_stats``), every program for its own rows from the same
partials in the same order (identical results; chunk 0 stores them). Per-round state buffers
keep any launch from reading what it writes. The price: each program re-reads its rows'
partials from L2 (≤ M · 64 chunks · 24 floats, masked to live rows).
The passes' instruction costs, the measured distribution of rounds and why 4 rounds of 15
pivots are in kernels/README.md ("Passes, rounds and launches").
Nothing reads back to the host, so the step can be captured in a CUDA graph.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache

import torch
import triton

from divgen.kernels.guided_sample_triton.bisect import _threshold_count_kernel
from divgen.kernels.guided_sample_triton.device import (
    CPU_ROW_BLOCK, CPU_TILE_ELEMS, CUDA_K_BLOCK, CUDA_ROW_BLOCK, CUDA_STATS_BLOCK_V, CUDA_TILES,
    GUMBEL_MAX, KEY_BELOW_ALL, MAX_CHUNKS, NUM_LEVELS, NUM_PIVOTS, PIVOT_BITS,
    SAMPLE_ROUNDS, SINGLE_TILE_MAX, STATE_ACCEPTED, STATE_REFINE, THRESHOLD_PASSES,
)
from divgen.kernels.guided_sample_triton.gumbel import _sample_kernel, _select_kernel, _uniform_noise_kernel
from divgen.kernels.guided_sample_triton.rounds import _verify_kernel
from divgen.kernels.guided_sample_triton.stats import _row_stats_kernel, _stats_kernel
from divgen.kernels.plan import SamplePlan, build_sample_plan, next_power_of_2
from divgen.kernels.reference import sampling_temperature, step_arguments, step_tensor


@dataclass(frozen=True)
class Tiles:
    """The plan's launch tiles: tile t is rows [row0, row0 + m_block) of group tile_group[t]."""
    m_block: int
    k_block: int
    g_block: int
    tile_group: torch.Tensor    # [T] int32
    tile_row0: torch.Tensor     # [T] int32
    busy: int = 0               # static plans: tiles with rows when the run's groups are full (chunking)

    @property
    def count(self) -> int:
        return self.tile_group.shape[0]

    @property
    def working(self) -> int:
        """Tiles that do work, for splitting the vocabulary: a static plan's padding tiles exit at
        once, so it splits as for its full groups, not for its R padded tiles."""
        return self.busy or self.count


def tile_shape(g_block: int, on_cuda: bool) -> tuple[int, int]:
    """(rows per program M, contracted rows per mixing step K) for a group block."""
    if g_block <= SINGLE_TILE_MAX:
        return g_block, g_block
    if on_cuda:
        return CUDA_ROW_BLOCK, CUDA_K_BLOCK
    return min(g_block, CPU_ROW_BLOCK), min(g_block, CPU_ROW_BLOCK)


def prepare_plan(plan: SamplePlan, m_block: int | None = None, k_block: int | None = None) -> SamplePlan:
    """Add the launch tiles to a plan (host side, once): every group split into m_block-row tiles."""
    g_block = plan.g_block
    m_auto, k_auto = tile_shape(g_block, plan.device.type == "cuda")
    m_block, k_block = m_block or m_auto, k_block or k_auto
    if g_block > 1 and m_block < g_block and (m_block < 16 or k_block < 16):
        raise ValueError("groups split over several tiles need m_block, k_block >= 16 (tl.dot)")
    groups, row0 = [], []
    for g, n in enumerate(plan.group_sizes):
        for r in range(0, n, m_block):
            groups.append(g)
            row0.append(r)
    if plan.static_block:       # R tiles whatever the groups (a fixed grid); the extra ones on an empty group
        empty = plan.group_sizes.index(0) if len(groups) < plan.rows else 0
        groups += [empty] * (plan.rows - len(groups))
        row0 += [0] * (plan.rows - len(row0))
    dev = plan.device
    # a static plan splits the vocabulary as for full groups of its block: R / block groups of
    # ⌈block / m_block⌉ tiles (a fixed number, so the launch shape never changes either)
    busy = max(1, plan.rows // g_block) * triton.cdiv(g_block, m_block) if plan.static_block else 0
    tiles = Tiles(m_block=m_block, k_block=k_block, g_block=g_block,
                  tile_group=torch.tensor(groups, dtype=torch.int32, device=dev),
                  tile_row0=torch.tensor(row0, dtype=torch.int32, device=dev), busy=busy)
    return SamplePlan(**{**plan.__dict__, "prepared": tiles})


@lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@dataclass(frozen=True)
class LaunchConfig:
    block_v: int       # tokens per tile of the sample pass (power of two)
    count_block_v: int  # tokens per tile of the counting passes
    verify_block_v: int  # tokens per tile of the verify pass (20 per-lane sums a logit)
    stats_block_v: int
    chunk_len: int     # tokens per program (a multiple of block_v)
    num_chunks: int    # programs per tile along the vocabulary (≤ MAX_CHUNKS)
    num_warps: int


def launch_config(vocab: int, tiles: Tiles, device: torch.device, block_v: int | None = None,
                  num_chunks: int | None = None) -> LaunchConfig:
    """Tile and vocabulary split. On a GPU: enough (tile, chunk) programs to fill the SMs ~4×."""
    on_cuda = device.type == "cuda"
    m = tiles.m_block
    if on_cuda:
        tile_v, num_warps = CUDA_TILES[m]
        count_v, stats_v = max(16, 32 * num_warps // m), CUDA_STATS_BLOCK_V
        verify_v = max(16, (64 if m == 1 else 32) * num_warps // m)   # 2 / 1 logits a thread
    else:
        tile_v, num_warps = max(16, CPU_TILE_ELEMS // m), 4
        count_v, stats_v = tile_v, CPU_TILE_ELEMS
        verify_v = tile_v
    if block_v is None:
        block_v = min(tile_v, max(16, next_power_of_2(vocab)))
    if block_v < 16 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two >= 16, got {block_v}")
    count_v = min(count_v, block_v)
    verify_v = min(verify_v, block_v)
    tiles_v = triton.cdiv(vocab, block_v)
    if num_chunks is None:
        num_chunks = triton.cdiv(4 * _sm_count(device.index or 0), tiles.working) if on_cuda else 1
    num_chunks = max(1, min(num_chunks, tiles_v, MAX_CHUNKS))
    chunk_len = triton.cdiv(tiles_v, num_chunks) * block_v
    return LaunchConfig(block_v=block_v, count_block_v=count_v, verify_block_v=verify_v,
                        stats_block_v=min(stats_v, next_power_of_2(vocab)),
                        chunk_len=chunk_len, num_chunks=triton.cdiv(vocab, chunk_len), num_warps=num_warps)


@dataclass(frozen=True)
class _StepInputs:
    logits: torch.Tensor
    plan: SamplePlan
    tiles: Tiles
    cfg: LaunchConfig
    lse: torch.Tensor
    cut: torch.Tensor
    inv_t: torch.Tensor
    zcut: torch.Tensor

    @property
    def plan_args(self) -> tuple:
        """The kernels' ``plan`` argument (``_tile_rows``)."""
        t, p = self.tiles, self.plan
        return (t.tile_group, t.tile_row0, p.order, p.group_start, p.w_offset, p.weights)

    @property
    def row_params(self) -> tuple:
        """The kernels' ``row_params`` argument."""
        return (self.lse, self.cut, self.inv_t, self.zcut)


def _bisect(inp: _StepInputs, top_k: torch.Tensor, top_p: torch.Tensor, state_prev: torch.Tensor,
            state: torch.Tensor, decide: tuple | None):
    """The exact bisection of both thresholds: THRESHOLD_PASSES counting passes for the top-k
    threshold, then as many for top-p (over the top-k set), one launch each; every pass narrows
    the previous one's interval itself (``_narrow_rows``), the first top-p pass finishes the
    top-k threshold (stored in lo_top_k), and the final sample finishes top-p. decide: the last
    round's (part, cand_z, cand_z_max, lo_r, rounds, center, spacing), decided by the first pass
    (state_prev → state); None: state is already final (log-probs: every row bisects).
    Returns (lo_top_k, the last top-p pass's lo, its partials)."""
    logits, plan, tiles, cfg = inp.logits, inp.plan, inp.tiles, inp.cfg
    rows, vocab = logits.shape
    dev = logits.device
    slots = tiles.count * tiles.m_block           # partials by tile slot (``_narrow_rows``)
    measure = torch.empty(2, slots, cfg.num_chunks, NUM_PIVOTS, dtype=torch.float32, device=dev)
    measure_max = torch.empty(2, slots, cfg.num_chunks, dtype=torch.float32, device=dev)
    lo = torch.empty(2 * THRESHOLD_PASSES, rows, dtype=torch.int64, device=dev)
    lo_top_k = torch.empty(rows, dtype=torch.int64, device=dev)
    for g in range(2 * THRESHOLD_PASSES):
        p = g % THRESHOLD_PASSES
        mass = g >= THRESHOLD_PASSES
        shift = 32 - PIVOT_BITS * (p + 1)
        first_decides = g == 0 and decide is not None
        _threshold_count_kernel[(tiles.count, cfg.num_chunks)](
            logits, logits.stride(0), inp.plan_args, inp.row_params, (top_k, top_p),
            lo_top_k, lo[g - 1] if g else lo[0], lo[g], shift, shift + PIVOT_BITS,
            state_prev if g == 0 else state,
            (measure[(g - 1) % 2], measure_max[(g - 1) % 2]), (measure[g % 2], measure_max[g % 2]),
            (*decide, state) if first_decides else None,
            vocab, cfg.chunk_len, cfg.num_chunks,
            M_BLOCK=tiles.m_block, K_BLOCK=tiles.k_block, G_BLOCK=tiles.g_block, BLOCK_V=cfg.count_block_v,
            NUM_PIVOTS=NUM_PIVOTS, MASS=mass, APPLY_TOP_K=mass, FIRST=p == 0,
            DECIDE=first_decides, FINISH_TOP_K=g == THRESHOLD_PASSES, NUM_LEVELS=NUM_LEVELS,
            MASKS=plan.masks,
            num_warps=cfg.num_warps,
        )
    last = 2 * THRESHOLD_PASSES - 1
    return lo_top_k, lo[last], measure[last % 2], measure_max[last % 2]


def fuses_stats(tiles: Tiles, any_top_k_top_p: bool, return_logprobs: bool) -> bool:
    """Whether the first sample pass combines the stats itself (no row-stats launch): its tiles
    are whole groups (the mixing reads only the tile's own rows' lse) and it is the first pass
    after the stats (not so for top-k/top-p with log-probs, which start with a counting pass)."""
    return tiles.m_block == tiles.g_block and not (any_top_k_top_p and return_logprobs)


def launch_count(any_top_k_top_p: bool, return_logprobs: bool = False, rounds: int | None = None,
                 fused_stats: bool = True, min_p: bool = False) -> int:
    """Triton launches of one step (the fixed launch list of ``guided_sample_step``; the per-row
    parameters add a few elementwise torch ops): stats (+ row stats unless fused, ``fuses_stats``)
    + sample + select, and with top-k/top-p 2 a round (sample, verify; none with log-probs)
    + 2 · THRESHOLD_PASSES counting passes; min-p adds its max pass (a greedy sample pass)."""
    rounds = SAMPLE_ROUNDS if rounds is None else rounds
    base = 3 + (not (fused_stats and not (any_top_k_top_p and return_logprobs))) + bool(min_p)
    if not any_top_k_top_p:
        return base
    return base + (0 if return_logprobs else 2 * rounds) + 2 * THRESHOLD_PASSES


def guided_sample_step(logits: torch.Tensor, plan: SamplePlan, seeds: torch.Tensor, step: torch.Tensor,
                       temperature: torch.Tensor, alpha: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                       *, min_p: torch.Tensor | None = None, any_top_k_top_p: bool = True,
                       noise: torch.Tensor | None = None,
                       return_logprobs: bool = False, block_v: int | None = None,
                       num_chunks: int | None = None, trace: dict | None = None):
    """The capturable step (Triton): device buffers in, tokens out; no checks, no host sync.

    Arguments as ``divgen.kernels.guided_sample_step``; the plan must come from
    ``build_sample_plan`` with this module's ops (it carries the launch tiles). Fixed launches
    (``launch_count``): stats (+ row stats for groups > 16 rows, ``fuses_stats``) + sample +
    select = 3 (4), and with any_top_k_top_p SAMPLE_ROUNDS rounds of (sample, verify) + 2 ·
    THRESHOLD_PASSES counting passes before the final sample and select: 3 + 2 · 4 + 16 = 27
    (28; 20 with log-probs, which skip the rounds; module docstring), plus a few elementwise torch
    ops for the per-row parameters; all capturable in a CUDA graph. trace (tests, tools): a dict
    that receives the per-row final ``state`` (STATE_ACCEPTED: settled by a round; STATE_BISECT:
    by the bisection) and ``rounds`` (rounds the row was open or refining in) as device tensors.

    min_p (the peers' min-p on the tempered guided scores z): its threshold max z + log min_p
    needs each row's max z first, so a min_p tensor adds one pass before the others: the plain
    sample pass with every row greedy and no cut (its chunk winners are the chunk maxima of z);
    every later pass drops z below the threshold (``zcut``, −inf without min-p).
    """
    rows, vocab = logits.shape
    dev = logits.device
    tiles = plan.prepared
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    cfg = launch_config(vocab, tiles, dev, block_v, num_chunks)
    c_block = next_power_of_2(cfg.num_chunks)

    # per-row parameters (elementwise, on the device)
    greedy, t_div = sampling_temperature(temperature.float())
    inv_t = 1.0 / t_div
    cutoff = torch.log(alpha.float())
    part_max = torch.empty(rows, cfg.num_chunks, dtype=torch.float32, device=dev)
    part_sum = torch.empty_like(part_max)
    _stats_kernel[(rows, cfg.num_chunks)](
        logits, logits.stride(0), part_max, part_sum, vocab, cfg.chunk_len, cfg.num_chunks,
        BLOCK_V=cfg.stats_block_v, num_warps=cfg.num_warps,
    )
    lse = torch.empty(rows, dtype=torch.float32, device=dev)
    cut = torch.empty_like(lse)
    block_r = max(1, min(next_power_of_2(rows), 4096 // c_block, 64))
    fuse_stats = fuses_stats(tiles, any_top_k_top_p, return_logprobs)    # else a row-stats launch
    if not fuse_stats:
        _row_stats_kernel[(triton.cdiv(rows, block_r),)](
            part_max, part_sum, cutoff, lse, cut, rows, cfg.num_chunks, BLOCK_R=block_r, C_BLOCK=c_block,
        )
    zcut = torch.full((rows,), float("-inf"), dtype=torch.float32, device=dev)     # min-p off
    tokens = torch.empty(rows, dtype=torch.int64, device=dev)
    logprobs = torch.empty(rows, dtype=torch.float32, device=dev)
    best_score = torch.empty(rows, cfg.num_chunks, dtype=torch.float32, device=dev)
    best_token = torch.empty(rows, cfg.num_chunks, dtype=torch.int32, device=dev)
    best_z, z_max, z_sum = (torch.empty_like(best_score) for _ in range(3))
    greedy_i = greedy.to(torch.int32)
    winners = (best_score, best_token, best_z, z_max, z_sum)

    def sample(inp: _StepInputs, top=None, *, candidate: bool = False, decide=None, narrow=None,
               stats: bool = False, max_pass: bool = False):
        """One sample pass; top: (lo_top_k, lo_top_p, state, skip_from) with top-k/top-p."""
        lo_k, lo_p, state, skip_from = top or (None, None, None, 0)
        _sample_kernel[(tiles.count, cfg.num_chunks)](
            logits, logits.stride(0), None if noise is None else (noise, noise.stride(0)),
            inp.plan_args, inp.row_params, (torch.ones_like(greedy_i) if max_pass else greedy_i, seeds, step),
            winners, vocab, cfg.chunk_len, cfg.num_chunks,
            None if top is None else (top_k, top_p, lo_k, lo_p), state, skip_from,
            decide, narrow, (part_max, part_sum, cutoff) if stats else None,
            M_BLOCK=tiles.m_block, K_BLOCK=tiles.k_block, G_BLOCK=tiles.g_block, BLOCK_V=cfg.block_v,
            HAS_NOISE=noise is not None, TOP_K_TOP_P=top is not None,
            RETURN_LOGPROBS=return_logprobs and not candidate and not max_pass,
            CANDIDATE=candidate, GUMBEL_MAX=GUMBEL_MAX, DECIDE=decide is not None, NARROW_P=narrow is not None,
            NUM_LEVELS=NUM_LEVELS, NUM_PIVOTS=NUM_PIVOTS, FUSE_STATS=stats, C_BLOCK=c_block, MASKS=plan.masks,
            num_warps=cfg.num_warps,
        )

    def select(state=None, skip_from: int = 0):
        """Reduce the chunk winners; state: rows whose state is ≥ skip_from keep their token."""
        _select_kernel[(triton.cdiv(rows, block_r),)](
            best_score, best_token, best_z, z_max, z_sum, state, skip_from, tokens, logprobs,
            rows, vocab, cfg.num_chunks,
            BLOCK_R=block_r, C_BLOCK=c_block, RETURN_LOGPROBS=return_logprobs, SKIP_SETTLED=state is not None,
        )

    inp = _StepInputs(logits=logits, plan=plan, tiles=tiles, cfg=cfg, lse=lse, cut=cut, inv_t=inv_t, zcut=zcut)
    if min_p is not None:          # the rows' max z (greedy winners, no cut), then the threshold
        sample(inp, stats=fuse_stats, max_pass=True)
        fuse_stats = False         # lse and cut are stored now
        z_top = best_score.max(dim=1).values                                   # [R]
        zcut = torch.where(min_p > 0, z_top + torch.log(min_p.float()), zcut)
        inp = dataclasses.replace(inp, zcut=zcut)
    if not any_top_k_top_p:
        sample(inp, stats=fuse_stats)
        select()
        return (tokens, logprobs) if return_logprobs else tokens

    rounds = torch.zeros(rows, dtype=torch.int32, device=dev)
    if return_logprobs:           # log-probs need the whole of K: straight to the bisection
        state_prev = state = torch.zeros(rows, dtype=torch.int32, device=dev)
        decide = None
    else:
        n = SAMPLE_ROUNDS
        # per-round buffers (round r reads round r − 1's, the deciding program of a row writes
        # round r's: no launch reads what it writes)
        st = torch.zeros(n + 1, rows, dtype=torch.int32, device=dev)
        lo_r = torch.full((n + 1, rows), KEY_BELOW_ALL, dtype=torch.int64, device=dev)
        bracket = torch.zeros(2, n + 1, rows, dtype=torch.float32, device=dev)     # center, spacing
        cand = torch.empty(2, rows, dtype=torch.float32, device=dev)                # zx, zmax
        part = torch.empty(rows, cfg.num_chunks, 3, NUM_LEVELS, dtype=torch.float32, device=dev)
        for r in range(n):
            prev = max(r - 1, 0)
            decide = (part, cand[0], cand[1], st[r], lo_r[r], rounds, bracket[0, prev], bracket[1, prev],
                      bracket[0, r], bracket[1, r]) if r else None
            sample(inp, (lo_r[prev], lo_r[prev], st[prev], STATE_REFINE), candidate=True, decide=decide,
                   stats=fuse_stats and r == 0)
            _verify_kernel[(tiles.count, cfg.num_chunks)](
                logits, logits.stride(0), inp.plan_args, inp.row_params, (top_k, top_p), st[r],
                winners[:4], tokens, (cand[0], cand[1]), (bracket[0, r], bracket[1, r]), part,
                vocab, cfg.chunk_len, cfg.num_chunks,
                M_BLOCK=tiles.m_block, K_BLOCK=tiles.k_block, G_BLOCK=tiles.g_block, BLOCK_V=cfg.verify_block_v,
                NUM_LEVELS=NUM_LEVELS, C_BLOCK=c_block, MASKS=plan.masks, num_warps=cfg.num_warps,
            )
        state_prev, state = st[n - 1], st[n]
        decide = (part, cand[0], cand[1], lo_r[n - 1], rounds, bracket[0, n - 1], bracket[1, n - 1])
    lo_top_k, lo_p, measure, measure_max = _bisect(inp, top_k, top_p, state_prev, state, decide)
    sample(inp, (lo_top_k, lo_p, state, STATE_ACCEPTED), narrow=(measure, measure_max))
    select(state, STATE_ACCEPTED)
    if trace is not None:           # tests and tools: per-row final state and rounds open
        trace.update(state=state, rounds=rounds)
    return (tokens, logprobs) if return_logprobs else tokens


def guided_sample(logits: torch.Tensor, mix: torch.Tensor | None, *, block_v: int | None = None,
                  num_chunks: int | None = None, m_block: int | None = None, k_block: int | None = None,
                  trace: dict | None = None, **sampling):
    """Guided sampling from logits, fused (the twin of ``reference.guided_sample``), for direct
    callers: checks the arguments (host syncs), builds the plan, runs the capturable step.

    Semantics and the sampling arguments (seeds, step, temperature, alpha, top_k, top_p, min_p,
    noise, return_logprobs): ``divgen.kernels.reference.guided_sample``, checked by the same
    ``reference.step_arguments``. ``mix`` is read as blocks (the connected components of its
    non-zero pattern; rows of a group may be anywhere in the batch, up to 256 a group).
    block_v, num_chunks, m_block, k_block override the launch shape (tests). Raises ValueError
    for the reference's bad arguments and for a group over 256 rows.
    """
    args = step_arguments(logits, mix, **sampling)
    if args["noise"] is not None:
        args["noise"] = args["noise"].to(device=logits.device, dtype=torch.float32).contiguous()
    plan = prepare_plan(build_sample_plan(mix, logits.device, rows=logits.shape[0], ops=_NoPrepare), m_block, k_block)
    return guided_sample_step(logits, plan, **args, block_v=block_v, num_chunks=num_chunks, trace=trace)


class _NoPrepare:
    """Stand-in ops for plans whose tiles this module adds itself (``guided_sample``)."""
    @staticmethod
    def prepare_plan(plan):
        return plan


def uniform_noise(seeds: torch.Tensor, step, vocab_size: int) -> torch.Tensor:
    """The kernels' uniforms u [R, V] fp32, computed on the device by the same code as the sampler
    (keys from seeds and the per-row step counters in the kernel). Equal bit for bit to
    ``reference.uniform_noise`` (a test checks it)."""
    rows = seeds.shape[0]
    steps = step_tensor(step, rows, seeds.device).contiguous()
    out = torch.empty(rows, vocab_size, dtype=torch.float32, device=seeds.device)
    block_v = min(1024, next_power_of_2(vocab_size))
    _uniform_noise_kernel[(rows, triton.cdiv(vocab_size, block_v))](
        seeds.to(torch.int64).contiguous(), steps, out, vocab_size, BLOCK_V=block_v
    )
    return out
