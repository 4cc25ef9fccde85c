"""The dataset-synthesis job behind ``divgen synth``: task -> lockstep groups -> JSONL.

Steps of ``run_synth``:

1. Prepare (before the model loads, before any write): the few-shot pool, the task fingerprint,
   the output checks (``output.read_output``: an existing file must be a synth output of the
   same task).
2. Plan (``plan.Plan``): groups of slots, computed group by group on demand.
3. Resume. Complete lines of an existing output name their (group, slot); the job generates only
   the kept slots that are missing. A torn last line (the process was killed mid-write) is cut off.
4. Generate whole groups through ``decode_batch`` — the one call into the decoder — which keeps
   ``batch_rows`` KV slots busy (continuous batching: a group enters when a finished one frees
   its slots), up to ``ROWS_PER_CALL`` rows per call (one drain of the slots per call).
5. Write each group's records in one append + fsync as soon as the group finishes; a kill loses
   at most the groups in flight.

Prompts: slot s (label y) of group g shows the few-shot examples ``pick_examples(task, pool, g, s,
y)``; FewGen and CorrSynth therefore see exactly the same prompts, slot by slot. A CFG shadow of
that slot for label y' shows ``pick_examples(task, pool, g, s, y')`` (y''s prompt for this slot).
"""
from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from divgen.engine import limits
from divgen.engine.errors import DivgenError
from divgen.engine.model_source import find_model
from divgen.engine.synth.clean import clean_text, scaffolding_prefixes
from divgen.engine.synth.few_shot import few_shot_pool, pool_with_sources
from divgen.engine.synth.output import (
    ExistingOutput, check_same_task, check_writable, fingerprint, read_output, sidecar_path, synth_record,
    write_all, write_sidecar,
)
from divgen.engine.synth.plan import BatchRows, Plan, make_guidance, plan, rows_for_groups, rows_in_group
from divgen.engine.synth.prompts import PromptCache, pick_example_positions
from divgen.engine.synth.schema import divgen_version, model_id, record_params
from divgen.engine.synth.shards import ShardPlan
from divgen.engine.synth.task import Task

DEFAULT_BATCH_ROWS = 64


@dataclass
class SynthReport:
    out: Path
    written: int = 0                      # records appended by this run
    counts: dict = field(default_factory=dict)   # label -> records in the file at the end
    wall_time_s: float = 0.0
    generate_time_s: float = 0.0          # time inside the decoder only
    rows_forwarded: int = 0
    steps: int = 0
    rows_forwarded_per_step: list = field(default_factory=list)
    resumed_from: int = 0                 # complete records found at the start
    fingerprint: str = ""

    @property
    def examples_per_s(self) -> float:
        return self.written / self.wall_time_s if self.wall_time_s > 0 else 0.0


def prepare(task: Task, out: Path):
    """Everything that can fail on user input, before the model loads and before any write."""
    find_model(task.model)
    pool = few_shot_pool(task)
    fp = fingerprint(task, pool)
    content = task.content()
    check_writable(out)
    existing = read_output(out)
    check_same_task(out, existing, fp, content)
    return pool, fp, content, existing


def missing_count(groups: Plan, existing: ExistingOutput) -> int:
    """Kept slots of the plan that the file does not hold yet."""
    return groups.kept_total - sum(groups.is_kept(g, s) for g, s in existing.done)


def run_synth(
    task: Task,
    out: str | os.PathLike,
    *,
    lm=None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
    shard: tuple[int, int] | None = None,
    device=None,
    compile: bool | None = None,
    per_call: int | None = None,
    lag: bool | None = None,
) -> SynthReport:
    """Generate the task's examples into ``out`` (append-only, resumable). See module docstring.

    lm: a loaded model (default: load ``task.model`` with ``task.dtype`` on ``device``). progress:
    False = none; otherwise a tqdm bar when stderr is a terminal, else a line every few seconds
    (engine/progress.py). log: where one-line notes go (default: stderr). shard: (i, N) = only the
    groups of shard i of N (engine/synth/shards.py; ``divgen synth --ray``). per_call: rows per
    decoder call (default ``ROWS_PER_CALL``; 1 = one batch a call, no refill across batches); lag:
    the engine's read schedule (benchmarks/synth_throughput.py measures both)."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    limits.batch_rows(batch_rows, "batch_rows")
    device = limits.device(device, "device")
    out = Path(out)
    start = time.perf_counter()
    task = task.with_generation_defaults()
    pool, fp, content, existing = prepare(task, out)
    groups = plan(task) if shard is None else ShardPlan(plan(task), *shard)
    report = SynthReport(out=out, resumed_from=len(existing.done), fingerprint=fp)
    target = task.target()
    over = {lab: n for lab, n in existing.counts.items() if n > target.get(lab, 0)}
    if over:
        log(f"note: {out} already holds more than asked for {', '.join(f'{k} ({v})' for k, v in over.items())}")
    if missing_count(groups, existing) == 0:
        report.counts = dict(existing.counts)
        report.wall_time_s = time.perf_counter() - start
        if existing.size > existing.good_bytes:
            log(f"note: {out} ends with a torn line; it is cut off on the next run that writes")
        log(f"{out}: complete ({', '.join(f'{k} {v}' for k, v in report.counts.items())}); nothing to do")
        return report

    created = not out.exists()
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    except OSError as exc:
        raise DivgenError(f"cannot open --out {out} for writing: {exc.strerror}. Choose another path") from exc
    sidecar_existed = sidecar_path(out).exists()
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            created = False                # the other writer's file: never removed
            raise DivgenError(f"another process is writing {out}: wait for it or choose another --out") from exc
        existing = read_output(out)      # re-read under the lock
        check_same_task(out, existing, fp, content)
        report.resumed_from = len(existing.done)
        if lm is None:
            from divgen.engine.model import load_model

            lm = load_model(None if task.model == "default" else task.model, device=device, dtype=task.dtype,
                            compile=compile)
        if existing.size > existing.good_bytes:   # a torn last line from a killed run
            os.ftruncate(fd, existing.good_bytes)
            os.fsync(fd)
            log(f"note: cut a torn last line off {out} ({existing.size - existing.good_bytes} bytes)")
        write_sidecar(out, fp, content, task)
        _generate_into(task, lm, fd, groups, existing, pool, fp, batch_rows, progress, report, per_call, lag)
    except BaseException:
        # A run that failed before writing a record leaves nothing behind that it created.
        if created and report.written == 0 and os.fstat(fd).st_size == 0:
            out.unlink(missing_ok=True)
            if not sidecar_existed:
                sidecar_path(out).unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    final = read_output(out)
    report.counts = dict(final.counts)
    report.wall_time_s = time.perf_counter() - start
    return report


def batches(task: Task, groups: Plan, done: set, batch_rows: int) -> Iterator[tuple[list, set]]:
    """(groups, missing (group, slot) keys) of each decode batch, in plan order, built lazily:
    whole groups with something missing, at most ``batch_rows`` rows per batch (a group larger
    than that is a batch of its own)."""
    current, missing, rows = [], set(), 0
    for slots in groups:
        todo = {(s.group, s.slot) for s in slots if s.keep and (s.group, s.slot) not in done}
        if not todo:
            continue
        n = rows_in_group(task, slots, todo)
        if current and rows + n > batch_rows:
            yield current, missing
            current, missing, rows = [], set(), 0
        current.append(slots)
        missing |= todo
        rows += n
    if current:
        yield current, missing


# Rows handed to the decoder per call (at least ``batch_rows``): the engine keeps ``batch_rows``
# KV slots busy by admitting the next group as soon as a finished row frees enough slots
# (continuous batching), so slots idle only while a call drains at its end. A call of 2048 rows
# is 32 refills of 64 slots, so the drain costs a few per cent of the slot-steps; its prompts
# (a few hundred tokens each, encoded when the call starts) stay well under 100 MB. A group's
# records are appended as soon as it finishes: a kill loses at most the groups in flight.
ROWS_PER_CALL = 2048


def rows_per_call(batch_rows: int, per_call: int | None = None) -> int:
    """Rows of one decoder call: ``per_call`` (default ``ROWS_PER_CALL``) rounded down to whole
    batches, at least one."""
    return batch_rows * max(1, (ROWS_PER_CALL if per_call is None else per_call) // batch_rows)


def decode_batch(task: Task, lm, b: BatchRows, progress: Callable[[int, int], None], slots: int | None = None,
                 on_result=None, lag: bool | None = None):
    """The one call into the decoder: the rows of one call -> (results, stats), decoded in at most
    ``slots`` rows at a time (default: all at once); ``on_result`` gets each sample as it finishes."""
    from divgen.engine.decode import generate

    s = task.sampling
    if slots is not None:   # a group larger than the slots still decodes whole (as it did alone)
        slots = max([slots] + [b.groups.count(g) for g in set(b.groups)])
    return generate(
        lm, b.prompts, max_new_tokens=task.max_new_tokens, temperature=s.temperature,
        top_k=s.top_k, top_p=s.top_p, alpha=s.alpha, min_p=s.min_p, seeds=b.seeds, stop=task.stop,
        ignore_eos=task.ignore_eos, guidance=make_guidance(task, b), progress=progress,
        max_batch_rows=slots, on_result=on_result, lag=lag,
    )


def _generate_into(task, lm, fd, groups: Plan, existing: ExistingOutput, pool, fp, batch_rows, progress,
                   report, per_call: int | None = None, lag: bool | None = None) -> None:
    from divgen.engine.progress import progress_bar

    prompt = PromptCache(task, lm, pool)
    _, sources = pool_with_sources(task)      # where each pool item came from (records' "examples")
    prefixes = scaffolding_prefixes(task)
    names = task.label_names
    params = record_params(task)                  # the same keys and types for every method
    model, version = model_id(task), divgen_version()
    # A bar on a terminal, a line every few seconds (rate, ETA) in a log; progress=False: nothing.
    bar = progress_bar(missing_count(groups, existing), f"synth {task.method}", "ex", enabled=progress is not False,
                       dynamic_ncols=True, smoothing=0.1, mininterval=0.5,
                       bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}]")
    written_before_run = report.written
    try:
        for batch, missing in batches(task, groups, existing.done, rows_per_call(batch_rows, per_call)):
            b = rows_for_groups(task, batch, missing, prompt)
            in_batch = sum(b.write)
            written_before = bar.n

            def on_progress(done: int, total: int, _base=written_before, _n=in_batch) -> None:
                # Rows finish inside a batch before they are written: show them as they finish.
                ahead = _base + (done * _n) // max(total, 1) - bar.n
                if ahead > 0:
                    bar.update(ahead)

            # Records are appended as soon as every sample row of their group has finished
            # (continuous batching retires groups in any order): a kill loses only groups in flight.
            left = {}
            for row, slot in enumerate(b.slots):
                if slot is not None:
                    left[b.groups[row]] = left.get(b.groups[row], 0) + 1
            ready: dict = {}

            def on_result(r) -> None:
                sl = b.slots[r.row]
                if b.write[r.row]:
                    record = synth_record(
                        text=clean_text(lm, r.token_ids, task.stop, prefixes), label=names[sl.label],
                        method=task.method, params=params, seed=r.seed, group=sl.group, slot=sl.slot,
                        finish_reason=r.finish_reason, tokens=len(r.token_ids), fingerprint=fp,
                        model=model, divgen_version=version,
                        examples=[sources[names[sl.label]][i]
                                  for i in pick_example_positions(task, pool, sl.group, sl.slot, names[sl.label])],
                    )
                    ready.setdefault(sl.group, []).append((sl.slot, json.dumps(record, ensure_ascii=False)))
                left[b.groups[r.row]] -= 1
                if left[b.groups[r.row]] == 0:
                    lines = sorted(ready.pop(sl.group, []))
                    if lines:
                        write_all(fd, "".join(line + "\n" for _, line in lines).encode("utf-8"))
                        os.fsync(fd)
                        report.written += len(lines)
                        if report.written - written_before_run > bar.n:
                            bar.update(report.written - written_before_run - bar.n)

            results, stats = decode_batch(task, lm, b, on_progress, slots=batch_rows, on_result=on_result, lag=lag)
            report.generate_time_s += stats.wall_time_s
            report.rows_forwarded += stats.rows_forwarded
            report.steps += stats.steps
            report.rows_forwarded_per_step.extend(stats.rows_forwarded_per_step)
            prompt.clear()
    finally:
        bar.close()
