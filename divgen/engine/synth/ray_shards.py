"""``divgen synth --ray [ADDRESS]``: the job's groups sharded over Ray actors, one engine each.

Steps of ``run_synth_ray``:

1. Check everything that can fail on user input before Ray starts: the task, the few-shot pool,
   the output (an ``OUT`` that a single-process run began is refused: finish it without --ray),
   the shard folder (shards of another worker count are refused), Ray importable, the cluster
   address reachable (a TCP connect with a short timeout, instead of Ray's long retry loop).
2. Connect (``local``: start a local cluster of ``workers × cpus_per_worker`` CPUs).
3. One actor per shard (``num_cpus = cpus_per_worker``, ``num_gpus = gpus_per_worker``), each
   loading the model once and running ``run_synth(task, .OUT.shards/shard-i-of-N.jsonl,
   shard=(i, N))`` with ``cpus_per_worker`` torch threads: the single-process job restricted to
   its groups, with its own crash-proof file (engine/synth/shards.py).
4. Watch: a line every few seconds with the records written over all shard files, rate and ETA.
   An actor that dies (its process killed, its node lost) is replaced by a new actor that resumes
   that shard from its file; a shard is given up after ``max_attempts`` actors.
5. Merge: the shards' records ordered by (group, slot) are written to ``OUT`` atomically, with the
   same sidecar as a single-process run, and the shard folder is removed. The result is byte for
   byte the file a single-process run with the same task and seed writes.

Multi-node: the same code runs on any Ray cluster (``ray start --head`` on one node, ``ray start
--address HEAD:6379`` on the others, then ``divgen synth ... --ray HEAD:6379``). Every node needs
divgen and the model at the same path; the shard folder must be on storage all nodes share
(the actors write there), as must a few-shot file.
"""
from __future__ import annotations

import importlib.util
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from divgen.engine.errors import DivgenError
from divgen.engine.synth.shards import (
    ShardPlan, existing_shard_count, merge_shards, remove_shards, shard_dir, shard_path,
)

DEFAULT_MAX_ATTEMPTS = 3
RAY_INSTALL = "pip install 'divgen[ray]'"


@dataclass
class RayReport:
    out: Path
    workers: int
    written: int = 0                                 # records in OUT at the end
    new_records: int = 0                             # records the actors wrote in this run
    wall_time_s: float = 0.0
    attempts: dict = field(default_factory=dict)     # shard -> actors used (2+ = resumed after a loss)
    counts: dict = field(default_factory=dict)

    @property
    def examples_per_s(self) -> float:
        return self.new_records / self.wall_time_s if self.wall_time_s > 0 else 0.0


def check_ray_available() -> None:
    if importlib.util.find_spec("ray") is None:
        raise DivgenError(f"--ray needs Ray: {RAY_INSTALL} (or run without --ray)")


def parse_address(address: str) -> tuple[str, int] | None:
    """(host, port) to probe for a cluster address; None for 'local' and 'auto'."""
    if address in ("local", "auto"):
        return None
    rest = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise DivgenError(f"--ray {address}: give 'local', 'auto', HOST:PORT (e.g. 10.0.0.1:6379) or ray://HOST:PORT")
    return host.strip("[]"), int(port)


def check_reachable(address: str, timeout: float = 3.0) -> None:
    """Fail fast, with the fix, when nothing listens at a cluster address."""
    target = parse_address(address)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=timeout):
            pass
    except OSError as exc:
        raise DivgenError(f"cannot reach a Ray cluster at {address} ({exc.strerror or exc}): start one with "
                          "`ray start --head` there, check the address, or use --ray local") from exc


def _shard_worker_class():
    import ray

    class ShardWorker:
        """One engine: loads the model once, runs shards of a synth job."""

        def __init__(self, model: str, dtype, threads: int):
            import torch

            torch.set_num_threads(threads)
            from divgen.engine.model import load_model

            self.lm = load_model(None if model == "default" else model, dtype=dtype)

        def run(self, task, path: str, index: int, count: int, batch_rows: int) -> dict:
            from divgen.engine.synth.job import run_synth

            report = run_synth(task, path, lm=self.lm, batch_rows=batch_rows, progress=False,
                               log=lambda msg: None, shard=(index, count))
            return {"written": report.written, "resumed_from": report.resumed_from}

        def pid(self) -> int:
            return os.getpid()

    return ray.remote(ShardWorker)


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except OSError:
        return 0


def run_synth_ray(
    task,
    out: str | os.PathLike,
    *,
    address: str = "local",
    workers: int | None = None,
    cpus_per_worker: int = 1,
    gpus_per_worker: float = 0,
    batch_rows: int = 64,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    actor_name_prefix: str | None = None,
) -> RayReport:
    """Run the task's job over Ray actors into ``out`` (module docstring). ``actor_name_prefix``
    names the actors ``PREFIX-I-ATTEMPT`` (so they can be found with ``ray.get_actor``)."""
    from divgen.engine.progress import progress_bar
    from divgen.engine.synth.job import missing_count, prepare
    from divgen.engine.synth.output import read_output, write_sidecar
    from divgen.engine.synth.plan import plan

    log = log or (lambda msg: print(msg, file=sys.stderr))
    for name, value, low in (("--ray-workers", workers, 1), ("--ray-cpus-per-worker", cpus_per_worker, 1),
                             ("--batch-rows", batch_rows, 1), ("max_attempts", max_attempts, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise DivgenError(f"{name} must be an integer >= {low}, got {value!r}")
    if not gpus_per_worker >= 0:
        raise DivgenError(f"--ray-gpus-per-worker must be >= 0, got {gpus_per_worker}")
    out = Path(out).absolute()                                    # actors may run in another folder
    start = time.perf_counter()
    pool, fp, content, existing = prepare(task, out)              # task and output checks
    full = plan(task)
    if existing.done:
        if missing_count(full, existing) == 0:
            remove_shards(out)
            log(f"{out}: complete ({', '.join(f'{k} {v}' for k, v in existing.counts.items())}); nothing to do")
            return RayReport(out=out, workers=0, written=len(existing.done), counts=dict(existing.counts),
                             wall_time_s=time.perf_counter() - start)
        raise DivgenError(f"{out} holds part of a single-process run: finish it without --ray, or write the "
                          "--ray job to a new --out")
    found = existing_shard_count(out)
    if workers is None:
        workers = found or 2
    if found is not None and found != workers:
        raise DivgenError(f"{shard_dir(out)} holds the shards of {found} workers: resume with --ray-workers {found}, "
                          f"or remove {shard_dir(out)} to start over")
    check_ray_available()
    check_reachable(address)

    import ray

    shard_dir(out).mkdir(exist_ok=True)
    shards = [ShardPlan(full, i, workers) for i in range(workers)]
    todo_total = sum(s.kept_total for s in shards)
    report = RayReport(out=out, workers=workers, attempts={i: 0 for i in range(workers)})
    started_here = False
    if not ray.is_initialized():
        kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            if address == "local":
                ray.init(num_cpus=workers * cpus_per_worker, **kwargs)
            else:
                ray.init(address=address, **kwargs)
        except ConnectionError as exc:
            raise DivgenError(f"cannot connect to the Ray cluster at {address}: {exc}") from exc
        started_here = True
    try:
        Worker = _shard_worker_class()
        model = task.model if task.model == "default" or not Path(task.model).expanduser().exists() \
            else str(Path(task.model).expanduser().resolve())             # a path, or a cached hub id as given

        def launch(i: int):
            report.attempts[i] += 1
            opts = {"name": f"{actor_name_prefix}-{i}-{report.attempts[i]}"} if actor_name_prefix else {}
            actor = Worker.options(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, **opts).remote(
                model, getattr(task, "dtype", None), cpus_per_worker)
            ref = actor.run.remote(task, str(shard_path(out, i, workers)), i, workers, batch_rows)
            return actor, ref

        running = {}
        for i, s in enumerate(shards):
            if s.kept_total:
                actor, ref = launch(i)
                running[ref] = (i, actor)
        paths = [shard_path(out, i, workers) for i in range(workers)]
        before = sum(_count_lines(p) for p in paths)
        bar = progress_bar(todo_total, f"synth {task.method} on {workers} Ray workers", "ex", initial=before,
                           enabled=progress)
        try:
            while running:
                ready, _ = ray.wait(list(running), num_returns=1, timeout=2.0)
                now = sum(_count_lines(p) for p in paths)
                if now > bar.n:
                    bar.update(now - bar.n)
                for ref in ready:
                    i, actor = running.pop(ref)
                    try:
                        ray.get(ref)
                    except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                            ray.exceptions.NodeDiedError) as exc:
                        if report.attempts[i] >= max_attempts:
                            raise DivgenError(f"shard {i} lost {max_attempts} workers ({exc.__class__.__name__}); "
                                              f"its file {paths[i]} keeps what was written: run again to resume") from exc
                        log(f"note: the worker of shard {i} died ({exc.__class__.__name__}); "
                            f"a new worker resumes {paths[i].name}")
                        new_actor, new_ref = launch(i)
                        running[new_ref] = (i, new_actor)
                    except ray.exceptions.RayTaskError as exc:
                        cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                        if isinstance(cause, DivgenError):
                            raise DivgenError(f"shard {i}: {cause}") from exc
                        raise
                    else:
                        ray.kill(actor)
        finally:
            bar.close()
            for _, actor in running.values():
                ray.kill(actor)
    finally:
        if started_here:
            ray.shutdown()

    report.new_records = sum(_count_lines(p) for p in paths) - before
    write_sidecar(out, fp, content, task)
    report.written = merge_shards(out, workers, fp)
    final = read_output(out)
    if missing_count(full, final) != 0:
        raise DivgenError(f"{out}: the merged shards miss {missing_count(full, final)} records: run again to resume")
    remove_shards(out)
    report.counts = dict(final.counts)
    report.wall_time_s = time.perf_counter() - start
    return report
