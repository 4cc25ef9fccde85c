"""The decode loop: ragged prompts -> one batched prefill -> step loop over a KV cache.

    generate(lm, prompts, ...) -> (results, stats)

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
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch

from divgen.engine.errors import DivgenError
from divgen.engine.guidance import Guidance, mixing_matrix
from divgen.engine.model import LoadedModel
from divgen.engine.sampling import Sampler, SamplingParams


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
    rows_forwarded: int = 0                 # rows in the batch, summed over decode steps
    steps: int = 0                          # decode steps run
    wall_time_s: float = 0.0
    prefill_time_s: float = 0.0
    rows_forwarded_per_step: list[int] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_time_s if self.wall_time_s > 0 else 0.0


class BatchListener:
    """Something that keeps per-row state for the model's forward (e.g. multi-LoRA slots)."""

    def set_batch(self, rows: torch.Tensor) -> None:  # rows: [B] int64 prompt indices, batch order
        raise NotImplementedError


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
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
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
    """Per-row stop conditions: EOS ids, stop strings, length."""

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


def _leader_positions(guidance: Guidance | None, active: list[int], device) -> torch.Tensor | None:
    """For CFG: batch position of each row's leader (itself for sample rows), [B] int64; else None.
    Rebuilt only when the batch changes, not every step."""
    if guidance is None or guidance.shadow_of is None:
        return None
    pos = {r: i for i, r in enumerate(active)}
    return torch.tensor([pos[guidance.leader(r)] for r in active], dtype=torch.int64, device=device)


def _supports_logits_to_keep(model) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


@torch.inference_mode()
def generate(
    lm: LoadedModel,
    prompts: Sequence,
    *,
    max_new_tokens: int = 64,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    alpha=0.0,
    seeds=0,
    stop: Iterable[str] = (),
    ignore_eos: bool = False,
    guidance: Guidance | None = None,
    batch_listeners: Iterable[BatchListener] = (),
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[GenerationResult], RunStats]:
    """Generate a continuation for every prompt in one batch. See the module docstring.

    Args:
        prompts: formatted text (see ``LoadedModel.format_prompt``) or token-id lists.
        temperature, top_k, top_p, alpha: a scalar or one value per row; temperature 0 = greedy;
            alpha is the plausibility cutoff on the row's own distribution (= min-p).
        seeds: int (row i gets seeds + i) or one per row.
        guidance: rows contrasted in groups (``Guidance``); None = independent rows (FewGen).
        batch_listeners: told which prompt rows are in the batch before every forward that
            follows a change (multi-LoRA adapter slots).
        progress: called after every step with (finished sample rows, total sample rows).
    Returns: results for every non-shadow row in prompt order, and the run's stats.
    """
    start = time.perf_counter()
    encoded = _encode_prompts(lm, prompts)
    _check_lengths(lm, encoded, max_new_tokens)
    n_rows = len(encoded)
    if guidance is not None and guidance.rows != n_rows:
        raise DivgenError(f"guidance describes {guidance.rows} rows but {n_rows} prompts were given")
    device = lm.device
    params_all = SamplingParams.make(n_rows, temperature=temperature, top_k=top_k, top_p=top_p,
                                     alpha=alpha, seeds=seeds, device=device)
    listeners = list(batch_listeners)
    stopper = _StopChecker(lm, stop, ignore_eos, max_new_tokens)
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
    cache = out.past_key_values
    logits = out.logits[:, -1, :]                            # [B, V]
    next_pos = positions[:, -1:] + 1                         # [B, 1]
    stats = RunStats(prompt_tokens=sum(lengths))
    stats.prefill_time_s = time.perf_counter() - start

    generated: dict[int, list[int]] = {r: [] for r in range(n_rows)}
    finished: dict[int, GenerationResult] = {}
    mix = mixing_matrix(guidance, active, device)
    leaders = _leader_positions(guidance, active, device)
    seed_of = params_all.seeds.tolist()

    for step in range(max_new_tokens):
        tokens = sampler(logits, params, step, mix)          # [B]
        if leaders is not None:
            tokens = tokens[leaders]                         # shadows take their leader's token
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
            index = torch.tensor(active, dtype=torch.int64, device=device)
            params = params_all.select(index)
            mix = mixing_matrix(guidance, active, device)
            leaders = _leader_positions(guidance, active, device)
            for listener in listeners:
                listener.set_batch(index)

        mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
        out = lm.model(input_ids=tokens[:, None], attention_mask=mask, position_ids=next_pos,
                       past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits = out.logits[:, -1, :]
        next_pos = next_pos + 1
        stats.steps += 1
        stats.rows_forwarded += len(active)
        stats.rows_forwarded_per_step.append(len(active))

    stats.wall_time_s = time.perf_counter() - start
    return [finished[r] for r in sample_rows], stats
