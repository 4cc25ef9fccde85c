"""The decode engine: slot-based static KV cache, continuous batching of guidance groups, and one
decode step with no host sync and fixed shapes (DESIGN.md, "Engine shape").

    generate(lm, prompts, ...) -> (results, stats)          # the embedding API

Per ``generate`` call (Llama-family models; others take the HF slow path, ``models.hf_loop``):

1. Rows are grouped into guidance groups (a CorrSynth group, a CFG leader with its shadows, one
   FewGen row). The scheduler (``divgen.engine.scheduler``) admits whole groups, first come first
   served, as soon as enough of the engine's S slots are free.
2. Admission prefills the groups' prompts (all but the last token; one right-padded batch per
   admission round) into their slots of the KV cache ``[layers, S, kv_heads, max_len, head_dim]``;
   the last prompt token becomes the slot's input.
3. When the batch changes, the host rebuilds the sampling plan (the γ mix of the groups' active
   rows, ``build_sample_plan``), the CFG leader index and the multi-LoRA slots: once per change.
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

from divgen.engine.errors import DivgenError
from divgen.engine.guidance import Guidance
from divgen.engine.kv_cache import KVCache
from divgen.engine.model import LoadedModel
from divgen.engine.sampling import SamplingParams, build_sample_plan, guided_sample_step
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

    def check(self, ids: list[int]) -> str | None:
        if ids and ids[-1] in self.eos:
            return "eos"
        if self.stop:
            text = self.lm.decode(ids)
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
                any_min_p: bool = False, marks: list | None = None):
    """One decode step for every slot, on the device, no host sync, fixed shapes.

    Forward the slots' input tokens, sample (guided), let CFG shadows take their leader's token,
    check EOS and length, and advance the active slots in place. Returns [2, S] int64: the
    sampled tokens and the slots that finished in this step. ``marks`` (eager CPU steps, for
    ``STEP_TIMES``): the time the forward ended is appended."""
    logits = model.decode(st.tokens, st.pos, k_cache, v_cache)                      # [S, V] fp32
    if marks is not None:
        marks.append(time.perf_counter())
    if greedy_only:
        new = torch.argmax(logits, dim=-1)
    else:
        new = guided_sample_step(logits, plan, st.seeds, st.gen, st.temperature, st.alpha, st.top_k,
                                 st.top_p, min_p=st.min_p if any_min_p else None,
                                 any_top_k_top_p=any_top_k_top_p)                    # [S]
    new = new[st.leader]
    active = st.active.clone()
    is_eos = (new[:, None] == eos_ids[None, :]).any(dim=-1) & st.check_eos
    done = active & (is_eos | (st.gen + 1 >= st.max_new))
    done = done[st.leader]
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


# Whether engines read a step's tokens one step late (after launching the next). None: by device
# (CUDA lags, CPU reads at once). benchmarks/synth_throughput.py sets True to measure the CUDA
# schedule's slot occupancy on a CPU.
READ_LAG: bool | None = None

# When a list, eager engines append one ``StepTime`` per decode step (``divgen bench decode``'s
# forward / sampler / host split). None (the default): nothing is timed.
STEP_TIMES: list | None = None


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
        self.model.setup_rope(max_len)
        self.compiled = default_compile(lm.device) if compile is None else bool(compile)
        # Eager steps may run on the live prefix of the slots only (cheaper on CPU, where a step
        # costs what its rows cost); a compiled step keeps its one fixed shape.
        self.trim = (not self.compiled) if trim is None else bool(trim)
        # Read step t's tokens after launching step t+1 (lag) on CUDA, so the host never stalls
        # the device; on CPU the step has finished when it returns, so it is read at once.
        if lag is None:
            lag = (lm.device.type == "cuda") if READ_LAG is None else READ_LAG
        self.lag = bool(lag)
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
            on_result: Callable[[GenerationResult], None] | None = None) -> tuple[list[GenerationResult], RunStats]:
        start = time.perf_counter()
        dev, st, S = self.device, self.state, self.slots
        sched = Scheduler(len(encoded), guidance, S)
        for g in sched.groups:
            self.cache.check_fits(max(len(encoded[r]) for r in g.rows), max_new_tokens, len(g.rows))
        if listeners and self.compiled:
            raise DivgenError("multi-LoRA listeners need an eager step: pass compile=False")
        eos = sorted(self.lm.eos_token_ids) or [-1]
        eos_ids = torch.tensor(eos, dtype=torch.int64, device=dev)
        greedy_only = params.all_greedy and params.no_cutoffs and (guidance is None)
        any_cut = bool((params.top_k > 0).any() or (params.top_p < 1).any())
        any_min_p = bool((params.min_p > 0).any())
        seeds = params.seeds.tolist()
        is_shadow = [guidance is not None and guidance.is_shadow(r) for r in range(len(encoded))]
        sample_rows = [r for r in range(len(encoded)) if not is_shadow[r]]
        stats = RunStats(slots=S)
        st.active.zero_()
        generated: dict[int, list[int]] = {}
        finished: dict[int, GenerationResult] = {}
        n_live = S
        plan = None
        # the largest group of the run (a group over the kernels' maximum gets the plan's own error)
        block = min(next_power_of_2(max(len(u.rows) for u in sched.groups)), MAX_GROUP_ROWS)
        waiting: list[bool] = []                # per step: were groups left waiting for slots

        def admit() -> bool:
            """Admit every waiting group that fits, in order; prefill them in one batch."""
            rows, slots = [], []
            while (group := sched.next_admissible()) is not None:
                slots += sched.admit(group, first_step=stats.steps)
                rows += group.rows
            if not rows:
                return False
            self._prefill([encoded[r] for r in rows], slots, rows, listeners)
            idx = torch.tensor(slots, dtype=torch.int64, device=dev)
            index = torch.tensor(rows, dtype=torch.int64, device=dev)
            st.tokens[idx] = torch.tensor([encoded[r][-1] for r in rows], dtype=torch.int64, device=dev)
            st.pos[idx] = torch.tensor([len(encoded[r]) - 1 for r in rows], dtype=torch.int64, device=dev)
            st.gen[idx] = 0
            st.max_new[idx] = max_new_tokens
            st.active[idx] = True
            st.check_eos[idx] = bool(stopper.eos)
            st.seeds[idx] = params.seeds[index]
            st.temperature[idx] = params.temperature[index]
            st.alpha[idx] = params.alpha[index]
            st.min_p[idx] = params.min_p[index]
            st.top_k[idx] = params.top_k[index]
            st.top_p[idx] = params.top_p[index]
            for r in rows:
                generated[r] = []
            stats.prompt_tokens += sum(len(encoded[r]) for r in rows)
            return True

        def rebuild() -> None:
            nonlocal n_live, plan
            n_live = (sched.highest_used_slot() + 1) if self.trim else S
            n_live = max(n_live, 1)
            mix = sched.mix(n_live)
            if greedy_only:
                plan = None
            elif self.compiled:     # one static plan, refilled in place (fixed shapes and addresses)
                new = build_sample_plan(mix, dev, rows=n_live, static_block=block, masks=False)   # finite logits
                plan = new if plan is None else plan.copy_from(new)
            else:
                plan = build_sample_plan(mix, dev, rows=n_live, masks=False)
            st.leader[:n_live] = torch.tensor(sched.leader_slots(n_live), dtype=torch.int64, device=dev)
            rows = torch.tensor(sched.slot_rows(n_live), dtype=torch.int64, device=dev)
            for listener in listeners:
                listener.set_batch(rows)

        def finish(row: int, reason: str) -> None:
            ids, text = stopper.final_text(generated[row], reason)
            res = GenerationResult(row=row, token_ids=ids, text=text, finish_reason=reason, seed=seeds[row])
            finished[row] = res
            stats.generated_tokens += len(generated[row])
            freed = sched.retire(row)          # the row's slot and its shadows' slots
            if reason == "stop":               # still active on the device: stop it there
                st.active[torch.tensor(freed, dtype=torch.int64, device=dev)] = False
            if on_result is not None:
                on_result(res)

        def process(rec) -> bool:
            step_index, host = rec
            host = self._read(host)
            tokens, done = host[0].tolist(), host[1].tolist()
            live = list(sched.live_slots(step_index, len(tokens)))   # rows that worked in this step
            useful, changed = len(live), False
            for slot, row in live:
                if is_shadow[row] or row in finished:   # shadows (maybe retired with their leader just now)
                    continue
                generated[row].append(tokens[slot])
                if done[slot]:
                    reason = "eos" if tokens[slot] in stopper.eos else "length"
                else:
                    reason = stopper.check(generated[row]) if stopper.stop else None
                if reason is not None:
                    finish(row, reason)
                    changed = True
            stats.rows_forwarded += useful
            stats.rows_forwarded_per_step.append(useful)
            stats.waiting_per_step.append(waiting[step_index])
            if progress is not None:
                progress(len(finished), len(sample_rows))
            return changed

        t0 = time.perf_counter()
        admit()
        rebuild()
        stats.prefill_time_s += time.perf_counter() - t0
        prev = None
        while len(finished) < len(sample_rows):
            n = n_live
            k, v = (self.cache.k, self.cache.v) if n == S else (self.cache.k[:, :n], self.cache.v[:, :n])
            view = st if n == S else _View(st, n)
            timed = STEP_TIMES is not None and not self.compiled and dev.type == "cpu"
            t_step = time.perf_counter()
            if timed:
                marks: list = []
                out = self._step(self.model, k, v, view, plan, eos_ids, any_cut, greedy_only, any_min_p, marks)
                STEP_TIMES.append(StepTime(t_step, marks[0], time.perf_counter(), n))
            else:
                out = self._step(self.model, k, v, view, plan, eos_ids, any_cut, greedy_only, any_min_p)
            rec = (stats.steps, self._to_host(out))
            waiting.append(bool(sched.pending))
            stats.steps += 1
            stats.slots_forwarded += n
            if not self.lag:                   # read this step now (free on CPU: no device to wait for)
                prev, rec = rec, None
            if prev is not None and process(prev):
                t0 = time.perf_counter()
                admit()
                rebuild()
                stats.prefill_time_s += time.perf_counter() - t0
                if timed:
                    STEP_TIMES[-1].prefill_after += time.perf_counter() - t0
            prev = rec
            if len(finished) < len(sample_rows) and not sched.any_live():
                raise RuntimeError("decode engine: rows left but none in a slot (scheduler bug)")
        stats.wall_time_s = time.perf_counter() - start
        return [finished[r] for r in sample_rows], stats

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

    def _prefill(self, prompts: list[list[int]], slots: list[int], rows: list[int], listeners) -> None:
        """Write all but the last token of each prompt into its slot (right-padded, one batch)."""
        width = max(len(p) for p in prompts) - 1
        if width == 0:
            return
        pad = self.lm.pad_token_id
        tokens = torch.tensor([p[:-1] + [pad] * (width - len(p) + 1) for p in prompts], dtype=torch.int64)
        for listener in listeners:
            listener.set_batch(torch.tensor(rows, dtype=torch.int64, device=self.device))
        self.model.prefill(tokens.to(self.device), torch.tensor(slots, device=self.device),
                           self.cache.k, self.cache.v)


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
        compile: torch.compile the step (default: on CUDA only; see ``default_compile``).
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
    if lm.fast is None:
        from divgen.engine.models.hf_loop import generate_hf_batched

        return generate_hf_batched(lm, encoded, params, max_new_tokens=max_new_tokens, stopper=stopper,
                                   guidance=guidance, listeners=listeners, progress=progress,
                                   max_batch_rows=max_batch_rows, on_result=on_result)
    slots = min(n_rows, max_batch_rows or n_rows)
    longest = max(len(ids) for ids in encoded)
    max_len = min(_round_up(longest + max_new_tokens, 64), lm.context_length)
    if compile is None:
        compile = False if listeners else lm.compile
    engine = _engine_for(lm, slots, max_len, compile)
    return engine.run(encoded, params, max_new_tokens=max_new_tokens, stopper=stopper, guidance=guidance,
                      listeners=listeners, progress=progress, on_result=on_result)


def notice(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)
