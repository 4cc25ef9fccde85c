"""The `--ray` options of `divgen synth`: the job's groups sharded over Ray actors
(engine/synth/ray_shards.py). Registered by cli_synth; Ray is an optional extra (divgen[ray])."""
from __future__ import annotations

import sys

from divgen.engine import limits
from divgen.engine.errors import DivgenError


def add_arguments(p) -> None:
    g = p.add_argument_group("Ray scale-out (pip install 'divgen[ray]')")
    g.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="shard the job over Ray actors, one engine each: 'local' (the default when the flag "
                        "has no value) starts a local cluster; HOST:PORT or ray://HOST:PORT joins a running one")
    g.add_argument("--ray-workers", type=int, default=None,
                   help="actors = shards (default 2, or the count of an interrupted run's shards)")
    g.add_argument("--ray-cpus-per-worker", type=int, default=None, help="CPUs (torch threads) per actor (default 1)")
    g.add_argument("--ray-gpus-per-worker", type=float, default=None,
                   help="GPUs per actor (default 0; 1 on GPU nodes)")


RAY_FLAGS = {"ray_workers": "--ray-workers", "ray_cpus_per_worker": "--ray-cpus-per-worker",
             "ray_gpus_per_worker": "--ray-gpus-per-worker"}


def check_arguments(args) -> None:
    """The Ray flags mean nothing without --ray: refuse them rather than run a single process."""
    if args.ray is None:
        given = [flag for name, flag in RAY_FLAGS.items() if getattr(args, name) is not None]
        if given:
            raise DivgenError(f"{given[0]} needs --ray (a local cluster) or --ray ADDRESS: add it, or drop {given[0]}")
        return
    if args.ray_workers is not None:
        limits.count(args.ray_workers, "--ray-workers", high=limits.MAX_THREADS)
    if args.ray_cpus_per_worker is not None:
        limits.count(args.ray_cpus_per_worker, "--ray-cpus-per-worker", high=limits.MAX_THREADS)
    if args.ray_gpus_per_worker is not None:
        limits.number(args.ray_gpus_per_worker, "--ray-gpus-per-worker", low=0, high=1024)


def run(task, args, batch_rows: int) -> int:
    from divgen.engine.synth.ray_shards import run_synth_ray

    report = run_synth_ray(task, args.out, address=args.ray, workers=args.ray_workers,
                           cpus_per_worker=args.ray_cpus_per_worker or 1, gpus_per_worker=args.ray_gpus_per_worker or 0,
                           batch_rows=batch_rows, progress=args.progress)
    if report.new_records:
        counts = ", ".join(f"{k} {v}" for k, v in report.counts.items())
        resumed = [i for i, n in report.attempts.items() if n > 1]
        print(f"{report.out}: {report.workers} Ray workers wrote {report.new_records} examples in "
              f"{report.wall_time_s:.1f}s ({report.examples_per_s:.2f} examples/s, {task.method})"
              + (f"; shards {resumed} resumed by new workers" if resumed else "")
              + f"; file now holds {counts}", file=sys.stderr)
    return 0
