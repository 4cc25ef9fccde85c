"""The decode engine: slot-based static KV cache, continuous batching of guidance groups, and one
decode step with no host sync and fixed shapes (DESIGN.md, "Engine shape").

    generate(lm, prompts, ...) -> (results, stats)          # the embedding API

Per ``generate`` call (Llama-family models; others take the HF slow path, ``models.hf_loop``):

1. Rows are grouped into guidance groups (a CorrSynth group, a CFG leader with its shadows, one
   FewGen row). The scheduler (``divgen.engine.scheduler``) admits whole groups, first come first
   served, as soon as enough of the engine's S slots are free.
2. Admission prefills the groups' prompts (all but the last token; their common prefix once,
   the rest in right-padded batches of similar length) into their slots of the KV cache
   ``[layers, S, kv_heads, max_len, head_dim]``; the last prompt token becomes the slot's input.
3. When the batch changes, the host rebuilds the sampling plan (the weight blocks of the groups'
   active rows, ``build_group_plan``), the CFG leader index and the multi-LoRA slots: once per change.
   A compiled step gets one static plan per run (fixed shapes and addresses, refilled in place,
   so the compiled step's guards and a captured graph's buffers stay the same; ``kernels/plan.py``).
4. ``decode_step`` runs forward + guided sampling + EOS/length checks for all slots on the device.
   Each slot carries its own position, step counter (the noise counter: noise = f(seed, step,
   token)), limits and an ``active`` flag; inactive slots compute and are ignored. It is
   ``torch.compile``-d (``fullgraph=True``; CUDA graphs via ``mode="reduce-overhead"`` on CUDA).
5. The tokens and done flags of step t are copied to the host and read — on CUDA asynchronously,
   after step t+1 is launched (``lag``); on CPU, where the step has finished when it returns, at
   once: rows are retired, stop strings checked (and cut exactly), freed slots refilled. On CPU a
   member leaving its group changes the group's γ from the next step (DESIGN.md); with the CUDA
   lag, from the second step after its last token. Either way the schedule is a function of the
   rows alone, so a row's text does not depend on which other groups share the batch or on the
   slot it lands in.
"""
from __future__ import annotations

import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol, Sequence

import torch
from torch import nn

from divgen.engine.copy_guard import CopyGuard, GuardState, build_tables
from divgen.engine.copy_guard import ban_copies, push as push_history
from divgen.engine.errors import DivgenError
from divgen.engine.guidance import Guidance
from divgen.engine.kv_cache import KVCache
from divgen.engine.model import LoadedModel
from divgen.engine.own_special import special_token_mask
from divgen.engine.prefix_cache import PrefixCache, budget_bytes as prefix_cache_budget, weights_fingerprint
from divgen.engine.sampling import SamplingParams, guided_sample_step
from divgen.kernels import greedy_tokens
from divgen.kernels.plan import build_group_plan, stage
from divgen.engine.scheduler import Scheduler
from divgen.kernels.plan import MAX_GROUP_ROWS, next_power_of_2


@dataclass
class GenerationResult:
    """One generated sample."""

    row: int                    # index into the prompts given to generate()
    token_ids: list[int]        # generated ids, without the EOS token
    text: str                   # decoded generated text (stop string and what follows removed)
    finish_reason: str          # "eos" | "stop" | "length"
    seed: int


@dataclass
class RunStats:
    """Counts of one generate() call."""

    prompt_tokens: int = 0                  # real (unpadded) prompt tokens prefilled
    generated_tokens: int = 0               # tokens sampled for returned rows (EOS included)
    rows_forwarded: int = 0                 # rows doing useful work, summed over decode steps
    slots_forwarded: int = 0                # slots computed (useful or idle), summed over steps
    steps: int = 0                          # decode steps run
    wall_time_s: float = 0.0
    prefill_time_s: float = 0.0
    rows_forwarded_per_step: list[int] = field(default_factory=list)
    # per step: did groups wait for free slots (False: the call's drain, nothing left to admit)
    waiting_per_step: list[bool] = field(default_factory=list)
    slots: int = 0                          # slots of the engine (the fixed batch shape)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_time_s if self.wall_time_s > 0 else 0.0

    @property
    def occupancy(self) -> float:
        """Mean fraction of computed slots that did useful work."""
        return self.rows_forwarded / self.slots_forwarded if self.slots_forwarded else 0.0


class BatchListener(Protocol):
    """Anything with ``set_batch`` that keeps per-row state for the model's forward (e.g. multi-LoRA
    slots); a structural type, nothing to inherit."""

    def set_batch(self, rows: torch.Tensor) -> None: ...  # rows: [B] int64 prompt indices, -1 = empty slot


def _encode_prompts(lm: LoadedModel, prompts: Sequence) -> list[list[int]]:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise DivgenError("prompts must be a list of strings (or of token-id lists)")
    if len(prompts) == 0:
        raise DivgenError("no prompts given: pass at least one prompt")
    encoded = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if not p.strip():
                raise DivgenError(f"prompt {i} is empty: give some text to continue")
            ids = lm.encode(p)
        else:
            ids = [int(t) for t in p]
        if not ids:
            raise DivgenError(f"prompt {i} encodes to no tokens: give some text to continue")
        encoded.append(ids)
    return encoded


def _check_lengths(lm: LoadedModel, encoded: list[list[int]], max_new_tokens: int) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise DivgenError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    longest = max(len(ids) for ids in encoded)
    if longest >= lm.context_length:
        raise DivgenError(
            f"a prompt has {longest} tokens but the model's context is {lm.context_length}: shorten the prompt"
        )
    if longest + max_new_tokens > lm.context_length:
        raise DivgenError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context "
            f"({lm.context_length}): lower max_new_tokens to at most {lm.context_length - longest} or shorten the prompt"
        )


class _StopChecker:
    """Per-row stop conditions on the host: EOS ids, stop strings, length."""

    def __init__(self, lm: LoadedModel, stop: Iterable[str], ignore_eos: bool, max_new_tokens: int):
        self.lm = lm
        self.stop = [s for s in stop if s]
        self.eos = frozenset() if ignore_eos else lm.eos_token_ids
        self.max_new_tokens = max_new_tokens
        # ``check`` runs after every token, so a stop string that appears ends in the newest
        # token's text: it lies within the text of the last 4·L tokens (L its characters; a token
        # is at least one byte, a character at most four), and 8 more tokens cover a cut that
        # decodes differently at its left edge (a partial character, a leading space).
        self.window = 4 * max(len(s) for s in self.stop) + 8 if self.stop else 0

    def check(self, ids: list[int]) -> str | None:
        if ids and ids[-1] in self.eos:
            return "eos"
        if self.stop:
            text = self.lm.decode(ids[-self.window:])      # the new text only (see __init__)
            if any(s in text for s in self.stop):
                return "stop"
        if len(ids) >= self.max_new_tokens:
            return "length"
        return None

    def final_text(self, ids: list[int], reason: str) -> tuple[list[int], str]:
        if reason == "eos":
            ids = ids[:-1]
        text = self.lm.decode(ids)
        if reason == "stop":
            cut = min(text.find(s) for s in self.stop if s in text)
            text = text[:cut]
        return ids, text


# ----------------------------------------------------------------------------------------------
# Device state and the step
# ----------------------------------------------------------------------------------------------
class DecodeState(nn.Module):
    """Per-slot decode state on the device, [S] each (buffers: static addresses for CUDA graphs)."""

    FIELDS = {  # name: (dtype, initial value)
        "tokens": (torch.int64, 0),         # next input token of the slot
        "pos": (torch.int64, 0),            # its position = the slot's KV length
        "gen": (torch.int64, 0),            # tokens generated so far = the noise step counter
        "max_new": (torch.int64, 1),        # the row's max_new_tokens
        "active": (torch.bool, False),      # the slot holds a row that has not finished
        "check_eos": (torch.bool, True),    # False: ignore_eos
        "leader": (torch.int64, 0),         # slot whose token this slot takes (CFG shadows), else itself
        "seeds": (torch.int64, 0),
        "temperature": (torch.float32, 0.0),
        "alpha": (torch.float32, 0.0),      # the papers' α (own, untempered distribution)
        "min_p": (torch.float32, 0.0),      # the peers' min-p (tempered, guided distribution)
        "top_k": (torch.int64, 0),
        "top_p": (torch.float32, 1.0),
    }

    def __init__(self, slots: int, device):
        super().__init__()
        for name, (dtype, value) in self.FIELDS.items():
            self.register_buffer(name, torch.full((slots,), value, dtype=dtype, device=device), persistent=False)
        self.leader.copy_(torch.arange(slots, device=device))


def decode_step(model, k_cache, v_cache, st, plan, eos_ids, any_top_k_top_p: bool, greedy_only: bool,
                any_min_p: bool = False, marks: list | None = None, guard=None):
    """One decode step for every slot, on the device, no host sync, fixed shapes.

    Forward the slots' input tokens, sample (guided), let CFG shadows take their leader's token,
    check EOS and length, and advance the active slots in place. Returns [2, S] int64: the
    sampled tokens and the slots that finished in this step. ``marks`` (eager CPU steps, for
    ``Engine.run``'s step_times): the time the forward ended is appended. ``guard``: the copy
    guard's state (``copy_guard.GuardView``) or None: its banned tokens get −inf before sampling."""
    logits = model.decode(st.tokens, st.pos, k_cache, v_cache)                      # [S, V] fp32
    if marks is not None:
        marks.append(time.perf_counter())
    if guard is not None:
        logits = ban_copies(logits, guard.table, guard.hist)
    if greedy_only:
        new = greedy_tokens(logits)
    else:
        new = guided_sample_step(logits, plan, st.seeds, st.gen, st.temperature, st.alpha, st.top_k,
                                 st.top_p, min_p=st.min_p if any_min_p else None,
                                 any_top_k_top_p=any_top_k_top_p)                    # [S]
    new = new[st.leader]
    active = st.active.clone()
    is_eos = (new[:, None] == eos_ids[None, :]).any(dim=-1) & st.check_eos
    done = active & (is_eos | (st.gen + 1 >= st.max_new))
    done = done[st.leader]
    if guard is not None:
        push_history(guard.hist, new, active)
    step = active.to(torch.int64)
    st.tokens.copy_(torch.where(active, new, st.tokens))
    st.pos.add_(step)
    st.gen.add_(step)
    st.active.copy_(active & ~done)
    return torch.stack((new, done.to(torch.int64)))


class _View:
    """The first ``n`` slots of a DecodeState (views: in-place updates land in the state)."""

    def __init__(self, st: DecodeState, n: int):
        for name in DecodeState.FIELDS:
            setattr(self, name, getattr(st, name)[:n])



@dataclass
class StepTime:
    """One eager decode step: its start, the end of its forward, its end (perf_counter seconds),
    the slots it computed, and the time spent prefilling admitted rows after it (not host time)."""

    start: float
    forward_end: float
    end: float
    slots: int
    prefill_after: float = 0.0


def default_compile(device: torch.device) -> bool:
    """Compile the step where it pays: on CUDA (CUDA graphs remove the per-op launch cost). On
    CPU, inductor's compile time (tens of seconds for the embedded model) exceeds what it saves
    in a typical call (measured in benchmarks/decode_throughput.py), so CPU runs eager unless
    asked (``compile=True`` / ``--compile``)."""
    return device.type == "cuda"


# ----------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------
class Engine:
    """A model, its static KV cache of ``slots`` rows x ``max_len`` positions, and the compiled
    step. One engine serves one ``run`` at a time; ``generate`` keeps compiled engines on the
    LoadedModel so later calls of the same shape reuse the compiled step."""

    def __init__(self, lm: LoadedModel, slots: int, max_len: int, *, compile: bool | None = None,
                 trim: bool | None = None, lag: bool | None = None):
        if lm.fast is None:
            raise DivgenError(f"model {lm.name} has no divgen forward (not Llama-family): use generate(), which "
                              "runs it on the HF forward")
        if slots < 1 or max_len < 2:
            raise DivgenError(f"an engine needs slots >= 1 and max_len >= 2, got {slots}, {max_len}")
        self.lm, self.model = lm, lm.fast
        a = self.model.args
        self.slots, self.max_len, self.device = slots, max_len, lm.device
        self.cache = KVCache(a.n_layers, slots, a.n_kv_heads, max_len, a.head_dim, lm.dtype, lm.device)
        self.state = DecodeState(slots, lm.device)
        self._prompts: PrefixCache | None = None      # the run's prompt cache (``run`` sets it)
        self.model.setup_rope(max_len)
        self.compiled = default_compile(lm.device) if compile is None else bool(compile)
        # Eager steps may run on the live prefix of the slots only (cheaper on CPU, where a step
        # costs what its rows cost); a compiled step keeps its one fixed shape.
        self.trim = (not self.compiled) if trim is None else bool(trim)
        # Read step t's tokens after launching step t+1 (lag) on CUDA, so the host never stalls
        # the device; on CPU the step has finished when it returns, so it is read at once.
        self.lag = (lm.device.type == "cuda") if lag is None else bool(lag)
        if self.compiled:
            mode = "reduce-overhead" if lm.device.type == "cuda" else None
            if mode is not None:   # CUDA graphs: the cache and state keep their addresses between replays
                for t in [self.cache.k, self.cache.v, *self.state.buffers()]:
                    torch._dynamo.mark_static_address(t)
            self._step = torch.compile(decode_step, fullgraph=True, dynamic=False, mode=mode)
        else:
            self._step = decode_step

    # ---- one run over a set of rows ----
    @torch.inference_mode()
    def run(self, encoded: list[list[int]], params: SamplingParams, *, max_new_tokens: int,
            stopper: _StopChecker, guidance: Guidance | None = None, listeners: Sequence[BatchListener] = (),
            progress: Callable[[int, int], None] | None = None,
            on_result: Callable[[GenerationResult], None] | None = None, lag: bool | None = None,
            step_times: list | None = None, copy_guard: CopyGuard | None = None,
            own: torch.Tensor | None = None) -> tuple[list[GenerationResult], RunStats]:
        """Decode ``encoded`` (token ids per row) to the end: see ``_Run``. lag: read each step's
        tokens one step late (default: this engine's). step_times: a list that gets one
        ``StepTime`` per eager CPU step (``divgen bench decode``'s split); None: nothing is timed.
        copy_guard, own: ``generate``'s copy guard and own-special mask ([V] bool), or None."""
        if listeners and self.compiled:
            raise DivgenError("multi-LoRA listeners need an eager step: pass compile=False")
        self._prompts = None if listeners else self._prompt_cache()
        run = _Run(self, encoded, params, max_new_tokens, stopper, guidance, listeners, progress, on_result,
                   self.lag if lag is None else bool(lag), step_times, copy_guard, own)
        return run.loop()

    def _to_host(self, out: torch.Tensor):
        """Start copying a step's [2, n] output to the host; ``_read`` waits for it. On CUDA the copy
        goes to one of two pinned buffers (step t's is read after step t+1 is launched)."""
        if out.device.type == "cpu":
            return out.clone() if self.compiled else out
        if not hasattr(self, "_pinned"):
            self._pinned = [torch.empty((2, self.slots), dtype=torch.int64, pin_memory=True) for _ in range(2)]
            self._flip = 0
        self._flip ^= 1
        host = self._pinned[self._flip][:, : out.shape[1]]
        host.copy_(out, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event

    @staticmethod
    def _read(rec) -> torch.Tensor:
        if isinstance(rec, tuple):
            host, event = rec
            event.synchronize()
            return host
        return rec

    def _prompt_cache(self) -> PrefixCache | None:
        """The model's prompt cache (made on first use), emptied if the weights changed since; None
        when ``DIVGEN_PREFIX_CACHE_MB`` is 0."""
        budget = prefix_cache_budget()
        if budget <= 0:
            return None
        cache = self.lm.prefix_cache
        if not isinstance(cache, PrefixCache):
            cache = self.lm.prefix_cache = PrefixCache(budget)
        cache.budget = budget
        cache.validate(weights_fingerprint(self.model))
        return cache

    def _prefill(self, prompts: list[list[int]], slots: list[int], rows: list[int], listeners) -> None:
        """Write all but the last token of each prompt into its slot.

        Four savings, all exact in the math (the same positions attend to the same keys): the
        positions a cached prompt shares with this one are copied from the prompt cache
        (``prefix_cache``: earlier admissions and calls); the prompts' longest common prefix (a
        chat template's system turn, a task's header) is computed once, in the first slot, and
        copied to the others; a prompt that several rows share (n samples of one prompt) is
        computed once and its K/V copied to the other rows' slots (none of these under multi-LoRA
        listeners: an adapter changes the K/V); the rest goes in right-padded batches of similar
        length and equal start (``prefill_batches``), so padding costs little."""
        body = [p[:-1] for p in prompts]
        cache = None if listeners else self._prompts
        start = 0 if listeners or len(body) < 2 else common_prefix_len(body)
        if start < PREFIX_MIN:
            start = 0
        k, v, dev = self.cache.k, self.cache.v, self.device
        if start:                       # host values of a batch change: one packed copy (``stage``)
            first = slots[0]
            done = self._from_cache(cache, body[0][:start], first, 0)
            prefix, first_t, rest = stage([body[0][done:start], [first], slots[1:]], torch.int64, dev)
            if done < start:
                self.model.prefill(prefix.view(1, start - done), first_t, k, v, done)
                if cache is not None:
                    cache.store(body[0][:start], k[:, first, :, :start], v[:, first, :, :start])
            k[:, rest, :, :start] = k[:, first:first + 1, :, :start]
            v[:, rest, :, :start] = v[:, first:first + 1, :, :start]
        todo, copies = distinct_prompts(body, start, dedup=not listeners)
        begin = {i: self._from_cache(cache, body[i], slots[i], start) for i in todo}
        pad = self.lm.pad_token_id
        for b0 in sorted(set(begin.values())):          # rows that start at the same position
            group = [i for i in todo if begin[i] == b0 and len(body[i]) > b0]
            for batch in prefill_batches([len(body[i]) - b0 for i in group]):
                batch = [group[j] for j in batch]
                width = max(len(body[i]) for i in batch) - b0
                tokens, batch_slots, batch_rows = stage(
                    [[t for i in batch for t in body[i][b0:] + [pad] * (width - len(body[i]) + b0)],
                     [slots[i] for i in batch], [rows[i] for i in batch]], torch.int64, dev)
                for listener in listeners:
                    listener.set_batch(batch_rows)
                self.model.prefill(tokens.view(len(batch), width), batch_slots, k, v, b0)
        if cache is not None:
            for i in todo:
                if begin[i] < len(body[i]):
                    n, s = len(body[i]), slots[i]
                    cache.store(body[i], k[:, s, :, :n], v[:, s, :, :n])
        for src, dups in copies.items():
            end, s = len(body[src]), slots[src]
            (dst,) = stage([[slots[i] for i in dups]], torch.int64, dev)
            k[:, dst, :, start:end] = k[:, s:s + 1, :, start:end]
            v[:, dst, :, start:end] = v[:, s:s + 1, :, start:end]

    def _from_cache(self, cache: PrefixCache | None, tokens: list[int], slot: int, begin: int) -> int:
        """Copy the cached positions [begin, m) of ``tokens`` into ``slot``; returns max(begin, m)."""
        if cache is None or len(tokens) <= begin:
            return begin
        key, m = cache.match(tokens)
        if m <= begin:
            return begin
        cache.load(key, m, self.cache.k, self.cache.v, slot, begin)
        return m


def distinct_prompts(body: list[list[int]], start: int, dedup: bool = True) -> tuple[list[int], dict[int, list[int]]]:
    """(the rows whose tokens after ``start`` must be computed, {such a row: the later rows with
    the same tokens, which take a copy of its K/V}). Rows with nothing after ``start`` need
    neither. ``dedup`` False: every row is computed."""
    first: dict[tuple, int] = {}
    todo: list[int] = []
    copies: dict[int, list[int]] = {}
    for i, b in enumerate(body):
        if len(b) <= start:
            continue
        j = first.setdefault(tuple(b[start:]), i) if dedup else i
        if j == i:
            todo.append(i)
        else:
            copies.setdefault(j, []).append(i)
    return todo, copies


PREFIX_MIN = 8          # a shorter common prefix is not worth its own pass
PAD_SHARE = 0.125       # a prefill batch pads at most this share of its real tokens


def common_prefix_len(seqs: list[list[int]]) -> int:
    """Length of the longest prefix that every sequence starts with."""
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return n


def prefill_batches(lengths: list[int]) -> list[list[int]]:
    """Indices of the non-empty lengths in batches of similar length: sorted, a new batch begins
    when right-padding to the next length would pad more than PAD_SHARE of the batch's tokens."""
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    total = 0
    for i in order:
        n = lengths[i]
        if batches and (len(batches[-1]) + 1) * n <= (1 + PAD_SHARE) * (total + n):
            batches[-1].append(i)
            total += n
        else:
            batches.append([i])
            total = n
    return batches


def _engine_for(lm: LoadedModel, slots: int, max_len: int, compile: bool | None) -> Engine:
    compiled = default_compile(lm.device) if compile is None else bool(compile)
    if not compiled:
        return Engine(lm, slots, max_len, compile=False)
    key = (slots, max_len)
    if key not in lm.engines:
        lm.engines[key] = Engine(lm, slots, max_len, compile=True)
    return lm.engines[key]


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m



class _Run:
    """One ``Engine.run``: the host side of a set of rows while they decode, in four moves.

    * ``admit``: every waiting group that fits goes into free slots (lowest first), prefilled in
      one batch, its per-row sampling values written into the device state;
    * ``rebuild``: after a batch change, the step inputs that depend on the batch: the live
      prefix of slots, the sampling plan (the groups' weight blocks), the CFG leader of each slot,
      the listeners' slot rows;
    * ``read``: a step's tokens appended to their rows, stop conditions checked;
    * ``retire``: a finished row leaves (with its CFG shadows), its slots are freed.

    ``loop`` launches a step, reads the previous one (``lag``: one step late, so the host never
    stalls a CUDA device; at once on CPU) and admits and rebuilds when a row left.
    """

    def __init__(self, engine: Engine, encoded, params: SamplingParams, max_new_tokens: int, stopper: _StopChecker,
                 guidance: Guidance | None, listeners, progress, on_result, lag: bool, step_times: list | None,
                 copy_guard: CopyGuard | None = None, own: torch.Tensor | None = None):
        self.engine, self.encoded, self.params = engine, encoded, params
        self.max_new_tokens, self.stopper, self.guidance = max_new_tokens, stopper, guidance
        self.listeners, self.progress, self.on_result, self.lag = listeners, progress, on_result, lag
        dev, S = engine.device, engine.slots
        self.sched = sched = Scheduler(len(encoded), guidance, S)
        for g in sched.groups:
            engine.cache.check_fits(max(len(encoded[r]) for r in g.rows), max_new_tokens, len(g.rows))
        eos = sorted(engine.lm.eos_token_ids) or [-1]
        self.eos_ids = torch.tensor(eos, dtype=torch.int64, device=dev)
        self.greedy_only = params.all_greedy and params.no_cutoffs and (guidance is None)
        self.any_cut = bool((params.top_k > 0).any() or (params.top_p < 1).any())
        self.any_min_p = bool((params.min_p > 0).any())
        self.seeds = params.seeds.tolist()
        self.is_shadow = [guidance is not None and guidance.is_shadow(r) for r in range(len(encoded))]
        self.sample_rows = [r for r in range(len(encoded)) if not self.is_shadow[r]]
        self.stats = RunStats(slots=S)
        self.generated: dict[int, list[int]] = {}
        self.finished: dict[int, GenerationResult] = {}
        self.n_live = S
        self.plan = None
        # the largest group of the run (a group over the kernels' maximum gets the plan's own error)
        self.block = min(next_power_of_2(max(len(u.rows) for u in sched.groups)), MAX_GROUP_ROWS)
        self.waiting: list[bool] = []           # per step: were groups left waiting for slots
        self.step_times = step_times if (step_times is not None and not engine.compiled
                                         and dev.type == "cpu") else None
        engine.state.active.zero_()
        # the copy guard's tables (sample rows only, not CFG shadows) and the own-special mask
        self.guard, self.tables = None, {}
        if copy_guard is not None:
            self.tables = build_tables(engine.lm, copy_guard, self.sample_rows)
            width = max([len(t) for t in self.tables.values()] + [1])
            self.guard = GuardState(S, copy_guard.n, width, dev)
        self.own = None if (own is None or guidance is None) else own.to(dev)

    def admit(self) -> bool:
        """Admit every waiting group that fits, in order; prefill them in one batch."""
        sched, st, dev, encoded, params = self.sched, self.engine.state, self.engine.device, self.encoded, self.params
        rows, slots = [], []
        while (group := sched.next_admissible()) is not None:
            slots += sched.admit(group, first_step=self.stats.steps)
            rows += group.rows
        if not rows:
            return False
        self.engine._prefill([encoded[r] for r in rows], slots, rows, self.listeners)
        if self.guard is not None:
            self.guard.admit(slots, [self.tables.get(r, []) for r in rows], [encoded[r] for r in rows])
        idx, index, last, pos = stage([slots, rows, [encoded[r][-1] for r in rows],
                                       [len(encoded[r]) - 1 for r in rows]], torch.int64, dev)   # one copy
        st.tokens[idx] = last
        st.pos[idx] = pos
        st.gen[idx] = 0
        st.max_new[idx] = self.max_new_tokens
        st.active[idx] = True
        st.check_eos[idx] = bool(self.stopper.eos)
        st.seeds[idx] = params.seeds[index]
        st.temperature[idx] = params.temperature[index]
        st.alpha[idx] = params.alpha[index]
        st.min_p[idx] = params.min_p[index]
        st.top_k[idx] = params.top_k[index]
        st.top_p[idx] = params.top_p[index]
        for r in rows:
            self.generated[r] = []
        self.stats.prompt_tokens += sum(len(encoded[r]) for r in rows)
        return True

    def rebuild(self) -> None:
        """The step inputs that depend on the batch (class docstring)."""
        engine, sched, st, dev = self.engine, self.sched, self.engine.state, self.engine.device
        n = max((sched.highest_used_slot() + 1) if engine.trim else engine.slots, 1)
        self.n_live = n
        guided = sched.guidance is not None
        blocks = sched.guidance.weight_blocks(sched.slot_row[:n]) if guided else []
        masks = self.guard is not None      # the engine's logits are finite, the copy guard's bans −inf
        if self.greedy_only:
            self.plan = None
        elif engine.compiled:   # one static plan, refilled in place (fixed shapes and addresses)
            new = build_group_plan(blocks, n, dev, guided=guided, static_block=self.block, masks=masks, own=self.own)
            self.plan = new if self.plan is None else self.plan.copy_from(new)
        else:
            self.plan = build_group_plan(blocks, n, dev, guided=guided, masks=masks, own=self.own)
        leader, rows = stage([sched.leader_slots(n), sched.slot_rows(n)], torch.int64, dev)
        st.leader[:n] = leader
        for listener in self.listeners:
            listener.set_batch(rows)

    def retire(self, row: int, reason: str) -> None:
        """Row ``row`` finished for ``reason``: its result, its slots (and its shadows') freed."""
        ids, text = self.stopper.final_text(self.generated[row], reason)
        res = GenerationResult(row=row, token_ids=ids, text=text, finish_reason=reason, seed=self.seeds[row])
        self.finished[row] = res
        self.stats.generated_tokens += len(self.generated[row])
        freed = self.sched.retire(row)
        if reason == "stop":               # still active on the device: stop it there
            self.engine.state.active[torch.tensor(freed, dtype=torch.int64, device=self.engine.device)] = False
        if self.on_result is not None:
            self.on_result(res)

    def read(self, rec) -> bool:
        """Append a step's tokens to their rows; True when a row finished (the batch changed)."""
        step_index, host = rec
        host = self.engine._read(host)
        tokens, done = host[0].tolist(), host[1].tolist()
        live = list(self.sched.live_slots(step_index, len(tokens)))   # rows that worked in this step
        stopper, changed = self.stopper, False
        for slot, row in live:
            if self.is_shadow[row] or row in self.finished:   # shadows (maybe retired with their leader)
                continue
            self.generated[row].append(tokens[slot])
            if done[slot]:
                reason = "eos" if tokens[slot] in stopper.eos else "length"
            else:
                reason = stopper.check(self.generated[row]) if stopper.stop else None
            if reason is not None:
                self.retire(row, reason)
                changed = True
        self.stats.rows_forwarded += len(live)
        self.stats.rows_forwarded_per_step.append(len(live))
        self.stats.waiting_per_step.append(self.waiting[step_index])
        if self.progress is not None:
            self.progress(len(self.finished), len(self.sample_rows))
        return changed

    def launch(self):
        """Launch one step over the live prefix of slots; returns its (index, host copy) record."""
        engine, n, st = self.engine, self.n_live, self.engine.state
        k, v = (engine.cache.k, engine.cache.v) if n == engine.slots else (engine.cache.k[:, :n], engine.cache.v[:, :n])
        view = st if n == engine.slots else _View(st, n)
        args = (engine.model, k, v, view, self.plan, self.eos_ids, self.any_cut, self.greedy_only, self.any_min_p)
        guard = None if self.guard is None else self.guard.view(n)
        if self.step_times is not None:
            t_step, marks = time.perf_counter(), []
            out = engine._step(*args, marks, guard)
            self.step_times.append(StepTime(t_step, marks[0], time.perf_counter(), n))
        else:
            out = engine._step(*args, None, guard)
        rec = (self.stats.steps, engine._to_host(out))
        self.waiting.append(bool(self.sched.pending))
        self.stats.steps += 1
        self.stats.slots_forwarded += n
        return rec

    def refill(self) -> None:
        t0 = time.perf_counter()
        self.admit()
        self.rebuild()
        spent = time.perf_counter() - t0
        self.stats.prefill_time_s += spent
        if self.step_times:
            self.step_times[-1].prefill_after += spent

    def loop(self) -> tuple[list[GenerationResult], RunStats]:
        start = time.perf_counter()
        t0 = time.perf_counter()
        self.admit()
        self.rebuild()
        self.stats.prefill_time_s += time.perf_counter() - t0
        prev = None
        while len(self.finished) < len(self.sample_rows):
            rec = self.launch()
            if not self.lag:                   # read this step now (free on CPU: no device to wait for)
                prev, rec = rec, None
            if prev is not None and self.read(prev):
                self.refill()
            prev = rec
            if len(self.finished) < len(self.sample_rows) and not self.sched.any_live():
                raise RuntimeError("decode engine: rows left but none in a slot (scheduler bug)")
        self.stats.wall_time_s = time.perf_counter() - start
        return [self.finished[r] for r in self.sample_rows], self.stats


def generate(
    lm: LoadedModel,
    prompts: Sequence,
    *,
    max_new_tokens: int = 64,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    alpha=0.0,
    min_p=0.0,
    seeds=0,
    stop: Iterable[str] = (),
    ignore_eos: bool = False,
    guidance: Guidance | None = None,
    batch_listeners: Iterable[BatchListener] = (),
    progress: Callable[[int, int], None] | None = None,
    max_batch_rows: int | None = None,
    on_result: Callable[[GenerationResult], None] | None = None,
    compile: bool | None = None,
    lag: bool | None = None,
    step_times: list | None = None,
    copy_guard: CopyGuard | None = None,
    own_special: bool = False,
) -> tuple[list[GenerationResult], RunStats]:
    """Generate a continuation for every prompt. See the module docstring.

    Args:
        prompts: formatted text (see ``LoadedModel.format_prompt``) or token-id lists.
        temperature, top_k, top_p, alpha, min_p: a scalar or one value per row; temperature 0 =
            greedy; alpha is the papers' plausibility cutoff α on the row's own, untempered
            distribution; min_p is transformers' / vLLM's min-p, on the tempered (guided) one.
        seeds: int (row i gets seeds + i) or one per row.
        guidance: rows contrasted in groups (``Guidance``); None = independent rows (FewGen).
        batch_listeners: told which prompt row sits in each slot whenever that changes
            (multi-LoRA adapter slots); they need an eager step.
        progress: called after every step with (finished sample rows, total sample rows).
        max_batch_rows: KV slots (rows decoded at once); default all rows. Groups wait for
            free slots and enter as soon as a finished row frees enough (continuous batching).
        on_result: called with each sample's result as soon as it finishes.
        lag, step_times: ``Engine.run``'s (benchmarks: the CUDA read schedule on a CPU, the
            forward / sampler / host split of eager CPU steps).
        compile: torch.compile the step (default: on CUDA only; see ``default_compile``).
        copy_guard: ``CopyGuard(n, sources)``: row r never emits an n-token n-gram of its
            sources[r] (``divgen.engine.copy_guard``); None: no guard.
        own_special: EOS and the other special tokens take each row's own log-prob, not the
            contrasted score (``divgen.engine.own_special``); no effect without guidance.
    Returns: results for every non-shadow row in prompt order, and the run's stats.
    """
    encoded = _encode_prompts(lm, prompts)
    _check_lengths(lm, encoded, max_new_tokens)
    n_rows = len(encoded)
    if guidance is not None and guidance.rows != n_rows:
        raise DivgenError(f"guidance describes {guidance.rows} rows but {n_rows} prompts were given")
    if max_batch_rows is not None and (isinstance(max_batch_rows, bool) or not isinstance(max_batch_rows, int)
                                       or max_batch_rows < 1):
        raise DivgenError(f"max_batch_rows must be an integer >= 1, got {max_batch_rows!r}")
    params = SamplingParams.make(n_rows, temperature=temperature, top_k=top_k, top_p=top_p,
                                 alpha=alpha, min_p=min_p, seeds=seeds, device=lm.device)
    stopper = _StopChecker(lm, stop, ignore_eos, max_new_tokens)
    listeners = list(batch_listeners)
    if copy_guard is not None:
        copy_guard.check(n_rows)
    own = special_token_mask(lm) if own_special else None
    if lm.fast is None:
        from divgen.engine.models.hf_loop import generate_hf_batched

        return generate_hf_batched(lm, encoded, params, max_new_tokens=max_new_tokens, stopper=stopper,
                                   guidance=guidance, listeners=listeners, progress=progress,
                                   max_batch_rows=max_batch_rows, on_result=on_result, copy_guard=copy_guard,
                                   own=own)
    slots = min(n_rows, max_batch_rows or n_rows)
    longest = max(len(ids) for ids in encoded)
    max_len = min(_round_up(longest + max_new_tokens, 64), lm.context_length)
    if compile is None:
        compile = False if listeners else lm.compile
    engine = _engine_for(lm, slots, max_len, compile)
    return engine.run(encoded, params, max_new_tokens=max_new_tokens, stopper=stopper, guidance=guidance,
                      listeners=listeners, progress=progress, on_result=on_result, lag=lag, step_times=step_times,
                      copy_guard=copy_guard, own=own)

