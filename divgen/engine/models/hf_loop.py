"""The slow path: an eager decode loop over the HF forward and its growing cache, for
architectures that divgen's own forward does not cover (e.g. Gemma 3). Same semantics and
results as ``divgen.engine.decode.generate``, which calls it for those models.

    generate_hf(lm, prompts, ...) -> (results, stats)

* Prompts are left-padded into one batch; positions come from the attention mask, so each row
  sees exactly the positions it would see alone.
* Each step forwards only the rows still running; when rows finish (EOS, stop string, length)
  they leave the batch and the KV cache, so finished rows stop costing compute.
* Guidance (CorrSynth, CFG, ...) is a ``Guidance`` over rows; rows are reordered so each group
  is contiguous (the kernel's block form) and the mix is rebuilt only when the batch changes.
  CFG shadow rows take their leader's token and are not returned.
* Sampling noise is a pure function of (seed, step, token): a row's text does not depend on the
  batch it was decoded in.
"""
from __future__ import annotations

import inspect
import time
from typing import Iterable

import torch

from divgen.engine.errors import DivgenError
from divgen.engine.decode import BatchListener, GenerationResult, RunStats, _StopChecker
from divgen.engine.guidance import Guidance, mixing_matrix
from divgen.engine.model import LoadedModel
from divgen.engine.copy_guard import CopyGuard, GuardState, ban_copies, build_tables
from divgen.engine.copy_guard import push as push_history
from divgen.engine.sampling import Sampler, SamplingParams


def _leader_positions(guidance: Guidance | None, active: list[int], device) -> torch.Tensor | None:
    """For CFG: batch position of each row's leader (itself for sample rows), [B] int64; else None.
    Rebuilt only when the batch changes, not every step."""
    if guidance is None or guidance.shadow_of is None:
        return None
    pos = {r: i for i, r in enumerate(active)}
    return torch.tensor([pos[guidance.leader(r)] for r in active], dtype=torch.int64, device=device)


def _supports_logits_to_keep(model) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _cache_keyword(model) -> str:
    """The installed transformers' name for the cache argument: ``cache`` since it replaced the
    deprecated ``past_key_values`` (which warns and goes away in 5.40), else the old name."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def generate_hf_batched(lm: LoadedModel, encoded: list[list[int]], params: SamplingParams, *, max_new_tokens: int,
                        stopper: _StopChecker, guidance: Guidance | None, listeners: list, progress=None,
                        max_batch_rows: int | None = None, on_result=None, copy_guard: CopyGuard | None = None,
                        own: torch.Tensor | None = None) -> tuple[list[GenerationResult], RunStats]:
    """``generate`` on the HF forward: fixed batches of whole guidance groups, at most
    ``max_batch_rows`` rows each (no continuous batching on the slow path). copy_guard, own: as
    the engine's (``generate``): the same bans and the same own-token rule, per batch."""
    from divgen.engine.scheduler import Scheduler

    n_rows = len(encoded)
    units = Scheduler(n_rows, guidance, max(n_rows, 1)).groups
    limit = max_batch_rows or n_rows
    batches, current = [], []
    for unit in units:
        if len(unit.rows) > limit:
            raise DivgenError(f"a guidance group of {len(unit.rows)} rows does not fit {limit} rows per batch: "
                              f"raise max_batch_rows / --batch-rows to at least {len(unit.rows)}")
        if current and len(current) + len(unit.rows) > limit:
            batches.append(current)
            current = []
        current = current + unit.rows
    batches.append(current)
    results, total = {}, RunStats(slots=limit)
    for i, rows in enumerate(batches):
        sub = None
        if guidance is not None:
            sub = _restrict(guidance, rows)
        index = torch.tensor(rows, dtype=torch.int64, device=lm.device)
        guard = None if copy_guard is None else CopyGuard(copy_guard.n, [copy_guard.sources[r] for r in rows])
        res, stats = generate_hf(lm, [encoded[r] for r in rows], params.select(index),
                                 max_new_tokens=max_new_tokens, stopper=stopper, guidance=sub,
                                 batch_listeners=[_Remap(listener, index) for listener in listeners],
                                 progress=progress, copy_guard=guard, own=own)
        for r in res:
            r.row = rows[r.row]
            results[r.row] = r
            if on_result is not None:
                on_result(r)
        for name in ("prompt_tokens", "generated_tokens", "rows_forwarded", "slots_forwarded", "steps",
                     "wall_time_s", "prefill_time_s"):
            setattr(total, name, getattr(total, name) + getattr(stats, name))
        total.rows_forwarded_per_step += stats.rows_forwarded_per_step
        total.waiting_per_step += [i < len(batches) - 1] * len(stats.rows_forwarded_per_step)
    return [results[r] for r in sorted(results)], total


class _Remap(BatchListener):
    """Maps a sub-batch's row indices back to the caller's prompt rows."""

    def __init__(self, listener, index):
        self.listener, self.index = listener, index

    def set_batch(self, rows):
        self.listener.set_batch(self.index[rows])


def _restrict(guidance: Guidance, rows: list[int]) -> Guidance:
    """The guidance of a subset of rows (shadow indices renumbered)."""
    pos = {r: i for i, r in enumerate(rows)}
    groups = tuple(guidance.groups[r] for r in rows)
    labels = None if guidance.labels is None else tuple(guidance.labels[r] for r in rows)
    shadow = None if guidance.shadow_of is None else tuple(
        None if guidance.shadow_of[r] is None else pos[guidance.shadow_of[r]] for r in rows)
    gammas = None if guidance.gammas is None else guidance.gammas[rows][:, rows]
    return Guidance(guidance.method, groups, g=guidance.g, gamma=guidance.gamma, delta=guidance.delta,
                    labels=labels, shadow_of=shadow, gammas=gammas)


@torch.inference_mode()
def generate_hf(lm: LoadedModel, encoded: list[list[int]], params_all: SamplingParams, *, max_new_tokens: int,
                stopper: _StopChecker, guidance: Guidance | None = None,
                batch_listeners: Iterable[BatchListener] = (), progress=None, copy_guard: CopyGuard | None = None,
                own: torch.Tensor | None = None) -> tuple[list[GenerationResult], RunStats]:
    """One fixed batch on the HF forward (the pre-engine loop): rows leave the batch and the HF
    cache as they finish. copy_guard: each sample row's n-gram table and history (the engine's
    ``GuardState``, one entry per prompt row), banned before sampling; own: the own-token mask."""
    start = time.perf_counter()
    n_rows = len(encoded)
    device = lm.device
    listeners = list(batch_listeners)
    sampler = Sampler()

    # Batch order: rows of a guidance group are contiguous (stable, so FewGen keeps prompt order).
    order = list(range(n_rows))
    if guidance is not None:
        order.sort(key=lambda r: guidance.groups[r])
    is_shadow = [guidance is not None and guidance.is_shadow(r) for r in range(n_rows)]
    sample_rows = [r for r in range(n_rows) if not is_shadow[r]]

    active = list(order)                                     # prompt rows in the batch, batch order
    index = torch.tensor(active, dtype=torch.int64, device=device)
    params = params_all.select(index)
    for listener in listeners:
        listener.set_batch(index)

    # ---- prefill: left-padded batch; positions count only real tokens ----
    lengths = [len(encoded[r]) for r in active]
    width = max(lengths)
    input_ids = torch.full((len(active), width), lm.pad_token_id, dtype=torch.int64)
    mask = torch.zeros((len(active), width), dtype=torch.int64)
    for i, r in enumerate(active):
        input_ids[i, width - lengths[i]:] = torch.tensor(encoded[r])
        mask[i, width - lengths[i]:] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    kwargs = {"logits_to_keep": 1} if _supports_logits_to_keep(lm.model) else {}
    out = lm.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                   use_cache=True, **kwargs)
    cache = _cache_of(out)
    cache_kw = _cache_keyword(lm.model)
    logits = out.logits[:, -1, :]                            # [B, V]
    next_pos = positions[:, -1:] + 1                         # [B, 1]
    stats = RunStats(prompt_tokens=sum(lengths))
    stats.prefill_time_s = time.perf_counter() - start

    generated: dict[int, list[int]] = {r: [] for r in range(n_rows)}
    finished: dict[int, GenerationResult] = {}
    mix = mixing_matrix(guidance, active, device)
    leaders = _leader_positions(guidance, active, device)
    seed_of = params_all.seeds.tolist()
    guard = None                 # (tables, histories) in batch order, selected like the cache
    if copy_guard is not None:
        tables = build_tables(lm, copy_guard, sample_rows)
        state = GuardState(n_rows, copy_guard.n, max([len(t) for t in tables.values()] + [1]), device)
        state.admit(list(range(n_rows)), [tables.get(r, []) for r in range(n_rows)], encoded)
        guard = (state.table[index], state.hist[index])
    own = None if own is None or guidance is None else own.to(device)

    for step in range(max_new_tokens):
        if guard is not None:
            logits = ban_copies(logits, *guard)
        tokens = sampler(logits, params, step, mix, own=own)  # [B]
        if leaders is not None:
            tokens = tokens[leaders]                         # shadows take their leader's token
        if guard is not None:
            push_history(guard[1], tokens, torch.ones_like(tokens, dtype=torch.bool))
        token_list = tokens.tolist()

        done_now = []
        for i, r in enumerate(active):
            generated[r].append(token_list[i])
            if is_shadow[r]:
                continue
            reason = stopper.check(generated[r])
            if reason is not None:
                ids, text = stopper.final_text(generated[r], reason)
                finished[r] = GenerationResult(row=r, token_ids=ids, text=text, finish_reason=reason, seed=seed_of[r])
                stats.generated_tokens += len(generated[r])
                done_now.append(r)
        if progress is not None:
            progress(len(finished), len(sample_rows))
        if len(finished) == len(sample_rows):
            break

        keep = list(range(len(active)))
        if done_now:
            gone = set(done_now)
            keep = [i for i, r in enumerate(active)
                    if r not in gone and not (is_shadow[r] and guidance.leader(r) in gone)]
            keep_t = torch.tensor(keep, dtype=torch.int64, device=device)
            active = [active[i] for i in keep]
            cache.batch_select_indices(keep_t)
            mask, next_pos, tokens = mask[keep_t], next_pos[keep_t], tokens[keep_t]
            if guard is not None:
                guard = (guard[0][keep_t], guard[1][keep_t])
            index = torch.tensor(active, dtype=torch.int64, device=device)
            params = params_all.select(index)
            mix = mixing_matrix(guidance, active, device)
            leaders = _leader_positions(guidance, active, device)
            for listener in listeners:
                listener.set_batch(index)

        mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
        out = lm.model(input_ids=tokens[:, None], attention_mask=mask, position_ids=next_pos,
                       use_cache=True, **{cache_kw: cache})
        cache = _cache_of(out)
        logits = out.logits[:, -1, :]
        next_pos = next_pos + 1
        stats.steps += 1
        stats.rows_forwarded += len(active)
        stats.rows_forwarded_per_step.append(len(active))
        stats.slots_forwarded += len(active)

    stats.wall_time_s = time.perf_counter() - start
    return [finished[r] for r in sample_rows], stats
